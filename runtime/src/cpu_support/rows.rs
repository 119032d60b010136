//! Bulk copies of f32 rows between a tensor and a tile: the loads of a chunk's per-token
//! inputs and the stores of its outputs.
//!
//! A chunk's input tile is `C` rows of `K` floats spaced `H * K` apart in the `[B, T, H, K]`
//! tensor. Cranelift's 16-byte vectors copy such a row as 32 load/store pairs in a counted
//! loop, and the four input loads of a GLA chunk took 16% of the kernel (profile, B1 T2048
//! H8 K=V=128) against 9% when the inputs were L2-resident: part of it is the memory, part the
//! instruction count. This routine copies each row with the C library's `memcpy` (wide
//! vectors, no loop overhead per 16 bytes) and zero-fills the rows past the sequence's end in
//! the same call, as the IR's `Load` requires.

/// Symbol the generated code imports.
pub const ROWS_SYMBOL: &str = "chunkc_copy_rows";

/// Rows at least this wide go through [`copy_rows`]; narrower ones (per-token scalars, a
/// gate column) stay inline, where a call per row would cost more than the copy.
pub const MIN_COLS: usize = 16;

/// Copies `rows` rows of `cols` f32 from `src` (row stride `src_rs`) to `dst` (row stride
/// `dst_rs`), then zero-fills `dst`'s rows `rows..fill_to`. Strides in elements.
///
/// # Safety
/// `src` readable and `dst` writable at every row they are given with `cols` contiguous
/// elements; the two do not overlap.
pub unsafe extern "C" fn copy_rows(
    src: *const f32,
    src_rs: i64,
    dst: *mut f32,
    dst_rs: i64,
    rows: i64,
    cols: i64,
    fill_to: i64,
) {
    let cols = cols.max(0) as usize;
    let rows = rows.max(0);
    for r in 0..rows {
        // SAFETY: the caller's contract for row r.
        unsafe {
            std::ptr::copy_nonoverlapping(src.offset((r * src_rs) as isize), dst.offset((r * dst_rs) as isize), cols)
        };
    }
    for r in rows..fill_to.max(rows) {
        // SAFETY: the caller's contract for row r of dst.
        unsafe { std::ptr::write_bytes(dst.offset((r * dst_rs) as isize), 0, cols) };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rows_are_copied_with_their_strides_and_the_rest_zero_filled() {
        let src: Vec<f32> = (0..5 * 40).map(|i| i as f32).collect();
        let mut dst = vec![f32::NAN; 4 * 24];
        // SAFETY: 3 rows of 20 from a 40-wide source, into 4 rows 24 apart.
        unsafe { super::copy_rows(src.as_ptr().add(2), 40, dst.as_mut_ptr(), 24, 3, 20, 4) };
        for r in 0..4 {
            for c in 0..24 {
                let got = dst[r * 24 + c];
                match (r < 3, c < 20) {
                    (true, true) => assert_eq!(got, (r * 40 + 2 + c) as f32),
                    (false, true) => assert_eq!(got, 0.0),
                    (_, false) => assert!(got.is_nan(), "beyond cols nothing is written"),
                }
            }
        }
    }
}
