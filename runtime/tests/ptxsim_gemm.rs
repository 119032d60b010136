//! A tiled bf16 GEMM in the shape tensor-core kernels take (cp.async global -> shared,
//! wait, bar.sync, ldmatrix.x4 for A and ldmatrix.x2.trans for B, mma.m16n8k16, a K loop,
//! four warps per CTA), run by the PTX simulator against an f64 reference. It checks that
//! the simulator's ldmatrix and mma layouts compose as on hardware: ldmatrix.x4 of a 16x16
//! row-major tile, lane l giving row l % 16 at column 8 (l / 16), is the mma A fragment;
//! ldmatrix.x2.trans of a 16x8 row-major (k, n) tile, lane l giving row l, is the B fragment.

use chunkc_runtime::ptxsim::{launch, GlobalMemory, SimParam};
use std::time::Instant;

/// C[M x N] (f32) = A[M x K] (bf16, row-major) B[K x N] (bf16, row-major). CTA tile 32 x 16,
/// warp w computes rows 16 (w / 2), cols 8 (w % 2) of it; K in steps of 16.
const GEMM: &str = r#"
.version 8.0
.target sm_80
.address_size 64

.visible .entry gemm(
	.param .u64 gemm_a,
	.param .u64 gemm_b,
	.param .u64 gemm_c,
	.param .u32 gemm_k,
	.param .u32 gemm_n
)
.reqntid 128, 1, 1
{
	.reg .b32 %r<40>;
	.reg .f32 %f<4>;
	.reg .b64 %rd<12>;
	.reg .pred %p<4>;
	.shared .align 128 .b8 sa[1024];
	.shared .align 128 .b8 sb[512];

	ld.param.u64 %rd0, [gemm_a];
	ld.param.u64 %rd1, [gemm_b];
	ld.param.u64 %rd2, [gemm_c];
	ld.param.u32 %r0, [gemm_k];
	ld.param.u32 %r1, [gemm_n];
	cvta.to.global.u64 %rd0, %rd0;
	cvta.to.global.u64 %rd1, %rd1;
	cvta.to.global.u64 %rd2, %rd2;
	mov.u32 %r2, %tid.x;
	mov.u32 %r3, %laneid;
	shr.u32 %r4, %r2, 5;
	mov.u32 %r5, %ctaid.x;
	mov.u32 %r6, %ctaid.y;
	shr.u32 %r16, %r4, 1;
	shl.b32 %r16, %r16, 4;
	and.b32 %r25, %r4, 1;
	mov.f32 %f0, 0f00000000;
	mov.f32 %f1, 0f00000000;
	mov.f32 %f2, 0f00000000;
	mov.f32 %f3, 0f00000000;
	mov.u32 %r7, 0;
$L_k:
	setp.ge.u32 %p0, %r7, %r0;
	@%p0 bra.uni $L_done;
	// Threads 0-63 copy the A tile (32 rows of 32 bytes, 16 bytes each), 64-95 the B tile.
	setp.lt.u32 %p1, %r2, 64;
	@!%p1 bra $L_notA;
	shr.u32 %r8, %r2, 1;
	and.b32 %r9, %r2, 1;
	shl.b32 %r10, %r6, 5;
	add.u32 %r10, %r10, %r8;
	mad.lo.u32 %r11, %r10, %r0, %r7;
	mad.lo.u32 %r11, %r9, 8, %r11;
	mul.wide.u32 %rd3, %r11, 2;
	add.s64 %rd4, %rd0, %rd3;
	mov.u32 %r12, sa;
	mad.lo.u32 %r13, %r8, 32, %r12;
	mad.lo.u32 %r13, %r9, 16, %r13;
	cp.async.cg.shared.global [%r13], [%rd4], 16;
	bra $L_copied;
$L_notA:
	setp.lt.u32 %p2, %r2, 96;
	@!%p2 bra $L_copied;
	sub.u32 %r14, %r2, 64;
	shr.u32 %r8, %r14, 1;
	and.b32 %r9, %r14, 1;
	add.u32 %r10, %r7, %r8;
	shl.b32 %r15, %r5, 4;
	mad.lo.u32 %r11, %r10, %r1, %r15;
	mad.lo.u32 %r11, %r9, 8, %r11;
	mul.wide.u32 %rd3, %r11, 2;
	add.s64 %rd4, %rd1, %rd3;
	mov.u32 %r12, sb;
	mad.lo.u32 %r13, %r8, 32, %r12;
	mad.lo.u32 %r13, %r9, 16, %r13;
	cp.async.ca.shared.global [%r13], [%rd4], 16;
$L_copied:
	cp.async.commit_group;
	cp.async.wait_group 0;
	bar.sync 0;
	and.b32 %r17, %r3, 15;
	add.u32 %r17, %r17, %r16;
	shr.u32 %r18, %r3, 4;
	mov.u32 %r12, sa;
	mad.lo.u32 %r19, %r17, 32, %r12;
	mad.lo.u32 %r19, %r18, 16, %r19;
	ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r20, %r21, %r22, %r23}, [%r19];
	and.b32 %r24, %r3, 15;
	mov.u32 %r12, sb;
	mad.lo.u32 %r26, %r24, 32, %r12;
	mad.lo.u32 %r26, %r25, 16, %r26;
	ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%r27, %r28}, [%r26];
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f0, %f1, %f2, %f3}, {%r20, %r21, %r22, %r23}, {%r27, %r28}, {%f0, %f1, %f2, %f3};
	//PLANT
	bar.sync 0;
	add.u32 %r7, %r7, 16;
	bra.uni $L_k;
