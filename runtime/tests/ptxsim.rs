//! The PTX simulator on hand-written snippets with known results, and planted bugs it must
//! report (race, out-of-bounds store, uninitialised shared read, partial barrier, divergent
//! uniform branch).

use chunkc_runtime::ptxsim::{launch, GlobalMemory, SimError, SimParam};

const HEAD: &str = ".version 7.8\n.target sm_80\n.address_size 64\n";

fn ptx(body: &str) -> String {
    format!("{HEAD}{body}")
}

const VADD: &str = r#"
.visible .entry vadd(
	.param .u64 vadd_param_0,
	.param .u64 vadd_param_1,
	.param .u64 vadd_param_2,
	.param .u32 vadd_param_3
)
.maxntid 64, 1, 1
{
	.reg .b32 %r<6>;
	.reg .b64 %rd<10>;
	.reg .f32 %f<4>;
	.reg .pred %p<2>;

	ld.param.u64 %rd1, [vadd_param_0];
	ld.param.u64 %rd2, [vadd_param_1];
	ld.param.u64 %rd3, [vadd_param_2];
	ld.param.u32 %r1, [vadd_param_3];
	cvta.to.global.u64 %rd1, %rd1;
	mov.u32 %r2, %ctaid.x;
	mov.u32 %r3, %ntid.x;
	mov.u32 %r4, %tid.x;
	mad.lo.s32 %r5, %r2, %r3, %r4;
	setp.ge.u32 %p1, %r5, %r1;
	@%p1 bra $L_done;
	mul.wide.s32 %rd4, %r5, 4;
	add.s64 %rd5, %rd1, %rd4;
	add.s64 %rd6, %rd2, %rd4;
	add.s64 %rd7, %rd3, %rd4;
	ld.global.f32 %f1, [%rd5];
	ld.global.f32 %f2, [%rd6];
	add.rn.f32 %f3, %f1, %f2;
	st.global.f32 [%rd7], %f3;
$L_done:
	ret;
}
"#;

#[test]
fn vector_add() {
    let n = 100usize;
    let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32).collect();
    let mut mem = GlobalMemory::new();
    let pa = mem.alloc_f32(&a);
    let pb = mem.alloc_f32(&b);
    let pc = mem.alloc(n * 4);
    let params = [SimParam::U64(pa), SimParam::U64(pb), SimParam::U64(pc), SimParam::U32(n as u32)];
    let r = launch(&ptx(VADD), "vadd", [2, 1, 1], [64, 1, 1], 0, &params, &mut mem).expect("runs");
    let c = mem.read_f32(pc, n).unwrap();
    for i in 0..n {
        assert_eq!(c[i], a[i] + b[i], "element {i}");
    }
    assert_eq!(r.ctas, 2);
    assert!(r.instructions > 0);
}

#[test]
fn out_of_bounds_global_store_is_reported() {
    // n = 101 for a 100-element output: thread 100 stores past the end of the buffer.
    let n = 100usize;
    let mut mem = GlobalMemory::new();
    let pa = mem.alloc_f32(&vec![1.0; n + 1]);
    let pb = mem.alloc_f32(&vec![2.0; n + 1]);
    let pc = mem.alloc(n * 4);
    let params = [SimParam::U64(pa), SimParam::U64(pb), SimParam::U64(pc), SimParam::U32(n as u32 + 1)];
    let e = launch(&ptx(VADD), "vadd", [2, 1, 1], [64, 1, 1], 0, &params, &mut mem).expect_err("OOB");
    let line = ptx(VADD).lines().position(|l| l.contains("st.global.f32")).unwrap() + 1;
    assert_eq!(e.line, line, "{e}");
    assert!(e.message.contains("out-of-bounds global store"), "{e}");
    assert!(e.message.contains("thread (36,0,0) of CTA (1,0,0)"), "{e}");
    assert!(e.message.contains(&format!("{:#x}", pc + 400)), "{e}");
}

