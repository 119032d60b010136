//! A static library (a GNU `ar` archive with its symbol index) of object files, written
//! directly: linkers refuse an archive without the index that `ranlib` would add, and the
//! build machine need not have binutils.

use chunkc::Error;

/// One member: its object code and the symbols it defines.
pub struct Member {
    pub bytes: Vec<u8>,
    pub symbols: Vec<String>,
}

const HEADER: usize = 60;

fn header(name: &str, size: usize) -> Vec<u8> {
    // name, mtime, uid, gid, mode, size: fixed-width ASCII fields padded with spaces.
    let h = format!("{name:<16}{:<12}{:<6}{:<6}{:<8}{size:<10}`\n", 0, 0, 0, 644);
    debug_assert_eq!(h.len(), HEADER);
    h.into_bytes()
}

fn padded(len: usize) -> usize {
    len + len % 2
}

/// The archive of `members` (named `k0.o`, `k1.o`...), with the index of their symbols.
pub fn write(members: &[Member]) -> Result<Vec<u8>, Error> {
    let symbols: Vec<(&str, usize)> =
        members.iter().enumerate().flat_map(|(i, m)| m.symbols.iter().map(move |s| (s.as_str(), i))).collect();
    let index_len = 4 + 4 * symbols.len() + symbols.iter().map(|(s, _)| s.len() + 1).sum::<usize>();
    // Where each member's header starts: after the magic and the index.
    let mut offsets = vec![];
    let mut at = 8 + HEADER + padded(index_len);
    for m in members {
        offsets.push(at);
        at += HEADER + padded(m.bytes.len());
    }
    let too_large = || Error::Input("the kernels' static library would pass 4 GiB".into());
    let mut out = b"!<arch>\n".to_vec();
    out.extend(header("/", index_len));
    out.extend(u32::try_from(symbols.len()).map_err(|_| too_large())?.to_be_bytes());
    for (_, member) in &symbols {
        out.extend(u32::try_from(offsets[*member]).map_err(|_| too_large())?.to_be_bytes());
    }
    for (s, _) in &symbols {
        out.extend(s.as_bytes());
        out.push(0);
    }
    if index_len % 2 == 1 {
        out.push(b'\n');
    }
    for (i, m) in members.iter().enumerate() {
        debug_assert_eq!(out.len(), offsets[i]);
        out.extend(header(&format!("k{i}.o/"), m.bytes.len()));
        out.extend(&m.bytes);
        if m.bytes.len() % 2 == 1 {
            out.push(b'\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_and_index_sit_where_the_format_puts_them() {
        let members = [
            Member { bytes: b"abc".to_vec(), symbols: vec!["one".into(), "two".into()] },
            Member { bytes: b"defg".to_vec(), symbols: vec!["three".into()] },
        ];
        let a = write(&members).unwrap();
        assert!(a.starts_with(b"!<arch>\n/               0"));
        let index_len = 4 + 3 * 4 + "one\0two\0three\0".len();
        assert_eq!(&a[8 + 48..8 + 58], format!("{index_len:<10}").as_bytes());
        let body = &a[8 + HEADER..];
        assert_eq!(u32::from_be_bytes(body[0..4].try_into().unwrap()), 3);
        let first = u32::from_be_bytes(body[4..8].try_into().unwrap()) as usize;
        let second = u32::from_be_bytes(body[12..16].try_into().unwrap()) as usize;
        assert_eq!(&a[first..first + 5], b"k0.o/");
        assert_eq!(&a[first + HEADER..first + HEADER + 3], b"abc");
        assert_eq!(&a[second..second + 5], b"k1.o/");
        assert_eq!(&a[second + HEADER..second + HEADER + 4], b"defg");
        assert_eq!(a.len(), second + HEADER + 4);
    }
}
