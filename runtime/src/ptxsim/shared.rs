//! Shared memory of one CTA with its checkers: a written bit per byte (uninitialised reads),
//! the last writer and the readers of each byte since the last barrier (races), and the
//! bytes an unfinished `cp.async` will write (accessing them before the wait is an error).
//!
//! Ordering model: `bar.sync` orders everything (the caller calls [`Shared::barrier`]);
//! a full-warp `bar.warp.sync` orders the accesses of that warp's lanes before it with
//! those after it. Each warp counts its warp syncs (its *epoch*); an access remembers the
//! epoch of its thread's warp, and two accesses by different lanes of one warp are ordered
//! when the earlier one's epoch is older than the warp's current one.

/// Names a thread in messages: `thread (x,y,z) of CTA (x,y,z)`.
#[derive(Clone, Copy, Debug)]
pub struct Who {
    pub block: [u32; 3],
    pub ctaid: [u32; 3],
}

impl Who {
    pub fn tid(&self, t: u32) -> [u32; 3] {
        let [x, y, _] = self.block;
        [t % x, (t / x) % y, t / (x * y)]
    }
    pub fn who(&self, t: u32) -> String {
        let [a, b, c] = self.tid(t);
        let [x, y, z] = self.ctaid;
        format!("thread ({a},{b},{c}) of CTA ({x},{y},{z})")
    }
}

pub const NONE: u32 = u32::MAX;
/// Readers from several warps (no write is ordered after all of them).
const MANY: u32 = u32::MAX - 1;
/// `WARP_BASE + w`: several readers, all lanes of warp `w`.
const WARP_BASE: u32 = 1 << 20;

pub struct Shared {
    pub data: Vec<u8>,
    init: Vec<bool>,
    writer: Vec<u32>,
    writer_ep: Vec<u32>,
    reader: Vec<u32>,
    reader_ep: Vec<u32>,
    /// The thread whose pending `cp.async` will write the byte, or [`NONE`].
    pending: Vec<u32>,
    /// The PTX line of that `cp.async`.
    pending_line: Vec<u32>,
    /// Bytes currently marked in `pending` (0 keeps the check off the hot path).
    npending: usize,
    warp_ep: Vec<u32>,
    pub who: Who,
}

impl Shared {
    pub fn new(bytes: usize, nwarps: usize, who: Who) -> Shared {
        Shared {
            data: vec![0; bytes],
            init: vec![false; bytes],
            writer: vec![NONE; bytes],
            writer_ep: vec![0; bytes],
            reader: vec![NONE; bytes],
            reader_ep: vec![0; bytes],
            pending: vec![NONE; bytes],
            pending_line: vec![0; bytes],
            npending: 0,
            warp_ep: vec![0; nwarps],
            who,
        }
    }