/// out[tid] = sum_{i < tid} i * 2 with a loop closed by a predicated branch, plus selp,
/// setp on floats, cvt, min/max, shifts and div/rem.
const LOOP: &str = r#"
.visible .entry looper(
	.param .u64 looper_param_0
)
{
	.reg .b32 %r<8>;
	.reg .b64 %rd<4>;
	.reg .f32 %f<6>;
	.reg .f64 %fd<3>;
	.reg .pred %p<4>;

	ld.param.u64 %rd0, [looper_param_0];
	mov.u32 %r0, %tid.x;
	mov.u32 %r1, 0;       // i
	mov.f32 %f0, 0f00000000; // acc
$L_top:
	setp.ge.u32 %p0, %r1, %r0;
	@%p0 bra.uni $L_end;
	cvt.rn.f32.u32 %f1, %r1;
	fma.rn.f32 %f0, %f1, 0f40000000, %f0;
	add.u32 %r1, %r1, 1;
	bra $L_top;
$L_end:
	// f2 = acc > 10 ? acc : -1, through f64 and back
	setp.gt.f32 %p1, %f0, 0f41200000;
	selp.f32 %f2, %f0, 0fBF800000, %p1;
	cvt.f64.f32 %fd0, %f2;
	add.rn.f64 %fd1, %fd0, 0d3FF0000000000000;
	cvt.rn.f32.f64 %f3, %fd1;
	// integer checks folded in: (tid / 3) % 2 and shifts; adds 1000 * ((tid>>1)<<1 == tid ? 1 : 0)
	shr.u32 %r2, %r0, 1;
	shl.b32 %r3, %r2, 1;
	setp.eq.s32 %p2, %r3, %r0;
	selp.f32 %f4, 0f447A0000, 0f00000000, %p2;
	add.rn.f32 %f3, %f3, %f4;
	mul.wide.u32 %rd1, %r0, 4;
	add.s64 %rd2, %rd0, %rd1;
	st.global.f32 [%rd2], %f3;
	exit;
}
"#;

#[test]
fn loop_with_predicated_branch() {
    // All threads of the warp must agree on bra.uni: run one thread per warp-free check by
    // using tid-dependent loop counts... which diverge. So run a single thread per CTA.
    let mut mem = GlobalMemory::new();
    let out = mem.alloc(4);
    launch(&ptx(LOOP), "looper", [1, 1, 1], [1, 1, 1], 0, &[SimParam::U64(out)], &mut mem).expect("runs");
    assert_eq!(mem.read_f32(out, 1).unwrap(), [0.0 + 1000.0]); // acc 0 -> -1 -> 0 (+1000: 0 even)

    // With 8 threads the loop trip count depends on tid, so bra.uni is divergent: reported.
    let mut mem = GlobalMemory::new();
    let out = mem.alloc(32);
    let e = launch(&ptx(LOOP), "looper", [1, 1, 1], [8, 1, 1], 0, &[SimParam::U64(out)], &mut mem)
        .expect_err("divergent uniform branch");
    assert!(e.message.contains("divergent bra.uni"), "{e}");

    // The same loop with a plain (non-uniform) branch is fine.
    let plain = ptx(LOOP).replace("bra.uni", "bra");
    let mut mem = GlobalMemory::new();
    let out = mem.alloc(32);
    launch(&plain, "looper", [1, 1, 1], [8, 1, 1], 0, &[SimParam::U64(out)], &mut mem).expect("runs");
    let got = mem.read_f32(out, 8).unwrap();
    for (t, g) in got.iter().enumerate() {
        let acc: f32 = (0..t).map(|i| 2.0 * i as f32).sum();
        let base = if acc > 10.0 { acc } else { -1.0 } + 1.0;
        let want = base + if t % 2 == 0 { 1000.0 } else { 0.0 };
        assert_eq!(*g, want, "thread {t}");
    }
}

/// Tree reduction of 64 floats in shared memory with bar.sync between the steps.
fn reduction(planted: &str) -> String {
    let body = r#"
.extern .shared .align 16 .b8 smem[];
.visible .entry reduce(
	.param .u64 reduce_param_0,
	.param .u64 reduce_param_1
)
{
	.reg .b32 %r<8>;
	.reg .b64 %rd<12>;
	.reg .f32 %f<4>;
	.reg .pred %p<4>;

	ld.param.u64 %rd0, [reduce_param_0];
	ld.param.u64 %rd1, [reduce_param_1];
	mov.u64 %rd2, smem;
	mov.u32 %r0, %tid.x;
	mul.wide.u32 %rd3, %r0, 4;
	add.s64 %rd4, %rd0, %rd3;
	ld.global.f32 %f0, [%rd4];
	add.s64 %rd5, %rd2, %rd3;
	st.shared.f32 [%rd5], %f0;
	bar.sync 0;
	mov.u32 %r1, 32;      // stride
$L_step:
	setp.ge.u32 %p0, %r0, %r1;
	@%p0 bra $L_skip;
	add.u32 %r2, %r0, %r1;
	mul.wide.u32 %rd6, %r2, 4;
	add.s64 %rd7, %rd2, %rd6;
	ld.shared.f32 %f1, [%rd7];
	ld.shared.f32 %f2, [%rd5];
	add.rn.f32 %f2, %f2, %f1;
	st.shared.f32 [%rd5], %f2;
$L_skip:
	//PLANT
	bar.sync 0;
	shr.u32 %r1, %r1, 1;
	setp.ne.u32 %p1, %r1, 0;
	@%p1 bra.uni $L_step;
	setp.ne.u32 %p2, %r0, 0;
	@%p2 bra $L_out;
	ld.shared.f32 %f3, [%rd2];
	st.global.f32 [%rd1], %f3;
$L_out:
	ret;
}
"#;
    ptx(&body.replace("//PLANT", planted))
}