$L_done:
	// c0, c1 at row groupID, cols 2 tig, 2 tig + 1; c2, c3 eight rows below.
	shr.u32 %r29, %r3, 2;
	and.b32 %r30, %r3, 3;
	shl.b32 %r31, %r6, 5;
	add.u32 %r31, %r31, %r16;
	add.u32 %r31, %r31, %r29;
	shl.b32 %r32, %r5, 4;
	mad.lo.u32 %r32, %r25, 8, %r32;
	mad.lo.u32 %r32, %r30, 2, %r32;
	mad.lo.u32 %r33, %r31, %r1, %r32;
	mul.wide.u32 %rd5, %r33, 4;
	add.s64 %rd6, %rd2, %rd5;
	st.global.v2.f32 [%rd6], {%f0, %f1};
	shl.b32 %r34, %r1, 3;
	add.u32 %r33, %r33, %r34;
	mul.wide.u32 %rd7, %r33, 4;
	add.s64 %rd8, %rd2, %rd7;
	st.global.v2.f32 [%rd8], {%f2, %f3};
	ret;
}
"#;

fn a_val(i: usize, k: usize) -> f32 {
    ((i * 7 + k * 3) % 37) as f32 / 8.0 - 2.25
}
fn b_val(k: usize, j: usize) -> f32 {
    ((k * 5 + j * 11) % 29) as f32 / 4.0 - 3.5
}

fn bf16_words(m: usize, n: usize, f: fn(usize, usize) -> f32) -> Vec<u8> {
    let mut out = vec![];
    for i in 0..m {
        for j in 0..n {
            let b = f(i, j).to_bits();
            assert_eq!(b & 0xFFFF, 0);
            out.extend_from_slice(&((b >> 16) as u16).to_le_bytes());
        }
    }
    out
}

fn run_gemm(src: &str, m: usize, n: usize, k: usize) -> Result<Vec<f32>, chunkc_runtime::ptxsim::SimError> {
    let mut mem = GlobalMemory::new();
    let a = bf16_words(m, k, a_val);
    let b = bf16_words(k, n, b_val);
    let pa = mem.alloc(a.len());
    mem.bytes_mut(pa, a.len()).unwrap().copy_from_slice(&a);
    let pb = mem.alloc(b.len());
    mem.bytes_mut(pb, b.len()).unwrap().copy_from_slice(&b);
    let pc = mem.alloc_f32(&vec![f32::NAN; m * n]);
    let params =
        [SimParam::U64(pa), SimParam::U64(pb), SimParam::U64(pc), SimParam::U32(k as u32), SimParam::U32(n as u32)];
    launch(src, "gemm", [(n / 16) as u32, (m / 32) as u32, 1], [128, 1, 1], 0, &params, &mut mem)?;
    Ok(mem.read_f32(pc, m * n).unwrap())
}