    /// Ready for the next CTA, reusing the allocations: only what the checks read is reset
    /// (the data of unwritten bytes is never read, the epochs only matter next to a writer
    /// or reader).
    pub fn reset(&mut self, who: Who) {
        self.who = who;
        self.init.fill(false);
        self.writer.fill(NONE);
        self.reader.fill(NONE);
        self.warp_ep.fill(0);
        if self.npending > 0 {
            // A thread exited with copies in flight; they never land in the next CTA.
            self.pending.fill(NONE);
            self.npending = 0;
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// A `bar.sync` completed: every access before it is ordered with every one after.
    /// Pending `cp.async` writes stay pending (a barrier does not complete them).
    pub fn barrier(&mut self) {
        self.writer.fill(NONE);
        self.reader.fill(NONE);
        self.warp_ep.fill(0);
    }

    /// A `bar.warp.sync` of the whole warp `w`.
    pub fn warp_sync(&mut self, w: usize) {
        self.warp_ep[w] += 1;
    }

    /// Whether an access by `prev` in epoch `ep` is ordered before one by `t` now.
    fn ordered(&self, prev: u32, ep: u32, t: u32) -> bool {
        prev == t || (prev < WARP_BASE && prev / 32 == t / 32 && ep < self.warp_ep[(t / 32) as usize])
    }

    /// Bounds and alignment of an access of `n` bytes at shared address `a`.
    pub fn range(&self, t: u32, a: u64, n: usize, what: &str) -> Result<usize, String> {
        if a.checked_add(n as u64).is_none_or(|end| end > self.data.len() as u64) {
            return Err(format!(
                "out-of-bounds shared {what} of {n} bytes at {a:#x} by {} (shared memory is {} bytes)",
                self.who.who(t),
                self.data.len()
            ));
        }
        if !a.is_multiple_of(n as u64) {
            return Err(format!("misaligned shared {what} of {n} bytes at {a:#x} by {}", self.who.who(t)));
        }
        Ok(a as usize)
    }

    /// No byte of `[o, o + n)` may belong to an unfinished `cp.async`.
    fn check_pending(&self, t: u32, o: usize, n: usize, what: &str) -> Result<(), String> {
        if self.npending == 0 {
            return Ok(());
        }
        let Some(i) = (o..o + n).find(|&i| self.pending[i] != NONE) else { return Ok(()) };
        Err(format!(
            "{} {what} shared byte {i:#x} before the cp.async (line {}) of {} that writes it was \
             waited for (cp.async.wait_group/wait_all)",
            self.who.who(t),
            self.pending_line[i],
            self.who.who(self.pending[i])
        ))
    }

    /// Reads `out.len()` bytes at offset `o` (already range-checked) for thread `t`.
    pub fn read(&mut self, t: u32, o: usize, out: &mut [u8]) -> Result<(), String> {
        let ep = self.warp_ep[(t / 32) as usize];
        self.check_pending(t, o, out.len(), "reads")?;
        for i in o..o + out.len() {
            if !self.init[i] {
                return Err(format!("read of uninitialised shared memory at {o:#x} (byte {i}) by {}", self.who.who(t)));
            }
            let w = self.writer[i];
            if w != NONE && !self.ordered(w, self.writer_ep[i], t) {
                return Err(format!(
                    "shared-memory race at {i:#x}: {} reads what {} wrote since the last barrier",
                    self.who.who(t),
                    self.who.who(w)
                ));
            }
            let r = self.reader[i];
            let warp = t / 32;
            self.reader[i] = if r == NONE || r == t {
                t
            } else if r == MANY {
                MANY
            } else if r >= WARP_BASE {
                // Several lanes of one warp: t replaces them only when all are ordered before it.
                if r - WARP_BASE != warp {
                    MANY
                } else if self.reader_ep[i] < ep {
                    t
                } else {
                    r
                }
            } else if r / 32 != warp {
                MANY
            } else if self.ordered(r, self.reader_ep[i], t) {
                t // the old read is ordered before this one, so before any later write it conflicts with
            } else {
                WARP_BASE + warp
            };
            self.reader_ep[i] = ep;
        }
        out.copy_from_slice(&self.data[o..o + out.len()]);
        Ok(())
    }

    /// Race checks of a write by `t` to `[o, o + n)`, then records `t` as the writer.
    fn claim(&mut self, t: u32, o: usize, n: usize) -> Result<(), String> {
        let ep = self.warp_ep[(t / 32) as usize];
        for i in o..o + n {
            let w = self.writer[i];
            if w != NONE && !self.ordered(w, self.writer_ep[i], t) {
                return Err(format!(
                    "shared-memory race at {i:#x}: {} and {} both write it between two barriers",
                    self.who.who(w),
                    self.who.who(t)
                ));
            }
            let r = self.reader[i];
            let ok = r == NONE
                || (r < WARP_BASE && self.ordered(r, self.reader_ep[i], t))
                || (r != MANY && r >= WARP_BASE && r - WARP_BASE == t / 32 && self.reader_ep[i] < ep);
            if !ok {
                let other = if r >= WARP_BASE { "several threads".to_string() } else { self.who.who(r) };
                return Err(format!(
                    "shared-memory race at {i:#x}: {} writes what {other} read since the last barrier",
                    self.who.who(t)
                ));
            }
            self.writer[i] = t;
            self.writer_ep[i] = ep;
        }
        Ok(())
    }

    /// Writes `x` at offset `o` (already range-checked) for thread `t`.
    pub fn write(&mut self, t: u32, o: usize, x: &[u8]) -> Result<(), String> {
        self.check_pending(t, o, x.len(), "writes")?;
        self.claim(t, o, x.len())?;
        self.init[o..o + x.len()].fill(true);
        self.data[o..o + x.len()].copy_from_slice(x);
        Ok(())
    }

    /// A `cp.async` by `t` will write `[o, o + n)`: it counts as written by `t` now (race
    /// checks), and every access before its completion is an error.
    pub fn begin_async(&mut self, t: u32, o: usize, n: usize, line: usize) -> Result<(), String> {
        for i in o..o + n {
            if self.pending[i] != NONE {
                return Err(format!(
                    "cp.async by {} overlaps the unfinished cp.async of {} at shared byte {i:#x}",
                    self.who.who(t),
                    self.who.who(self.pending[i])
                ));
            }
        }
        self.claim(t, o, n)?;
        self.pending[o..o + n].fill(t);
        self.pending_line[o..o + n].fill(line as u32);
        self.npending += n;
        Ok(())
    }

    /// The `cp.async` of `t` to `[o, o + data.len())` completes: its data lands.
    pub fn end_async(&mut self, t: u32, o: usize, data: &[u8]) -> Result<(), String> {
        self.pending[o..o + data.len()].fill(NONE);
        self.npending -= data.len();
        self.write(t, o, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Shared {
        let mut s = Shared::new(64, 2, Who { block: [64, 1, 1], ctaid: [0; 3] });
        s.write(0, 0, &[0; 64]).unwrap();
        s.barrier();
        s
    }

    fn read(s: &mut Shared, t: u32) -> Result<(), String> {
        s.read(t, 0, &mut [0u8; 4])
    }

    fn write(s: &mut Shared, t: u32) -> Result<(), String> {
        s.write(t, 0, &[1; 4])
    }

    #[test]
    fn lanes_of_one_warp_are_ordered_by_a_warp_sync_only() {
        let mut s = mem();
        write(&mut s, 3).unwrap();
        assert!(read(&mut s, 5).is_err(), "no sync: race");
        let mut s = mem();
        write(&mut s, 3).unwrap();
        s.warp_sync(0);
        read(&mut s, 5).unwrap();
        assert!(read(&mut s, 40).is_err(), "other warp: still a race");
    }

    #[test]
    fn several_readers_of_one_warp_then_a_writer() {
        // Two lanes read in one epoch; after a warp sync a third lane may write.
        let mut s = mem();
        read(&mut s, 1).unwrap();
        read(&mut s, 2).unwrap();
        assert!(write(&mut s, 1).is_err(), "lane 2's read is unordered with lane 1's write");
        let mut s = mem();
        read(&mut s, 1).unwrap();
        read(&mut s, 2).unwrap();
        s.warp_sync(0);
        write(&mut s, 7).unwrap();
        // Readers from two warps: no write before the barrier.
        let mut s = mem();
        read(&mut s, 1).unwrap();
        read(&mut s, 33).unwrap();
        s.warp_sync(0);
        s.warp_sync(1);
        assert!(write(&mut s, 1).is_err());
        s.barrier();
        write(&mut s, 1).unwrap();
    }

    #[test]
    fn an_ordered_earlier_read_is_replaced_by_the_later_one() {
        // Lane 1 reads, warp sync, lane 2 reads: lane 2's read is the one a write by
        // lane 1 conflicts with, and a write by lane 2 itself is fine.
        let mut s = mem();
        read(&mut s, 1).unwrap();
        s.warp_sync(0);
        read(&mut s, 2).unwrap();
        write(&mut s, 2).unwrap();
        let mut s = mem();
        read(&mut s, 1).unwrap();
        s.warp_sync(0);
        read(&mut s, 2).unwrap();
        assert!(write(&mut s, 1).is_err());
    }

    #[test]
    fn pending_async_bytes_block_every_access_until_the_end() {
        let mut s = mem();
        s.begin_async(4, 16, 16, 99).unwrap();
        s.barrier(); // does not complete it
        let e = s.read(9, 16, &mut [0u8; 4]).unwrap_err();
        assert!(e.contains("line 99"), "{e}");
        assert!(s.read(4, 28, &mut [0u8; 4]).is_err(), "the issuing thread too");
        assert!(s.write(4, 20, &[0; 4]).is_err());
        assert!(s.begin_async(5, 24, 8, 100).is_err(), "overlapping copy");
        s.end_async(4, 16, &[7; 16]).unwrap();
        let mut got = [0u8; 4];
        s.read(4, 16, &mut got).unwrap();
        assert_eq!(got, [7; 4]);
        assert!(s.read(9, 16, &mut got).is_err(), "landed by thread 4: a race without a barrier");
    }
}
