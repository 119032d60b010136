//! Cranelift CPU backend: compiles a tile-IR [`Kernel`] to native code for this machine.
//!
//! [`compile`] runs the mid-end for this backend's [`abilities`] (`crate::midend`: fusion of
//! elementwise chains and of row scales into the gemm, redundant masks dropped, the workspace
//! layout with one 64-byte aligned region per non-view value, reused once the value is dead,
//! and the in-place state update), lowers every statement to loop nests (`lower.rs`) and
//! JIT-compiles the function
//!
//! ```text
//! extern "C" fn(params: *const *mut f32, batch: i64, head: i64, seq_len: i64, workspace: *mut u8,
//!                vtile: i64, first_iter: i64, end_iter: i64)
//! ```
//!
//! where the kernel's loop runs iterations `[first_iter, min(end_iter, count))` (the whole
//! loop is `(0, i64::MAX)`; a kernel that `resume.rs` proves resumable may run in pieces).
//!
//! The result implements [`CpuKernel`], so `chunkc_runtime::exec::launch` can run it over
//! the (batch, head, V-tile) grid. Results agree with the interpreter (`interp.rs`) exactly for
//! elementwise ops, casts, masks, cumsums and row sums; `Dot`, `GatedDot` and
//! `SolveUnitLower` accumulate in f32 (as the IR documents) where the interpreter sums in
//! f64, so they agree to f32 rounding error. f32 `exp`, `exp2`, `sigmoid`, `silu`, `log` and
//! `softplus` (and the exp inside `GatedDot`) are inline vector code (`vmath.rs`, within 3.5 ulp
//! of exact, so not bit-identical to the interpreter's rounded f64); the other math calls
//! out. Large `Dot`s call rustc-compiled SIMD microkernels (`gemm.rs`: AVX-512F or AVX2 +
//! FMA) and `GatedDot`s with operands contiguous along `c` call rustc-compiled vector
//! routines (`gated.rs`) where the host has them ([`Simd`]; [`compile_with`] picks a level).

mod home;
mod lower;
pub mod object;
pub mod peak;
mod profile;
#[cfg(test)]
mod routine_tests;
mod vmath;

use std::fmt;

use chunkc_runtime::cpu_kernel::{CpuKernel, KernelFn, NativeKernel};
use cranelift_codegen::ir::{types, AbiParam, UserFuncName};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};

use crate::ir::{BinOp, DType, Kernel, Op, UnOp};
use crate::midend::{self, Abilities, LayoutError, Prepared};
use crate::program::{Program, ProgramSpec};
pub use chunkc_runtime::cpu_support::Simd;
use chunkc_runtime::cpu_support::{self as support, decay, gated, gated_matmul, gemm, rows, solve, sums};
use chunkc_runtime::cpu_support::{level_symbol, MATH_F32, MATH_F64, POW_F32, POW_F64};
use lower::{Lower, MathFns};

/// Why a kernel could not be compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodegenError(pub String);

impl fmt::Display for CodegenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu codegen: {}", self.0)
    }
}

impl std::error::Error for CodegenError {}

impl From<LayoutError> for CodegenError {
    fn from(e: LayoutError) -> CodegenError {
        CodegenError(e.0)
    }
}

/// A kernel compiled to native code: the [`NativeKernel`] an executor calls, and the JIT
/// memory its code lives in, freed with this value.
pub struct CpuCompiled {
    module: Option<JITModule>,
    kernel: NativeKernel,
}

// SAFETY: after `compile` finishes, the module is never used again except to free its memory
// in `Drop` (which has `&mut self`); the finalized code is immutable and reentrant (each call
// gets its own workspace), so sharing and calling it from many threads is sound.
unsafe impl Send for CpuCompiled {}
unsafe impl Sync for CpuCompiled {}

impl Drop for CpuCompiled {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: `&mut self` means no call into the code is running or can start.
            unsafe { m.free_memory() };
        }
    }
}

impl fmt::Debug for CpuCompiled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuCompiled").field("name", &self.name()).field("workspace", &self.workspace_bytes()).finish()
    }
}

impl CpuCompiled {
    /// Name of the kernel this was compiled from.
    pub fn name(&self) -> &str {
        self.kernel.entry()
    }
}