fn run_reduction(src: &str, smem: usize) -> Result<f32, SimError> {
    let xs: Vec<f32> = (0..64).map(|i| (i as f32) * 0.25 - 3.0).collect();
    let mut mem = GlobalMemory::new();
    let x = mem.alloc_f32(&xs);
    let out = mem.alloc(4);
    let r = launch(src, "reduce", [1, 1, 1], [64, 1, 1], smem, &[SimParam::U64(x), SimParam::U64(out)], &mut mem)?;
    assert_eq!(r.barriers, 7);
    Ok(mem.read_f32(out, 1).unwrap()[0])
}

#[test]
fn shared_memory_reduction_with_barriers() {
    let got = run_reduction(&reduction(""), 256).expect("runs");
    let want: f32 = (0..64).map(|i| (i as f32) * 0.25 - 3.0).sum();
    assert_eq!(got, want);
}

#[test]
fn out_of_bounds_shared_access_is_reported() {
    let e = run_reduction(&reduction(""), 128).expect_err("smem too small");
    assert!(e.message.contains("out-of-bounds shared store"), "{e}");
}

#[test]
fn planted_shared_race_is_reported() {
    // Every thread also writes element 0 after its step, before the barrier.
    let src = reduction("st.shared.f32 [%rd2], %f0;");
    let e = run_reduction(&src, 256).expect_err("race");
    assert!(e.message.contains("shared-memory race"), "{e}");
    let line = src.lines().position(|l| l.contains("st.shared.f32 [%rd2], %f0")).unwrap() + 1;
    assert!(e.line == line || e.message.contains("reads what"), "{e}");
}

#[test]
fn uninitialised_shared_read_is_reported() {
    // Thread 0 reads element 64, past what was stored, but inside the 512-byte allocation.
    let src = reduction("@%p2 bra $L_noread;\n\tld.shared.f32 %f3, [%rd2+256];\n$L_noread:");
    let e = run_reduction(&src, 512).expect_err("uninitialised read");
    assert!(e.message.contains("uninitialised shared memory"), "{e}");
    assert!(e.message.contains("thread (0,0,0)"), "{e}");
    let line = src.lines().position(|l| l.contains("[%rd2+256]")).unwrap() + 1;
    assert_eq!(e.line, line);
}

#[test]
fn barrier_skipped_by_half_the_threads_is_reported() {
    let body = r#"
.visible .entry half(
	.param .u64 half_param_0
)
{
	.reg .b32 %r<4>;
	.reg .pred %p<2>;
	mov.u32 %r0, %tid.x;
	setp.ge.u32 %p0, %r0, 32;
	@%p0 bra $L_skip;
	bar.sync 0;
$L_skip:
	ret;
}
"#;
    let mut mem = GlobalMemory::new();
    let e = launch(&ptx(body), "half", [1, 1, 1], [64, 1, 1], 0, &[SimParam::U64(0)], &mut mem)
        .expect_err("partial barrier");
    assert!(e.message.contains("reached by only 32 of 64 threads"), "{e}");
    assert_eq!(e.line, ptx(body).lines().position(|l| l.contains("bar.sync")).unwrap() + 1);

    // Two different barriers are reported too.
    let two = ptx(body).replace("$L_skip:\n\tret;", "bar.sync 0;\n$L_skip:\n\tbar.sync 1;\n\tret;");
    let e = launch(&two, "half", [1, 1, 1], [64, 1, 1], 0, &[SimParam::U64(0)], &mut mem).expect_err("different");
    assert!(e.message.contains("reached by only part of CTA"), "{e}");
}

