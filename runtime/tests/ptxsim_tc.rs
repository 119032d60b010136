//! The PTX simulator's tensor-core, warp-collective and asynchronous instructions on
//! hand-written snippets. Expected results are computed here from the PTX ISA's layout
//! descriptions, written out again independently of the simulator (which is never called
//! except through `launch`), with distinct values per element so that a wrong layout fails.
//! `ptxas_accepts_every_snippet` assembles all snippets when `CHUNKC_PTXAS` is set.

use chunkc_runtime::ptxsim::{launch, GlobalMemory, SimError, SimParam};

fn head(sm: &str) -> String {
    format!(".version 8.0\n.target {sm}\n.address_size 64\n")
}

fn ptx(body: &str) -> String {
    format!("{}{body}", head("sm_80"))
}

fn line_of(src: &str, needle: &str) -> usize {
    src.lines().position(|l| l.contains(needle)).expect("needle in source") + 1
}

fn alloc_u32(mem: &mut GlobalMemory, data: &[u32]) -> u64 {
    let base = mem.alloc(data.len() * 4);
    let bytes = mem.bytes_mut(base, data.len() * 4).expect("fresh buffer");
    for (c, x) in bytes.chunks_exact_mut(4).zip(data) {
        c.copy_from_slice(&x.to_le_bytes());
    }
    base
}