impl std::ops::Deref for CpuCompiled {
    type Target = NativeKernel;

    fn deref(&self) -> &NativeKernel {
        &self.kernel
    }
}

/// A program compiled for the host CPU: one native kernel per phase, in order, with the ABI
/// description that an executor binds them through.
#[derive(Debug)]
pub struct CpuProgram {
    pub spec: ProgramSpec,
    kernels: Vec<CpuCompiled>,
}

impl CpuProgram {
    /// The phases' kernels, in order.
    pub fn kernels(&self) -> Vec<&dyn CpuKernel> {
        self.kernels.iter().map(|k| &k.kernel as &dyn CpuKernel).collect()
    }
}

/// Compiles every phase of `program` for the host CPU.
pub fn compile_program(program: &Program) -> Result<CpuProgram, CodegenError> {
    compile_program_with(program, Simd::best())
}

/// [`compile_program`] calling only the SIMD routines of `simd` (see [`compile_with`]).
pub fn compile_program_with(program: &Program, simd: Simd) -> Result<CpuProgram, CodegenError> {
    let kernels = program.kernels.iter().map(|k| compile_with(k, simd)).collect::<Result<Vec<_>, _>>()?;
    Ok(CpuProgram { spec: program.spec.clone(), kernels })
}

/// Compiles `kernel` for the host CPU.
pub fn compile(kernel: &Kernel) -> Result<CpuCompiled, CodegenError> {
    compile_with(kernel, Simd::best())
}

/// Compiles `kernel` calling only the SIMD routines of `simd` (or of the best level below it
/// that the host has).
pub fn compile_with(kernel: &Kernel, simd: Simd) -> Result<CpuCompiled, CodegenError> {
    let simd = simd.min(Simd::best());
    let prepared = plan_fused(kernel, simd)?;
    let kernel = &prepared.kernel;
    let mut module = new_module(simd)?;
    let mut ctx = module.make_context();
    let id = build(&mut module, &mut ctx, &prepared, simd, (&kernel_symbol(&kernel.name), Linkage::Local))?;
    module.define_function(id, &mut ctx).map_err(|e| CodegenError(format!("compiling {}: {e:?}", kernel.name)))?;
    let ranges = profile::enabled().then(|| {
        let code = ctx.compiled_code().expect("define_function compiled the function");
        let len = code.code_buffer().len();
        let locs = code.buffer.get_srclocs_sorted().iter().map(|l| (l.start, l.end, l.loc)).collect::<Vec<_>>();
        (len, locs)
    });
    module.clear_context(&mut ctx);
    module.finalize_definitions().map_err(|e| CodegenError(format!("linking {}: {e}", kernel.name)))?;
    let code = module.get_finalized_function(id);
    if let Some((len, locs)) = ranges {
        profile::write(kernel, code, len, &locs);
    }
    // SAFETY: `build` gave the function exactly this signature (host default call
    // convention, which is the C one).
    let func = unsafe { std::mem::transmute::<*const u8, KernelFn>(code) };
    // SAFETY: `func` is the code just compiled for `kernel`, with its workspace plan; it
    // lives in `module`, which the returned value owns.
    let kernel = unsafe {
        NativeKernel::new(kernel.name.clone(), func, prepared.plan.bytes, kernel.vtiles, crate::resume::analyse(kernel))
    };
    Ok(CpuCompiled { module: Some(module), kernel })
}

/// The Cranelift IR `compile` would generate for `kernel` (before optimisation), for
/// inspection and debugging.
pub fn compile_to_clif(kernel: &Kernel) -> Result<String, CodegenError> {
    let simd = Simd::best();
    let prepared = plan_fused(kernel, simd)?;
    let mut module = new_module(simd)?;
    let mut ctx = module.make_context();
    build(&mut module, &mut ctx, &prepared, simd, (&kernel_symbol(&kernel.name), Linkage::Local))?;
    let text = ctx.func.display().to_string();
    // SAFETY: nothing was compiled into the module.
    unsafe { module.free_memory() };
    Ok(text)
}

/// Bytes of workspace `kernel` needs per call (what `compile(kernel)?.workspace_bytes()`
/// reports), without compiling it.
pub fn workspace_bytes(kernel: &Kernel) -> Result<usize, CodegenError> {
    Ok(plan_fused(kernel, Simd::best())?.plan.bytes)
}