#[test]
fn unsupported_and_malformed_ptx_are_errors_naming_the_line() {
    let cases = [
        ("atom.global.add.f32 %f0, [%rd0], %f0;", "unsupported instruction"),
        ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 %f0, %f0, %f0, %f0;", "expected a vector"),
        ("mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%f0}, {%f0}, {%f0}, {%f0};", "unsupported mma form"),
        ("add.rz.f32 %f0, %f0, %f0;", "rounding mode"),
        ("mov.f32 %f9, %f0;", "unknown register"),
        ("bra $nowhere;", "undefined label"),
        ("ld.global.v3.f32 {%f0, %f0, %f0}, [%rd0];", "unsupported modifier"),
        ("add.f16 %f0, %f0, %f0;", "arithmetic on `.f16`"),
        ("add.f32 %f0, %f0;", "expects 3 operands"),
    ];
    for (ins, want) in cases {
        let src = ptx(&format!(
            ".visible .entry k(\n\t.param .u64 k_param_0\n)\n{{\n\t.reg .f32 %f<2>;\n\t.reg .b64 %rd<2>;\n\t{ins}\n\tret;\n}}\n"
        ));
        let mut mem = GlobalMemory::new();
        let e = launch(&src, "k", [1, 1, 1], [1, 1, 1], 0, &[SimParam::U64(0)], &mut mem).expect_err(ins);
        assert!(e.to_string().contains(want), "{ins}: {e}");
        assert_eq!(e.line, 10, "{ins}: {e}");
        assert!(!e.to_string().contains('\n'));
    }
    let mut mem = GlobalMemory::new();
    let e = launch(&ptx(VADD), "nope", [1, 1, 1], [1, 1, 1], 0, &[], &mut mem).expect_err("no entry");
    assert!(e.message.contains("no .entry"), "{e}");
    let e = launch(&ptx(VADD), "vadd", [1, 1, 1], [1, 1, 1], 0, &[], &mut mem).expect_err("params");
    assert!(e.message.contains("takes 4 parameters"), "{e}");
}

#[test]
fn ex2_and_lg2_round_once_from_f64() {
    let body = r#"
.visible .entry m(
	.param .u64 m_param_0
)
{
	.reg .f32 %f<6>;
	.reg .b64 %rd<2>;
	ld.param.u64 %rd0, [m_param_0];
	ld.global.f32 %f0, [%rd0];
	ex2.approx.ftz.f32 %f1, %f0;
	lg2.approx.ftz.f32 %f2, %f0;
	max.NaN.f32 %f3, %f0, 0f7FC00000;
	st.global.f32 [%rd0+4], %f1;
	st.global.f32 [%rd0+8], %f2;
	st.global.f32 [%rd0+12], %f3;
	ret;
}
"#;
    let mut mem = GlobalMemory::new();
    let p = mem.alloc_f32(&[1.7, 0.0, 0.0, 0.0]);
    launch(&ptx(body), "m", [1, 1, 1], [1, 1, 1], 0, &[SimParam::U64(p)], &mut mem).expect("runs");
    let r = mem.read_f32(p, 4).unwrap();
    assert_eq!(r[1], (1.7f32 as f64).exp2() as f32);
    assert_eq!(r[2], (1.7f32 as f64).log2() as f32);
    assert!(r[3].is_nan());
}

#[test]
fn truncated_or_garbled_ptx_never_panics() {
    let src = ptx(VADD);
    for cut in (0..src.len()).filter(|&i| src.is_char_boundary(i)) {
        let _ = chunkc_runtime::ptxsim::parse_module(&src[..cut]);
        let mut garbled = src.clone();
        garbled.replace_range(cut..(cut + 1).min(src.len()), "#");
        let _ = chunkc_runtime::ptxsim::parse_module(&garbled);
    }
    let big = ptx(".shared .align 4 .b8 s[99999999999999999];\n");
    let _ = chunkc_runtime::ptxsim::parse_module(&big);
}

#[test]
fn oversized_shared_memory_is_an_error() {
    let mut mem = GlobalMemory::new();
    let e = launch(
        &reduction(""),
        "reduce",
        [1, 1, 1],
        [64, 1, 1],
        1 << 30,
        &[SimParam::U64(0), SimParam::U64(0)],
        &mut mem,
    )
    .expect_err("too much smem");
    assert!(e.message.contains("shared memory per CTA"), "{e}");
}