fn check(c: &[f32], m: usize, n: usize, k: usize) {
    for i in 0..m {
        for j in 0..n {
            // Every partial sum is a multiple of 1/32 below 2^12: exact in f32.
            let want: f64 = (0..k).map(|kk| a_val(i, kk) as f64 * b_val(kk, j) as f64).sum();
            assert_eq!(c[i * n + j] as f64, want, "C[{i}][{j}]");
        }
    }
}

#[test]
fn tiled_bf16_gemm_with_cp_async_ldmatrix_and_mma() {
    let (m, n, k) = (64, 32, 64);
    let c = run_gemm(GEMM, m, n, k).expect("gemm runs");
    check(&c, m, n, k);
}

#[test]
fn gemm_throughput() {
    // 128 x 128 x 256: 32 CTAs x 16 K steps x 4 warps = 2048 warp-level mmas.
    let (m, n, k) = (128, 128, 256);
    let t = Instant::now();
    let c = run_gemm(GEMM, m, n, k).expect("gemm runs");
    let dt = t.elapsed();
    eprintln!("gemm {m}x{n}x{k}: {:.1} ms in the simulator", dt.as_secs_f64() * 1e3);
    check(&c, m, n, k);
}

#[test]
fn gemm_without_the_second_barrier_races() {
    // Without the barrier after the mma, the next iteration's cp.async overwrites the tile
    // other warps may still be reading: a race the detector must see.
    let racy = GEMM.replace("\t//PLANT\n\tbar.sync 0;\n", "");
    let e = run_gemm(&racy, 64, 32, 64).expect_err("race");
    assert!(e.message.contains("shared-memory race"), "{e}");
    assert!(racy.lines().nth(e.line - 1).is_some_and(|l| l.contains("cp.async")), "{e}");
}

#[test]
fn gemm_reading_the_tile_before_the_wait_is_reported() {
    let early = GEMM.replace("\tcp.async.wait_group 0;\n\tbar.sync 0;\n", "\tbar.sync 0;\n");
    let e = run_gemm(&early, 64, 32, 64).expect_err("read before wait");
    assert!(e.message.contains("before the cp.async"), "{e}");
    assert!(early.lines().nth(e.line - 1).is_some_and(|l| l.contains("ldmatrix")), "{e}");
}

#[test]
fn ptxas_accepts_the_gemm() {
    let Some(ptxas) = std::env::var_os("CHUNKC_PTXAS") else {
        eprintln!("CHUNKC_PTXAS not set: skipping the ptxas check of the gemm");
        return;
    };
    let dir = std::env::temp_dir().join(format!("chunkc_ptxsim_gemm_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gemm.ptx");
    std::fs::write(&path, GEMM).unwrap();
    let out = std::process::Command::new(ptxas)
        .args(["-arch=sm_80", "-v"])
        .arg(&path)
        .arg("-o")
        .arg(dir.join("gemm.cubin"))
        .output()
        .expect("ptxas runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn truncated_or_garbled_tensor_core_ptx_never_panics() {
    // The GEMM exercises the new syntax: `{..}` operands, `::`, cp.async, ldmatrix, mma;
    // plus a shfl with a `|p` destination.
    let shfl = "\tshfl.sync.bfly.b32 %r1|%p1, %r2, 1, 31, 0xffffffff;\n";
    let src = GEMM.replace("\t//PLANT\n", shfl);
    for cut in (0..src.len()).filter(|&i| src.is_char_boundary(i)) {
        let _ = chunkc_runtime::ptxsim::parse_module(&src[..cut]);
        let mut garbled = src.clone();
        garbled.replace_range(cut..(cut + 1).min(src.len()), if cut % 2 == 0 { "}" } else { "|" });
        let _ = chunkc_runtime::ptxsim::parse_module(&garbled);
    }
}