fn read_u32(mem: &GlobalMemory, at: u64, n: usize) -> Vec<u32> {
    let b = mem.bytes(at, n * 4).expect("in bounds");
    b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn read_u16(mem: &GlobalMemory, at: u64, n: usize) -> Vec<u16> {
    let b = mem.bytes(at, n * 2).expect("in bounds");
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// Runs a one-warp kernel `k(in0, in1, ..., out)` with u64 pointer parameters.
fn run_warp(src: &str, ptrs: &[u64], threads: u32, smem: usize, mem: &mut GlobalMemory) -> Result<(), SimError> {
    let params: Vec<SimParam> = ptrs.iter().map(|&p| SimParam::U64(p)).collect();
    launch(src, "k", [1, 1, 1], [threads, 1, 1], smem, &params, mem).map(|_| ())
}

// ---------------------------------------------------------------------------------------
// Encoders/decoders of the narrow formats, for exactly representable values only.

fn bf16_of(x: f32) -> u16 {
    assert_eq!(x.to_bits() & 0xFFFF, 0, "{x} is not a bf16");
    (x.to_bits() >> 16) as u16
}

fn f16_of(x: f32) -> u16 {
    if x == 0.0 {
        return 0;
    }
    let b = x.to_bits();
    let e = ((b >> 23) & 0xFF) as i32 - 127 + 15;
    assert!((1..31).contains(&e) && b & 0x1FFF == 0, "{x} is not a normal f16");
    (((b >> 16) & 0x8000) | ((e as u32) << 10) | ((b >> 13) & 0x3FF)) as u16
}

fn f16_value(h: u16) -> f64 {
    let s = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let e = ((h >> 10) & 0x1F) as i32;
    let m = (h & 0x3FF) as f64;
    match e {
        0 => s * m * 2f64.powi(-24),
        31 if m == 0.0 => s * f64::INFINITY,
        31 => f64::NAN,
        _ => s * (1.0 + m / 1024.0) * 2f64.powi(e - 15),
    }
}

fn bf16_value(h: u16) -> f64 {
    f32::from_bits((h as u32) << 16) as f64
}

// ---------------------------------------------------------------------------------------
// mma

/// Loads per-lane fragments (A: 4 words, B: 2, C: 4 at lane*16/lane*8/lane*16 bytes), runs
/// one mma and stores D (4 words per lane).
fn mma_kernel(shape_types: &str) -> String {
    ptx(&format!(
        r#"
.visible .entry k(
	.param .u64 k_a,
	.param .u64 k_b,
	.param .u64 k_c,
	.param .u64 k_d
)
{{
	.reg .b32 %r<12>;
	.reg .f32 %f<8>;
	.reg .b64 %rd<12>;
	ld.param.u64 %rd0, [k_a];
	ld.param.u64 %rd1, [k_b];
	ld.param.u64 %rd2, [k_c];
	ld.param.u64 %rd3, [k_d];
	cvta.to.global.u64 %rd0, %rd0;
	cvta.to.global.u64 %rd1, %rd1;
	cvta.to.global.u64 %rd2, %rd2;
	cvta.to.global.u64 %rd3, %rd3;
	mov.u32 %r0, %laneid;
	mul.wide.u32 %rd4, %r0, 16;
	mul.wide.u32 %rd5, %r0, 8;
	add.s64 %rd6, %rd0, %rd4;
	add.s64 %rd7, %rd1, %rd5;
	add.s64 %rd8, %rd2, %rd4;
	add.s64 %rd9, %rd3, %rd4;
	ld.global.v4.b32 {{%r1, %r2, %r3, %r4}}, [%rd6];
	ld.global.v2.b32 {{%r5, %r6}}, [%rd7];
	ld.global.v4.f32 {{%f0, %f1, %f2, %f3}}, [%rd8];
	mma.sync.aligned.{shape_types} {{%f4, %f5, %f6, %f7}}, {{%r1, %r2, %r3, %r4}}, {{%r5, %r6}}, {{%f0, %f1, %f2, %f3}};
	st.global.v4.f32 [%rd9], {{%f4, %f5, %f6, %f7}};
	ret;
}}
"#
    ))
}

/// Distinct small dyadic values, exact in bf16, f16 and tf32.
fn a_val(i: usize, k: usize) -> f32 {
    ((i * 16 + k) % 37) as f32 / 8.0 - 2.25
}
fn b_val(k: usize, j: usize) -> f32 {
    ((k * 8 + j) % 29) as f32 / 4.0 - 3.5
}
fn c_val(i: usize, j: usize) -> f32 {
    (i * 8 + j) as f32 * 0.5 - 20.0
}

/// The accumulator layout (the same for m16n8k16 and m16n8k8): c_i of lane l is at
/// row groupID (+8 for i >= 2), col threadID_in_group * 2 + (i & 1).
fn c_pos(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = (lane / 4, lane % 4);
    (group + if i >= 2 { 8 } else { 0 }, tig * 2 + (i & 1))
}

fn c_fragments() -> Vec<u32> {
    let mut c = vec![];
    for lane in 0..32 {
        for i in 0..4 {
            let (r, col) = c_pos(lane, i);
            c.push(c_val(r, col).to_bits());
        }
    }
    c
}

fn check_d(mem: &GlobalMemory, pd: u64, kdim: usize) {
    let d = read_u32(mem, pd, 128);
    for lane in 0..32 {
        for i in 0..4 {
            let (r, col) = c_pos(lane, i);
            let want: f64 =
                (0..kdim).map(|k| a_val(r, k) as f64 * b_val(k, col) as f64).sum::<f64>() + c_val(r, col) as f64;
            assert_eq!(f32::from_bits(d[lane * 4 + i]) as f64, want, "lane {lane} d{i} (row {r}, col {col})");
        }
    }
}

/// m16n8k16 with 16-bit inputs: A reg j of lane l holds a_{2j} (low half) and a_{2j+1};
/// a_i is at row groupID (+8 for i in {2,3,6,7}), col tig*2 + (i&1) (+8 for i >= 4).
/// B reg j holds b_{2j}, b_{2j+1}; b_i is at row tig*2 + (i&1) (+8 for i >= 2), col groupID.
fn run_mma_k16(types: &str, enc: fn(f32) -> u16) {
    let (mut a, mut b) = (vec![], vec![]);
    for lane in 0..32 {
        let (group, tig) = (lane / 4, lane % 4);
        let a_elem = |i: usize| {
            let row = group + if matches!(i, 2 | 3 | 6 | 7) { 8 } else { 0 };
            let col = tig * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
            enc(a_val(row, col)) as u32
        };
        for j in 0..4 {
            a.push(a_elem(2 * j) | (a_elem(2 * j + 1) << 16));
        }
        let b_elem = |i: usize| {
            let row = tig * 2 + (i & 1) + if i >= 2 { 8 } else { 0 };
            enc(b_val(row, group)) as u32
        };
        for j in 0..2 {
            b.push(b_elem(2 * j) | (b_elem(2 * j + 1) << 16));
        }
    }
    let mut mem = GlobalMemory::new();
    let pa = alloc_u32(&mut mem, &a);
    let pb = alloc_u32(&mut mem, &b);
    let pc = alloc_u32(&mut mem, &c_fragments());
    let pd = mem.alloc(512);
    let src = mma_kernel(&format!("m16n8k16.row.col.f32.{types}.f32"));
    run_warp(&src, &[pa, pb, pc, pd], 32, 0, &mut mem).expect("mma runs");
    check_d(&mem, pd, 16);
}

#[test]
fn mma_m16n8k16_bf16_fragment_layout() {
    run_mma_k16("bf16.bf16", bf16_of);
}

#[test]
fn mma_m16n8k16_f16_fragment_layout() {
    run_mma_k16("f16.f16", f16_of);
}

/// m16n8k8 tf32: a_i (one per register) at row groupID (+8 for i odd), col tig (+4 for
/// i >= 2); b_i at row tig (+4 for i = 1), col groupID.
#[test]
fn mma_m16n8k8_tf32_fragment_layout() {
    let (mut a, mut b) = (vec![], vec![]);
    for lane in 0..32 {
        let (group, tig) = (lane / 4, lane % 4);
        for i in 0..4 {
            let row = group + if i % 2 == 1 { 8 } else { 0 };
            let col = tig + if i >= 2 { 4 } else { 0 };
            a.push(a_val(row, col).to_bits());
        }
        for i in 0..2 {
            b.push(b_val(tig + 4 * i, group).to_bits());
        }
    }
    let mut mem = GlobalMemory::new();
    let pa = alloc_u32(&mut mem, &a);
    let pb = alloc_u32(&mut mem, &b);
    let pc = alloc_u32(&mut mem, &c_fragments());
    let pd = mem.alloc(512);
    let src = mma_kernel("m16n8k8.row.col.f32.tf32.tf32.f32");
    run_warp(&src, &[pa, pb, pc, pd], 32, 0, &mut mem).expect("mma runs");
    check_d(&mem, pd, 8);
}

#[test]
fn mma_rounds_the_exact_sum_once() {
    // A = 1 everywhere in row 0 / B column 0 = [1, 2^-24, 2^-24, ...]: summed in f32 step
    // by step, 1 + 2^-24 rounds back to 1 each time; summed exactly, 15 * 2^-24 survives
    // (rounded once to f32: 1 + 16 * 2^-24 would be the nearest, 1 + 14 * 2^-24 the other).
    let tiny = 2f32.powi(-24);
    let (mut a, mut b) = (vec![], vec![]);
    let bv = |k: usize| if k == 0 { 1.0 } else { tiny };
    for lane in 0..32 {
        let tig = lane % 4;
        for _ in 0..4 {
            a.push(bf16_of(1.0) as u32 | (bf16_of(1.0) as u32) << 16);
        }
        for j in 0..2 {
            let e = |i: usize| bf16_of(bv(tig * 2 + (i & 1) + if i >= 2 { 8 } else { 0 })) as u32;
            b.push(e(2 * j) | e(2 * j + 1) << 16);
        }
    }
    let mut mem = GlobalMemory::new();
    let pa = alloc_u32(&mut mem, &a);
    let pb = alloc_u32(&mut mem, &b);
    let pc = alloc_u32(&mut mem, &[0u32; 128]);
    let pd = mem.alloc(512);
    let src = mma_kernel("m16n8k16.row.col.f32.bf16.bf16.f32");
    run_warp(&src, &[pa, pb, pc, pd], 32, 0, &mut mem).expect("mma runs");
    let d = read_u32(&mem, pd, 128);
    let want = (1.0f64 + 15.0 * tiny as f64) as f32;
    assert_eq!(f32::from_bits(d[0]), want);
    assert!(want > 1.0);
}

#[test]
fn mma_needs_the_whole_warp() {
    let mut mem = GlobalMemory::new();
    let p = mem.alloc(4096);
    let src = mma_kernel("m16n8k16.row.col.f32.bf16.bf16.f32");
    let e = run_warp(&src, &[p, p, p, p + 2048], 16, 0, &mut mem).expect_err("half a warp");
    assert!(e.message.contains("needs a full warp"), "{e}");
    assert_eq!(e.line, line_of(&src, "mma.sync"));
}

// ---------------------------------------------------------------------------------------
// ldmatrix

/// Copies 512 bytes of global into shared (16 per lane), then each lane passes the shared
/// address `row_off[lane]` to one ldmatrix and stores its registers at out[lane * 4 + i].
fn ldmatrix_kernel(variant: &str, nregs: usize) -> String {
    let regs: Vec<String> = (0..nregs).map(|i| format!("%r{}", 10 + i)).collect();
    let stores: String =
        regs.iter().enumerate().map(|(i, r)| format!("\tst.global.b32 [%rd9+{}], {r};\n", 4 * i)).collect();
    ptx(&format!(
        r#"
.visible .entry k(
	.param .u64 k_src,
	.param .u64 k_rows,
	.param .u64 k_out
)
{{
	.reg .b32 %r<16>;
	.reg .b64 %rd<12>;
	.shared .align 16 .b8 tile[512];
	ld.param.u64 %rd0, [k_src];
	ld.param.u64 %rd1, [k_rows];
	ld.param.u64 %rd2, [k_out];
	mov.u32 %r0, %laneid;
	mul.wide.u32 %rd3, %r0, 16;
	add.s64 %rd4, %rd0, %rd3;
	ld.global.v4.b32 {{%r1, %r2, %r3, %r4}}, [%rd4];
	mov.u64 %rd5, tile;
	add.s64 %rd6, %rd5, %rd3;
	st.shared.v4.b32 [%rd6], {{%r1, %r2, %r3, %r4}};
	bar.sync 0;
	mul.wide.u32 %rd7, %r0, 4;
	add.s64 %rd8, %rd1, %rd7;
	ld.global.u32 %r5, [%rd8];
	mov.u32 %r6, tile;
	add.u32 %r7, %r6, %r5;
	ldmatrix.sync.aligned.m8n8.{variant}.shared.b16 {{{}}}, [%r7];
	add.s64 %rd9, %rd2, %rd3;
{stores}	ret;
}}
"#,
        regs.join(", ")
    ))
}

fn ldmatrix_case(num: usize, trans: bool) {
    // Element (m, r, c) of matrix m is at shared row slot slot(m, r), column c, value
    // m * 64 + r * 8 + c + 1000 (distinct).
    let slot = |m: usize, r: usize| m * 8 + (r * 5 + m) % 8;
    let mut tile = vec![0u16; 256];
    for m in 0..4 {
        for r in 0..8 {
            for c in 0..8 {
                tile[slot(m, r) * 8 + c] = (m * 64 + r * 8 + c + 1000) as u16;
            }
        }
    }
    let words: Vec<u32> = tile.chunks(2).map(|p| p[0] as u32 | (p[1] as u32) << 16).collect();
    // Lanes 8m..8m+7 give the rows of matrix m; the lanes past the last matrix give a
    // misaligned address, which the ISA says is not used.
    let rows: Vec<u32> = (0..32).map(|l| if l < 8 * num { (slot(l / 8, l % 8) * 16) as u32 } else { 3 }).collect();
    let mut mem = GlobalMemory::new();
    let ps = alloc_u32(&mut mem, &words);
    let pr = alloc_u32(&mut mem, &rows);
    let po = alloc_u32(&mut mem, &[0xDEAD_BEEF; 128]);
    let variant = format!("x{num}{}", if trans { ".trans" } else { "" });
    let src = ldmatrix_kernel(&variant, num);
    run_warp(&src, &[ps, pr, po], 32, 0, &mut mem).expect("ldmatrix runs");
    let out = read_u32(&mem, po, 128);
    let val = |m: usize, r: usize, c: usize| (m * 64 + r * 8 + c + 1000) as u32;
    for lane in 0..32 {
        for m in 0..4 {
            let got = out[lane * 4 + m];
            if m >= num {
                assert_eq!(got, 0xDEAD_BEEF);
                continue;
            }
            // Lane l holds row l/4, elements 2(l%4) and 2(l%4)+1 of its matrix (of the
            // transposed matrix with .trans), the first in the low half.
            let (r, c) = (lane / 4, 2 * (lane % 4));
            let want =
                if trans { val(m, c, r) | val(m, c + 1, r) << 16 } else { val(m, r, c) | val(m, r, c + 1) << 16 };
            assert_eq!(got, want, "{variant}: lane {lane} matrix {m}: {got:#x} vs {want:#x}");
        }
    }
}

#[test]
fn ldmatrix_x1_x2_x4_and_trans() {
    for num in [1, 2, 4] {
        ldmatrix_case(num, false);
        ldmatrix_case(num, true);
    }
}

/// The same with a generic address (no `.shared`): `cvta.shared` of the tile plus the row.
fn ldmatrix_generic_kernel() -> String {
    ldmatrix_kernel("x4", 4)
        .replace(".shared.b16", ".b16")
        .replace(
            "\tadd.u32 %r7, %r6, %r5;\n",
            "\tcvta.shared.u64 %rd10, %rd5;\n\tcvt.u64.u32 %rd11, %r5;\n\tadd.s64 %rd10, %rd10, %rd11;\n",
        )
        .replace("[%r7];", "[%rd10];")
}

#[test]
fn ldmatrix_with_a_generic_address() {
    let src = ldmatrix_generic_kernel();
    assert!(src.contains("cvta.shared.u64") && !src.contains(".shared.b16"));
    let words: Vec<u32> = (0..128u32).map(|i| (2 * i) | (2 * i + 1) << 16).collect();
    let rows: Vec<u32> = (0..32).map(|l| l * 16).collect();
    let mut mem = GlobalMemory::new();
    let ps = alloc_u32(&mut mem, &words);
    let pr = alloc_u32(&mut mem, &rows);
    let po = mem.alloc(512);
    run_warp(&src, &[ps, pr, po], 32, 0, &mut mem).expect("generic ldmatrix runs");
    let out = read_u32(&mem, po, 128);
    // Element (m, r, c) is tile[(8 m + r) * 8 + c] = (8 m + r) * 8 + c.
    for lane in 0..32 {
        for m in 0..4 {
            let e = ((8 * m + lane / 4) * 8 + 2 * (lane % 4)) as u32;
            assert_eq!(out[lane * 4 + m], e | (e + 1) << 16, "lane {lane} matrix {m}");
        }
    }
    // A global address is not in shared memory: an error naming the line.
    let bad = src.replace("cvta.shared.u64 %rd10, %rd5;", "mov.u64 %rd10, %rd0;");
    let e = run_warp(&bad, &[ps, pr, po], 32, 0, &mut mem).expect_err("global address");
    assert!(e.message.contains("not in shared memory"), "{e}");
    assert_eq!(e.line, line_of(&bad, "ldmatrix"));
}

#[test]
fn ldmatrix_misaligned_and_uninitialised_rows_are_errors() {
    let src = ldmatrix_kernel("x2", 2);
    let mut mem = GlobalMemory::new();
    let ps = alloc_u32(&mut mem, &[7; 128]);
    let mut rows: Vec<u32> = (0..32).map(|l| (l % 16) * 16).collect();
    rows[9] = 8; // lane 9 gives a row address of matrix 1 that is not 16-byte aligned
    let pr = alloc_u32(&mut mem, &rows);
    let po = mem.alloc(512);
    let e = run_warp(&src, &[ps, pr, po], 32, 0, &mut mem).expect_err("misaligned");
    assert!(e.message.contains("misaligned"), "{e}");
    assert_eq!(e.line, line_of(&src, "ldmatrix"));
    // Past the 512 bytes written: a declared but never written tile (a bigger static one).
    let big = src.replace("tile[512]", "tile[1024]");
    let rows: Vec<u32> = (0..32).map(|l| if l == 5 { 512 } else { (l % 16) * 16 }).collect();
    let pr = alloc_u32(&mut mem, &rows);
    let e = run_warp(&big, &[ps, pr, po], 32, 0, &mut mem).expect_err("uninitialised");
    assert!(e.message.contains("uninitialised shared memory"), "{e}");
    let rows: Vec<u32> = (0..32).map(|l| if l == 5 { 4096 } else { (l % 16) * 16 }).collect();
    let pr = alloc_u32(&mut mem, &rows);
    let e = run_warp(&big, &[ps, pr, po], 32, 0, &mut mem).expect_err("out of bounds");
    assert!(e.message.contains("out-of-bounds shared ldmatrix read"), "{e}");
}

// ---------------------------------------------------------------------------------------
// shfl

fn shfl_kernel(mode: &str, b: &str, c: &str) -> String {
    ptx(&format!(
        r#"
.visible .entry k(
	.param .u64 k_out
)
{{
	.reg .b32 %r<8>;
	.reg .b64 %rd<4>;
	.reg .pred %p<2>;
	ld.param.u64 %rd0, [k_out];
	mov.u32 %r0, %laneid;
	mad.lo.u32 %r1, %r0, 10, 7;
	shfl.sync.{mode}.b32 %r2|%p0, %r1, {b}, {c}, 0xffffffff;
	selp.u32 %r3, 1, 0, %p0;
	mul.wide.u32 %rd1, %r0, 8;
	add.s64 %rd2, %rd0, %rd1;
	st.global.v2.u32 [%rd2], {{%r2, %r3}};
	ret;
}}
"#
    ))
}

/// CUDA's `__shfl_*_sync(mask, v, x, width)` semantics (the programming guide's), as the
/// independent oracle: the source lane, or None when the lane keeps its own value.
fn cuda_shfl(mode: &str, lane: usize, x: usize, width: usize) -> Option<usize> {
    let base = lane / width * width;
    match mode {
        "up" => (lane % width >= x).then(|| lane - x),
        "down" => (lane % width + x < width).then_some(lane + x),
        "bfly" => ((lane ^ x) < base + width).then_some(lane ^ x),
        _ => Some(base + x % width),
    }
}

#[test]
fn shfl_sync_in_all_modes_with_segments() {
    for mode in ["up", "down", "bfly", "idx"] {
        for width in [32usize, 16, 8, 4] {
            for x in [0usize, 1, 3, 6] {
                // CUDA packs c = ((32 - width) << 8) | clamp, clamp 0 for up, 31 otherwise.
                let clamp = if mode == "up" { 0 } else { 0x1F };
                let c = ((32 - width) << 8) | clamp;
                let src = shfl_kernel(mode, &x.to_string(), &c.to_string());
                let mut mem = GlobalMemory::new();
                let po = mem.alloc(256);
                run_warp(&src, &[po], 32, 0, &mut mem).expect("shfl runs");
                let out = read_u32(&mem, po, 64);
                for lane in 0..32 {
                    let from = cuda_shfl(mode, lane, x, width);
                    let want = (from.unwrap_or(lane) * 10 + 7) as u32;
                    let ctx = format!("{mode} width {width} x {x} lane {lane}");
                    assert_eq!(out[2 * lane], want, "{ctx}");
                    // The predicate: whether the source lane was in range (idx: always).
                    assert_eq!(out[2 * lane + 1], u32::from(from.is_some()), "{ctx}");
                }
            }
        }
    }
}

const BUTTERFLY: &str = r#"
.visible .entry k(
	.param .u64 k_out
)
{
	.reg .b32 %r<8>;
	.reg .f32 %f<4>;
	.reg .b64 %rd<4>;
	.reg .pred %p<2>;
	ld.param.u64 %rd0, [k_out];
	mov.u32 %r0, %laneid;
	cvt.rn.f32.u32 %f0, %r0;
	mov.u32 %r1, 16;
$L_loop:
	mov.b32 %r2, %f0;
	shfl.sync.bfly.b32 %r3, %r2, %r1, 31, -1;
	mov.b32 %f1, %r3;
	add.rn.f32 %f0, %f0, %f1;
	shr.u32 %r1, %r1, 1;
	setp.ne.u32 %p0, %r1, 0;
	@%p0 bra.uni $L_loop;
	mul.wide.u32 %rd1, %r0, 4;
	add.s64 %rd2, %rd0, %rd1;
	st.global.f32 [%rd2], %f0;
	ret;
}
"#;

#[test]
fn shfl_with_register_operands_and_butterfly_reduction() {
    // A warp sum by xor-butterfly, lane operand from a register.
    let mut mem = GlobalMemory::new();
    let po = mem.alloc(128);
    run_warp(&ptx(BUTTERFLY), &[po], 32, 0, &mut mem).expect("reduction runs");
    assert_eq!(mem.read_f32(po, 32).unwrap(), vec![496.0; 32]);
}

const DIVERGENT: &str = r#"
.visible .entry k(
	.param .u64 k_out
)
{
	.reg .b32 %r<8>;
	.reg .b64 %rd<4>;
	.reg .pred %p<2>;
	ld.param.u64 %rd0, [k_out];
	mov.u32 %r0, %laneid;
	setp.lt.u32 %p0, %r0, 16;
	@%p0 bra $L_low;
	shfl.sync.idx.b32 %r1, %r0, 16, 31, 0xffffffff; // high
	bra $L_end;
$L_low:
	shfl.sync.idx.b32 %r1, %r0, 0, 31, 0xffffffff; // low
$L_end:
	ret;
}
"#;

#[test]
fn divergent_collectives_are_reported() {
    // Lanes 0-15 reach one shfl, lanes 16-31 another.
    let src = ptx(DIVERGENT);
    let mut mem = GlobalMemory::new();
    let po = mem.alloc(128);
    let e = run_warp(&src, &[po], 32, 0, &mut mem).expect_err("divergent");
    assert!(e.message.contains("divergent collective"), "{e}");
    assert_eq!(e.line, line_of(&src, "// low"), "{e}");
    assert!(e.message.contains(&format!("waits at line {}", line_of(&src, "// high"))), "{e}");

    // Half the warp exits before a full-mask shfl.
    let exits = src.replace("@%p0 bra $L_low;", "@%p0 bra $L_end;");
    let e = run_warp(&exits, &[po], 32, 0, &mut mem).expect_err("exited lanes");
    assert!(e.message.contains("divergent collective") && e.message.contains("has exited"), "{e}");

    // With a membermask naming only its half, each half's shfl is fine.
    let halves =
        src.replace("0xffffffff; // high", "0xffff0000; // high").replace("0xffffffff; // low", "0x0000ffff; // low");
    run_warp(&halves, &[po], 32, 0, &mut mem).expect("per-half membermasks");
}

const WARP_SYNC: &str = r#"
.visible .entry k(
	.param .u64 k_out
)
{
	.reg .b32 %r<8>;
	.reg .b64 %rd<4>;
	.reg .pred %p<2>;
	.shared .align 4 .b32 word;
	ld.param.u64 %rd0, [k_out];
	mov.u32 %r0, %laneid;
	setp.ne.u32 %p0, %r0, 0;
	@%p0 bra $L_skip;
	mov.u32 %r3, 42;
	st.shared.u32 [word], %r3;
$L_skip:
	//SYNC
	setp.ne.u32 %p1, %r0, 1;
	@%p1 bra $L_end;
	ld.shared.u32 %r1, [word];
	st.global.u32 [%rd0], %r1;
$L_end:
	ret;
}
"#;

#[test]
fn warp_sync_orders_shared_accesses_within_the_warp() {
    // Lane 0 writes a word, lane 1 reads it: a race without bar.warp.sync, fine with it.
    let mut mem = GlobalMemory::new();
    let po = mem.alloc(4);
    let racy = ptx(WARP_SYNC);
    let e = run_warp(&racy, &[po], 32, 0, &mut mem).expect_err("race");
    assert!(e.message.contains("shared-memory race"), "{e}");
    assert_eq!(e.line, line_of(&racy, "ld.shared.u32"));
    let synced = ptx(&WARP_SYNC.replace("//SYNC", "bar.warp.sync 0xffffffff;"));
    run_warp(&synced, &[po], 32, 0, &mut mem).expect("ordered by the warp sync");
    assert_eq!(read_u32(&mem, po, 1), [42]);
    // Across warps a warp sync orders nothing: lane 0 of warp 1 reads what warp 0 wrote.
    let other = synced.replace("%laneid", "%tid.x").replace("setp.ne.u32 %p1, %r0, 1;", "setp.ne.u32 %p1, %r0, 32;");
    let e = run_warp(&other, &[po], 64, 0, &mut mem).expect_err("cross-warp race");
    assert!(e.message.contains("shared-memory race"), "{e}");
}

// ---------------------------------------------------------------------------------------
// cp.async

/// Each of 32 threads copies 16 bytes (ca, or the given form) of `src` to shared at 16 *
/// tid, then `//WAIT`, a barrier, and stores the 16 bytes of its neighbour (tid + 1) % 32.
fn cp_async_kernel(copy: &str, wait: &str) -> String {
    ptx(&r#"
.visible .entry k(
	.param .u64 k_src,
	.param .u64 k_out
)
{
	.reg .b32 %r<8>;
	.reg .f32 %f<4>;
	.reg .b64 %rd<12>;
	.shared .align 16 .b8 buf[512];
	ld.param.u64 %rd0, [k_src];
	ld.param.u64 %rd1, [k_out];
	cvta.to.global.u64 %rd0, %rd0;
	mov.u32 %r0, %tid.x;
	mul.wide.u32 %rd2, %r0, 16;
	add.s64 %rd3, %rd0, %rd2;
	mov.u32 %r1, buf;
	shl.b32 %r2, %r0, 4;
	add.u32 %r3, %r1, %r2;
	COPY
	WAIT
	bar.sync 0;
	add.u32 %r4, %r0, 1;
	and.b32 %r4, %r4, 31;
	shl.b32 %r5, %r4, 4;
	add.u32 %r6, %r1, %r5;
	ld.shared.v4.f32 {%f0, %f1, %f2, %f3}, [%r6];
	add.s64 %rd4, %rd1, %rd2;
	st.global.v4.f32 [%rd4], {%f0, %f1, %f2, %f3};
	ret;
}
"#
    .replace("COPY", copy)
    .replace("WAIT", wait))
}

fn run_cp(copy: &str, wait: &str) -> (String, Result<Vec<f32>, SimError>) {
    let src = cp_async_kernel(copy, wait);
    let xs: Vec<f32> = (0..128).map(|i| i as f32 + 0.5).collect();
    let mut mem = GlobalMemory::new();
    let ps = mem.alloc_f32(&xs);
    let po = mem.alloc(512);
    let r = run_warp(&src, &[ps, po], 32, 0, &mut mem).map(|_| mem.read_f32(po, 128).unwrap());
    (src, r)
}

fn neighbour_rows(valid: usize) -> Vec<f32> {
    (0..128)
        .map(|i| {
            let (t, w) = (i / 4, i % 4);
            let n = (t + 1) % 32;
            if w * 4 < valid {
                (n * 4 + w) as f32 + 0.5
            } else {
                0.0
            }
        })
        .collect()
}

#[test]
fn cp_async_lands_after_the_wait() {
    let copy = "cp.async.ca.shared.global [%r3], [%rd3], 16;\n\tcp.async.commit_group;";
    let (_, r) = run_cp(copy, "cp.async.wait_group 0;");
    assert_eq!(r.expect("runs"), neighbour_rows(16));
    // .cg, the ::cta spelling, and wait_all (which also covers an uncommitted copy).
    let (_, r) = run_cp("cp.async.cg.shared::cta.global [%r3], [%rd3], 16;", "cp.async.wait_all;");
    assert_eq!(r.expect("runs"), neighbour_rows(16));
    // Four 4-byte copies and two 8-byte ones in two groups.
    let small = "cp.async.ca.shared.global [%r3], [%rd3], 4;\n\
                 \tcp.async.ca.shared.global [%r3+4], [%rd3+4], 4;\n\
                 \tcp.async.commit_group;\n\
                 \tcp.async.ca.shared.global [%r3+8], [%rd3+8], 8;\n\
                 \tcp.async.commit_group;";
    let (_, r) = run_cp(small, "cp.async.wait_group 0;");
    assert_eq!(r.expect("runs"), neighbour_rows(16));
}

#[test]
fn cp_async_src_size_zero_fills() {
    let (_, r) = run_cp("cp.async.ca.shared.global [%r3], [%rd3], 16, 8;", "cp.async.wait_all;");
    assert_eq!(r.expect("runs"), neighbour_rows(8));
    let (_, r) = run_cp("cp.async.cg.shared.global [%r3], [%rd3], 16, 0;", "cp.async.wait_all;");
    assert_eq!(r.expect("runs"), neighbour_rows(0));
}

#[test]
fn reading_a_cp_async_destination_before_the_wait_is_an_error() {
    let copy = "cp.async.ca.shared.global [%r3], [%rd3], 16;\n\tcp.async.commit_group;";
    // No wait at all: the barrier does not complete the copy.
    let (src, r) = run_cp(copy, "");
    let e = r.expect_err("read before any wait");
    assert!(e.message.contains("before the cp.async"), "{e}");
    assert_eq!(e.line, line_of(&src, "ld.shared.v4.f32"));
    assert!(e.message.contains(&format!("line {}", line_of(&src, "cp.async.ca"))), "{e}");
    // A thread reading its own destination before its wait.
    let (src, r) = run_cp(copy, "ld.shared.f32 %f0, [%r3];\n\tcp.async.wait_group 0;");
    let e = r.expect_err("own read before the wait");
    assert_eq!(e.line, line_of(&src, "ld.shared.f32 %f0, [%r3]"), "{e}");
    // Writing it before the wait.
    let (src, r) = run_cp(copy, "st.shared.f32 [%r3], %f0;\n\tcp.async.wait_group 0;");
    let e = r.expect_err("write before the wait");
    assert!(e.message.contains("writes shared byte"), "{e}");
    assert_eq!(e.line, line_of(&src, "st.shared.f32 [%r3], %f0"), "{e}");
    // wait_group 1 with two groups completes only the older one.
    let two = "cp.async.ca.shared.global [%r3], [%rd3], 8;\n\
               \tcp.async.commit_group;\n\
               \tcp.async.ca.shared.global [%r3+8], [%rd3+8], 8;\n\
               \tcp.async.commit_group;";
    let (src, r) = run_cp(two, "cp.async.wait_group 1;\n\tld.shared.f32 %f0, [%r3+4];\n\tld.shared.f32 %f0, [%r3+8];");
    let e = r.expect_err("the newer group is still pending");
    assert_eq!(e.line, line_of(&src, "ld.shared.f32 %f0, [%r3+8]"), "{e}");
    // An uncommitted copy is not covered by wait_group.
    let (_, r) = run_cp("cp.async.ca.shared.global [%r3], [%rd3], 16;", "cp.async.wait_group 0;");
    assert!(r.expect_err("uncommitted").message.contains("before the cp.async"));
}

#[test]
fn cp_async_checks_bounds_alignment_and_races() {
    let (src, r) = run_cp("cp.async.ca.shared.global [%r3+4], [%rd3], 16;", "cp.async.wait_all;");
    let e = r.expect_err("misaligned destination");
    assert!(e.message.contains("misaligned shared cp.async destination"), "{e}");
    assert_eq!(e.line, line_of(&src, "cp.async.ca"));
    let (_, r) = run_cp("cp.async.ca.shared.global [%r3], [%rd3+2048], 16;", "cp.async.wait_all;");
    assert!(r.expect_err("source OOB").message.contains("out-of-bounds cp.async source"));
    // Two threads copying into the same bytes between barriers race.
    let (_, r) = run_cp("cp.async.ca.shared.global [%r1], [%rd3], 16;", "cp.async.wait_all;");
    let e = r.expect_err("race");
    assert!(e.message.contains("shared-memory race"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Conversions

/// Thread i converts x[i]: out16[i*8..] = {bf16, f16, f32->f16->f32 check word lo, hi},
/// out32[i*8..] = {tf32 rna, f32(bf16(x)), f32(f16(x)), bf16x2(x, -x), f16x2(x, -x)}.
const CVT: &str = r#"
.visible .entry k(
	.param .u64 k_x,
	.param .u64 k_out16,
	.param .u64 k_out32
)
{
	.reg .b16 %h<6>;
	.reg .b32 %r<12>;
	.reg .f32 %f<8>;
	.reg .b64 %rd<12>;
	ld.param.u64 %rd0, [k_x];
	ld.param.u64 %rd1, [k_out16];
	ld.param.u64 %rd2, [k_out32];
	mov.u32 %r0, %tid.x;
	mul.wide.u32 %rd3, %r0, 4;
	add.s64 %rd4, %rd0, %rd3;
	ld.global.f32 %f0, [%rd4];
	neg.f32 %f1, %f0;
	cvt.rn.bf16.f32 %h0, %f0;
	cvt.rn.f16.f32 %h1, %f0;
	mul.wide.u32 %rd5, %r0, 4;
	add.s64 %rd6, %rd1, %rd5;
	st.global.b16 [%rd6], %h0;
	st.global.b16 [%rd6+2], %h1;
	cvt.rna.tf32.f32 %r1, %f0;
	cvt.f32.bf16 %f2, %h0;
	cvt.f32.f16 %f3, %h1;
	cvt.rn.bf16x2.f32 %r2, %f0, %f1;
	cvt.rn.f16x2.f32 %r3, %f0, %f1;
	mov.b32 {%h2, %h3}, %r3;
	mov.b32 %r4, {%h3, %h2};
	mul.wide.u32 %rd7, %r0, 32;
	add.s64 %rd8, %rd2, %rd7;
	st.global.v4.b32 [%rd8], {%r1, %r2, %r3, %r4};
	st.global.v2.f32 [%rd8+16], {%f2, %f3};
	ret;
}
"#;

/// Reference rounding of x to a format with `mant` fraction bits, smallest normal exponent
/// `emin` and largest finite value `max`, in f64 (x is an f32, so everything is exact).
fn round_ref(x: f64, mant: i32, emin: i32, max: f64, ties_away: bool) -> f64 {
    if x.is_nan() || x.is_infinite() || x == 0.0 {
        return x;
    }
    let e = x.abs().log2().floor() as i32;
    // log2 can be off by one near powers of two; fix e so that 2^e <= |x| < 2^(e+1).
    let e = if 2f64.powi(e) > x.abs() {
        e - 1
    } else if 2f64.powi(e + 1) <= x.abs() {
        e + 1
    } else {
        e
    };
    let q = 2f64.powi(e.max(emin) - mant);
    let y = x / q;
    let r = if ties_away { y.round() } else { y.round_ties_even() };
    let v = r * q;
    if v.abs() > max {
        f64::INFINITY.copysign(x)
    } else if v == 0.0 {
        0.0f64.copysign(x)
    } else {
        v
    }
}

fn same(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a == b && a.is_sign_negative() == b.is_sign_negative())
}

#[test]
fn cvt_rounding_on_edge_values() {
    let p = |e: i32| 2f32.powi(e);
    let xs: Vec<f32> = vec![
        1.0 + p(-11),                // f16 tie -> even (1)
        1.0 + 3.0 * p(-11),          // f16 tie -> even (1 + 2^-9)
        -(1.0 + p(-11)),             // negative tie
        1.0 + p(-8),                 // bf16 tie -> 1
        1.0 + 3.0 * p(-8),           // bf16 tie -> up
        1.0 + p(-8) + p(-20),        // bf16 just above the tie
        65504.0,                     // f16 max
        65519.0,                     // rounds to 65504
        65520.0,                     // f16 tie at the top -> infinity
        p(-24),                      // smallest f16 subnormal
        p(-25),                      // tie -> 0
        3.0 * p(-26),                // above the tie -> 2^-24
        p(-14) - p(-25),             // subnormal rounding up to the smallest normal
        f32::from_bits(1),           // smallest f32 subnormal
        f32::from_bits(0x0000_8000), // bf16 subnormal tie -> 0
        f32::from_bits(0x0001_8000), // bf16 subnormal tie -> up (odd)
        f32::MAX,                    // bf16 and tf32 overflow to infinity
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -0.0,
        0.1,
        -3.25159,
        1.0 + p(-11) + p(-23), // tf32: just above the tie
        -(1.0 + 3.0 * p(-11)),
        1.0e-30,
        7.0e30,
        1.0 + 5.0 * p(-12),
        -65536.0,
        0.333333,
        12345.678,
        p(-20),
    ];
    let n = xs.len();
    let mut mem = GlobalMemory::new();
    let px = mem.alloc_f32(&xs);
    let p16 = mem.alloc(n * 4);
    let p32 = mem.alloc(n * 32);
    launch(
        &ptx(CVT),
        "k",
        [1, 1, 1],
        [n as u32, 1, 1],
        0,
        &[SimParam::U64(px), SimParam::U64(p16), SimParam::U64(p32)],
        &mut mem,
    )
    .expect("cvt runs");
    let h = read_u16(&mem, p16, n * 2);
    let w = read_u32(&mem, p32, n * 8);
    let bf16_max = (2.0 - 2f64.powi(-7)) * 2f64.powi(127);
    let tf32_max = (2.0 - 2f64.powi(-10)) * 2f64.powi(127);
    for (i, &x) in xs.iter().enumerate() {
        let xd = x as f64;
        let want_bf = round_ref(xd, 7, -126, bf16_max, false);
        let want_h = round_ref(xd, 10, -14, 65504.0, false);
        let want_tf = round_ref(xd, 10, -126, tf32_max, true);
        let (bf, hf) = (h[2 * i], h[2 * i + 1]);
        assert!(same(bf16_value(bf), want_bf), "bf16({x:e}) = {bf:#06x}, want {want_bf:e}");
        assert!(same(f16_value(hf), want_h), "f16({x:e}) = {hf:#06x}, want {want_h:e}");
        let ws = &w[8 * i..8 * i + 8];
        assert!(same(f32::from_bits(ws[0]) as f64, want_tf), "tf32.rna({x:e}) = {:#x}", ws[0]);
        assert_eq!(ws[0] & 0x1FFF, if x.is_nan() { ws[0] & 0x1FFF } else { 0 }, "tf32 low bits");
        // bf16x2 / f16x2: the first source (x) in the upper half, the second (-x) below.
        assert_eq!(ws[1] >> 16, bf as u32, "bf16x2 upper of {x:e}");
        assert!(same(bf16_value(ws[1] as u16), round_ref(-xd, 7, -126, bf16_max, false)), "bf16x2 lower");
        assert_eq!(ws[2] >> 16, hf as u32, "f16x2 upper of {x:e}");
        assert!(same(f16_value(ws[2] as u16), round_ref(-xd, 10, -14, 65504.0, false)), "f16x2 lower");
        // The unpack/pack pair swapped the halves.
        assert_eq!(ws[3], ws[2].rotate_left(16));
        // Widening back is exact.
        assert!(same(f32::from_bits(ws[4]) as f64, bf16_value(bf)), "cvt.f32.bf16 of {bf:#06x}");
        assert!(same(f32::from_bits(ws[5]) as f64, f16_value(hf)), "cvt.f32.f16 of {hf:#06x}");
    }
}

/// cvt.rn.tf32.f32 (sm_90): ties to even.
#[test]
fn cvt_rn_tf32_ties_to_even() {
    let body = CVT.replace("cvt.rna.tf32.f32", "cvt.rn.tf32.f32");
    let src = format!("{}{body}", head("sm_90"));
    let p = |e: i32| 2f32.powi(e);
    let xs = [1.0 + p(-11), 1.0 + 3.0 * p(-11), -(1.0 + p(-11)), 1.0 + p(-11) + p(-23), f32::MAX];
    let n = xs.len();
    let mut mem = GlobalMemory::new();
    let px = mem.alloc_f32(&xs);
    let p16 = mem.alloc(n * 4);
    let p32 = mem.alloc(n * 32);
    launch(
        &src,
        "k",
        [1, 1, 1],
        [n as u32, 1, 1],
        0,
        &[SimParam::U64(px), SimParam::U64(p16), SimParam::U64(p32)],
        &mut mem,
    )
    .expect("runs");
    let w = read_u32(&mem, p32, n * 8);
    let tf32_max = (2.0 - 2f64.powi(-10)) * 2f64.powi(127);
    for (i, &x) in xs.iter().enumerate() {
        let want = round_ref(x as f64, 10, -126, tf32_max, false);
        assert!(same(f32::from_bits(w[8 * i]) as f64, want), "tf32.rn({x:e})");
    }
}

const SIXTEEN: &str = r#"
.visible .entry k(
	.param .u64 k_out
)
{
	.reg .b16 %h<4>;
	.reg .u16 %rs<4>;
	.reg .b32 %r<8>;
	.reg .b64 %rd<2>;
	ld.param.u64 %rd0, [k_out];
	mov.b16 %h0, 0xFFFE;
	add.u16 %rs0, %h0, 3;          // wraps to 1
	cvt.u32.u16 %r0, %h0;          // 65534
	cvt.s32.s16 %r1, %h0;          // -2
	shl.b32 %r2, %r0, 4;
	or.b32 %r3, %r2, 0xF;
	and.b32 %r4, %r3, 0xFFFF;
	mov.b32 %r5, {%rs0, %h0};      // 0xFFFE0001
	st.global.v4.b32 [%rd0], {%r0, %r1, %r4, %r5};
	st.global.u16 [%rd0+16], %rs0;
	st.global.b16 [%rd0+18], %h0;
	ld.global.s16 %r6, [%rd0+18];  // sign-extends to 0xFFFFFFFE
	ld.global.u16 %r7, [%rd0+18];  // zero-extends to 0xFFFE
	st.global.v2.b32 [%rd0+24], {%r6, %r7};
	ret;
}
"#;

#[test]
fn sixteen_bit_integers_and_bit_ops() {
    let mut mem = GlobalMemory::new();
    let po = mem.alloc(32);
    run_warp(&ptx(SIXTEEN), &[po], 1, 0, &mut mem).expect("runs");
    let w = read_u32(&mem, po, 8);
    assert_eq!(&w[..4], &[65534, (-2i32) as u32, 0xFFEF, 0xFFFE_0001]);
    assert_eq!(read_u16(&mem, po + 16, 2), [1, 0xFFFE]);
    assert_eq!(&w[6..], &[0xFFFF_FFFE, 0xFFFE]);
}

// ---------------------------------------------------------------------------------------
// ptxas

fn ptxas() -> Option<std::path::PathBuf> {
    std::env::var_os("CHUNKC_PTXAS").map(Into::into)
}

#[test]
fn ptxas_accepts_every_snippet() {
    let Some(ptxas) = ptxas() else {
        eprintln!("CHUNKC_PTXAS not set: skipping the ptxas check of the snippets");
        return;
    };
    let mut snippets: Vec<(String, &str)> = vec![
        (mma_kernel("m16n8k16.row.col.f32.bf16.bf16.f32"), "sm_80"),
        (mma_kernel("m16n8k16.row.col.f32.f16.f16.f32"), "sm_80"),
        (mma_kernel("m16n8k8.row.col.f32.tf32.tf32.f32"), "sm_80"),
        (ptx(CVT), "sm_80"),
        (ptx(BUTTERFLY), "sm_80"),
        (ptx(DIVERGENT), "sm_80"),
        (ptx(WARP_SYNC), "sm_80"),
        (ptx(&WARP_SYNC.replace("//SYNC", "bar.warp.sync 0xffffffff;")), "sm_80"),
        (ptx(SIXTEEN), "sm_80"),
        (ptx(LEAK), "sm_80"),
        (ptx(MIXED), "sm_80"),
        (format!("{}{}", head("sm_90"), CVT.replace("cvt.rna.tf32.f32", "cvt.rn.tf32.f32")), "sm_90"),
    ];
    for v in ["x1", "x2", "x4", "x1.trans", "x2.trans", "x4.trans"] {
        let n = v[1..2].parse().unwrap();
        snippets.push((ldmatrix_kernel(v, n), "sm_80"));
    }
    snippets.push((ldmatrix_generic_kernel(), "sm_80"));
    for mode in ["up", "down", "bfly", "idx"] {
        snippets.push((shfl_kernel(mode, "3", "31"), "sm_80"));
    }
    for (copy, wait) in [
        ("cp.async.ca.shared.global [%r3], [%rd3], 16;\n\tcp.async.commit_group;", "cp.async.wait_group 0;"),
        ("cp.async.cg.shared::cta.global [%r3], [%rd3], 16, 8;", "cp.async.wait_all;"),
        (
            "cp.async.ca.shared.global [%r3], [%rd3], 4;\n\tcp.async.ca.shared.global [%r3+8], [%rd3+8], 8;",
            "cp.async.wait_all;",
        ),
    ] {
        snippets.push((cp_async_kernel(copy, wait), "sm_80"));
    }
    let dir = std::env::temp_dir().join(format!("chunkc_ptxsim_tc_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (src, sm)) in snippets.iter().enumerate() {
        let src = src.replace(".target sm_80", &format!(".target {sm}"));
        let path = dir.join(format!("s{i}.ptx"));
        std::fs::write(&path, &src).unwrap();
        let out = std::process::Command::new(&ptxas)
            .arg(format!("-arch={sm}"))
            .arg(&path)
            .arg("-o")
            .arg(dir.join(format!("s{i}.cubin")))
            .output()
            .expect("ptxas runs");
        assert!(out.status.success(), "snippet {i} ({sm}):\n{src}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// CTA 0 writes a shared word; CTA 1 only reads it. Shared memory (and its written bits)
/// must not carry over from one CTA to the next.
const LEAK: &str = r#"
.visible .entry k(
	.param .u64 k_out
)
{
	.reg .b32 %r<4>;
	.reg .b64 %rd<2>;
	.reg .pred %p<2>;
	.shared .align 4 .b32 word;
	ld.param.u64 %rd0, [k_out];
	mov.u32 %r0, %ctaid.x;
	setp.ne.u32 %p0, %r0, 0;
	@%p0 bra $L_read;
	st.shared.u32 [word], %r0;
$L_read:
	bar.sync 0;
	ld.shared.u32 %r1, [word];
	st.global.u32 [%rd0], %r1;
	ret;
}
"#;

#[test]
fn shared_memory_does_not_leak_between_ctas() {
    let src = ptx(LEAK);
    let mut mem = GlobalMemory::new();
    let po = mem.alloc(4);
    launch(&src, "k", [1, 1, 1], [1, 1, 1], 0, &[SimParam::U64(po)], &mut mem).expect("one CTA");
    let e = launch(&src, "k", [2, 1, 1], [1, 1, 1], 0, &[SimParam::U64(po)], &mut mem).expect_err("CTA 1");
    assert!(e.message.contains("uninitialised shared memory") && e.message.contains("CTA (1,0,0)"), "{e}");
    assert_eq!(e.line, line_of(&src, "ld.shared.u32"));
}

/// Lanes 16-31 first run a shfl of their own half; then the whole warp meets at a
/// full-mask shfl. Legal: the scheduler must run the half's shfl first, not report lanes
/// 0-15 as divergent.
const MIXED: &str = r#"
.visible .entry k(
	.param .u64 k_out
)
{
	.reg .b32 %r<4>;
	.reg .b64 %rd<4>;
	.reg .pred %p<2>;
	ld.param.u64 %rd0, [k_out];
	mov.u32 %r0, %laneid;
	mov.u32 %r1, 0;
	setp.lt.u32 %p0, %r0, 16;
	@%p0 bra $L_join;
	shfl.sync.idx.b32 %r1, %r0, 17, 31, 0xffff0000;
$L_join:
	shfl.sync.idx.b32 %r2, %r0, 5, 31, 0xffffffff;
	add.u32 %r3, %r1, %r2;
	mul.wide.u32 %rd1, %r0, 4;
	add.s64 %rd2, %rd0, %rd1;
	st.global.u32 [%rd2], %r3;
	ret;
}
"#;

#[test]
fn a_partial_mask_collective_runs_before_a_full_one_waiting_on_it() {
    let mut mem = GlobalMemory::new();
    let po = mem.alloc(128);
    run_warp(&ptx(MIXED), &[po], 32, 0, &mut mem).expect("legal");
    let want: Vec<u32> = (0..32).map(|l| if l < 16 { 5 } else { 17 + 5 }).collect();
    assert_eq!(read_u32(&mem, po, 32), want);
}