/// What the mid-end may assume of this backend at SIMD level `simd`: its vector rule, the
/// gemm that applies row scales in its epilogue, and its fused routines.
pub fn abilities(simd: Simd) -> Abilities {
    Abilities {
        vectorises,
        scaled_gemm: gemm::select(simd).map(|_| gemm::takes_any_layout as fn(usize, usize, usize) -> bool),
        scaled_accumulator: Some(match gemm::select(simd) {
            Some(_) => |m, n, k| gemm::takes_any_layout(m, n, k) || outer_product(m, n, k),
            None => outer_product,
        }),
        decay_routine: decay::select(simd).is_some(),
        sums_routine: sums::select(simd).is_some(),
    }
}

/// Whether an `m x n` product over `k` is a large outer product (`k = 1`): inline code that
/// applies the accumulator's row scale as it reads it (`lower.rs`), so a scan's decayed state
/// update `S' = diag(d) S + k^T u` is one pass over the state, in place.
fn outer_product(m: usize, n: usize, k: usize) -> bool {
    k == 1 && m * n >= gemm::GEMM_MIN_MACS
}

/// Whether the elementwise op `op` (result dtype `dt`) runs on vectors in the lowering
/// (`lower.rs`: `Ex::vec_ok`): f32 math has inline vector code, f64 math, `tanh` and `pow` call out,
/// and a cast between dtypes is scalar.
fn vectorises(kernel: &Kernel, op: &Op, dt: DType) -> bool {
    match op {
        Op::Unary { op, .. } => {
            matches!(op, UnOp::Neg | UnOp::Sqrt | UnOp::Recip | UnOp::Abs)
                || (dt == DType::F32
                    && matches!(op, UnOp::Exp | UnOp::Exp2 | UnOp::Sigmoid | UnOp::Silu | UnOp::Log | UnOp::Softplus))
        }
        Op::Binary { op, .. } => *op != BinOp::Pow,
        Op::Cast { x, dtype } => kernel.ty(*x).dtype == *dtype,
        _ => true,
    }
}

/// Runs the mid-end for this backend at `simd`, after refusing what it cannot lower.
fn plan_fused(kernel: &Kernel, simd: Simd) -> Result<Prepared, CodegenError> {
    midend::layout::plan(kernel)?;
    reject_16bit_inputs(&kernel.body)?;
    Ok(midend::prepare(kernel, &abilities(simd))?)
}

/// The host's ISA with every feature it has (SSE4.1, AVX, FMA...), as
/// `cranelift_native` finds them; position-independent code when `pic` (an object file
/// linked into a PIE program).
fn host_isa(pic: bool) -> Result<cranelift_codegen::isa::OwnedTargetIsa, CodegenError> {
    let e = |what: &str, m: String| CodegenError(format!("{what}: {m}"));
    let mut flags = settings::builder();
    let pic = if pic { "true" } else { "false" };
    for (k, v) in [("opt_level", "speed"), ("use_colocated_libcalls", "false"), ("is_pic", pic)] {
        flags.set(k, v).map_err(|x| e("cranelift flag", x.to_string()))?;
    }
    let isa = cranelift_native::builder()
        .map_err(|m| e("host machine is not supported", m.to_string()))?
        .finish(settings::Flags::new(flags))
        .map_err(|x| e("target isa", x.to_string()))?;
    if isa.pointer_type() != types::I64 {
        return Err(CodegenError("the cpu backend needs a 64-bit host".into()));
    }
    Ok(isa)
}

fn new_module(simd: Simd) -> Result<JITModule, CodegenError> {
    let isa = host_isa(false)?;
    let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
    for (name, f) in MATH_F32 {
        jb.symbol(name, f as *const u8);
    }
    for (name, f) in MATH_F64 {
        jb.symbol(name, f as *const u8);
    }
    jb.symbol(POW_F32.0, POW_F32.1 as *const u8);
    jb.symbol(POW_F64.0, POW_F64.1 as *const u8);
    jb.symbol(support::PREFETCH_SYMBOL, support::chunkc_prefetch_rows as *const u8);
    jb.symbol(rows::ROWS_SYMBOL, rows::copy_rows as *const u8);
    if let Some(f) = gemm::select(simd) {
        jb.symbol(level_symbol(gemm::GEMM_SYMBOL, simd), f as *const u8);
    }
    if let Some(f) = solve::select(simd) {
        jb.symbol(level_symbol(solve::SOLVE_SYMBOL, simd), f as *const u8);
    }
    if let Some(f) = decay::select(simd) {
        jb.symbol(level_symbol(decay::DECAY_SYMBOL, simd), f as *const u8);
    }
    if let Some(f) = sums::select(simd) {
        jb.symbol(level_symbol(sums::SUMS_SYMBOL, simd), f as *const u8);
    }
    if let Some(fs) = gated::select(simd) {
        for (name, f) in gated::GATED_SYMBOLS.iter().zip(fs) {
            jb.symbol(level_symbol(name, simd), f as *const u8);
        }
    }
    if let Some(fs) = gated_matmul::select(simd) {
        for (name, f) in gated_matmul::SYMBOLS.iter().zip(fs) {
            jb.symbol(level_symbol(name, simd), f as *const u8);
        }
    }
    Ok(JITModule::new(jb))
}

/// The symbol of `kernel`'s function: `chunkc_<kernel name>`.
pub fn kernel_symbol(kernel: &str) -> String {
    format!("chunkc_{kernel}")
}

/// Declares the math imports and the kernel function, and fills `ctx.func` with its body.
fn build<M: Module>(
    module: &mut M,
    ctx: &mut Context,
    prepared: &Prepared,
    simd: Simd,
    (symbol, linkage): (&str, Linkage),
) -> Result<FuncId, CodegenError> {
    let merr = |e: cranelift_module::ModuleError| CodegenError(format!("declaring functions: {e}"));
    let import = |module: &mut M, func: &mut cranelift_codegen::ir::Function, name: &str, ty, args| {
        let mut sig = module.make_signature();
        for _ in 0..args {
            sig.params.push(AbiParam::new(ty));
        }
        sig.returns.push(AbiParam::new(ty));
        let id = module.declare_function(name, Linkage::Import, &sig).map_err(merr)?;
        Ok::<_, CodegenError>(module.declare_func_in_func(id, func))
    };
    // (p, rows, stride, bytes), nothing returned.
    let mut psig = module.make_signature();
    psig.params.extend([AbiParam::new(types::I64); 4]);
    let pid = module.declare_function(support::PREFETCH_SYMBOL, Linkage::Import, &psig).map_err(merr)?;
    let prefetch = module.declare_func_in_func(pid, &mut ctx.func);
    let mut math = MathFns {
        f32: vec![],
        f64: vec![],
        gemm: None,
        gated: None,
        gated_matmul: None,
        decay: None,
        sums: None,
        solve: None,
        copy_rows: None,
        prefetch,
    };
    if simd != Simd::Portable {
        // (src, src_rs, dst, dst_rs, rows, cols, fill_to); the portable level stays all
        // Cranelift code, so that tests of it test the generated loops.
        let mut rsig = module.make_signature();
        rsig.params.extend([AbiParam::new(types::I64); 7]);
        let id = module.declare_function(rows::ROWS_SYMBOL, Linkage::Import, &rsig).map_err(merr)?;
        math.copy_rows = Some(module.declare_func_in_func(id, &mut ctx.func));
    }
    for (name, _) in MATH_F32 {
        math.f32.push(import(module, &mut ctx.func, name, types::F32, 1)?);
    }
    math.f32.push(import(module, &mut ctx.func, POW_F32.0, types::F32, 2)?);
    for (name, _) in MATH_F64 {
        math.f64.push(import(module, &mut ctx.func, name, types::F64, 1)?);
    }
    math.f64.push(import(module, &mut ctx.func, POW_F64.0, types::F64, 2)?);
    // The gated routines take 14 integer / pointer arguments and return nothing.
    let mut sig14 = module.make_signature();
    sig14.params.extend([AbiParam::new(types::I64); 14]);
    if gemm::select(simd).is_some() {
        // (m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, c_rs, acc, acc_rs, acc_cs, s, s_rs).
        let mut gsig = module.make_signature();
        gsig.params.extend([AbiParam::new(types::I64); gemm::GEMM_ARGS]);
        let id =
            module.declare_function(&level_symbol(gemm::GEMM_SYMBOL, simd), Linkage::Import, &gsig).map_err(merr)?;
        math.gemm = Some(module.declare_func_in_func(id, &mut ctx.func));
    }
    if solve::select(simd).is_some() {
        // (n, m, l, l_rs, l_cs, x, x_rs).
        let mut ssig = module.make_signature();
        ssig.params.extend([AbiParam::new(types::I64); 7]);
        let id =
            module.declare_function(&level_symbol(solve::SOLVE_SYMBOL, simd), Linkage::Import, &ssig).map_err(merr)?;
        math.solve = Some(module.declare_func_in_func(id, &mut ctx.func));
    }
    if decay::select(simd).is_some() {
        // (rows, cols, a, a_rs, x, x_rs, x_cs, y, y_rs, y_cs, out, out_rs, tril).
        let mut dsig = module.make_signature();
        dsig.params.extend([AbiParam::new(types::I64); 13]);
        let id =
            module.declare_function(&level_symbol(decay::DECAY_SYMBOL, simd), Linkage::Import, &dsig).map_err(merr)?;
        math.decay = Some(module.declare_func_in_func(id, &mut ctx.func));
    }
    if sums::select(simd).is_some() {
        // (rows, cols, x, x_rs, out, out_rs, exclusive).
        let mut ssig = module.make_signature();
        ssig.params.extend([AbiParam::new(types::I64); 7]);
        let id =
            module.declare_function(&level_symbol(sums::SUMS_SYMBOL, simd), Linkage::Import, &ssig).map_err(merr)?;
        math.sums = Some(module.declare_func_in_func(id, &mut ctx.func));
    }
    if gated::select(simd).is_some() {
        // (n, c, a, a_rs, ga, ga_rs, b, b_rs, gb, gb_rs, out, out_rs, out_cs, strict).
        let mut fs = vec![];
        for name in gated::GATED_SYMBOLS {
            let id = module.declare_function(&level_symbol(name, simd), Linkage::Import, &sig14).map_err(merr)?;
            fs.push(module.declare_func_in_func(id, &mut ctx.func));
        }
        math.gated = Some([fs[0], fs[1]]);
    }
    if gated_matmul::select(simd).is_some() {
        // (n, c, m, m_rs, m_cs, x, x_rs, gx, gx_rs, gy, gy_rs, out, out_rs, flags).
        let mut fs = vec![];
        for name in gated_matmul::SYMBOLS {
            let id = module.declare_function(&level_symbol(name, simd), Linkage::Import, &sig14).map_err(merr)?;
            fs.push(module.declare_func_in_func(id, &mut ctx.func));
        }
        math.gated_matmul = Some([fs[0], fs[1]]);
    }

    // (params, batch, head, seq_len, workspace, vtile, first_iter, end_iter): pointers and
    // indices are all 64-bit.
    let mut sig = module.make_signature();
    sig.params.extend([AbiParam::new(types::I64); 8]);
    let id = module.declare_function(symbol, linkage, &sig).map_err(merr)?;
    ctx.func.signature = sig;
    ctx.func.name = UserFuncName::user(0, id.as_u32());

    let fma = module.isa().has_native_fma();
    let config = module.target_config();
    let mut fctx = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let p = b.block_params(entry);
    let abi = [p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]];
    Lower::run(&mut b, prepared, &math, fma, abi);
    b.seal_all_blocks();
    b.finalize(config);
    Ok(id)
}

/// The Cranelift backend reads f32 tensors only (bf16/f16 inputs run in the interpreter and
/// the PTX backend); a kernel with a 16-bit load is a one-line error, not a miscompile.
fn reject_16bit_inputs(stmts: &[crate::ir::Stmt]) -> Result<(), CodegenError> {
    use crate::ir::{ElemType, Op, Stmt};
    for s in stmts {
        match s {
            Stmt::Let { op: Op::Load { elem, .. }, .. } if *elem != ElemType::F32 => {
                return Err(CodegenError(format!("cpu backend: {} input tensors are not supported yet", elem.name())));
            }
            Stmt::Loop { body, .. } => reject_16bit_inputs(body)?,
            _ => {}
        }
    }
    Ok(())
}
