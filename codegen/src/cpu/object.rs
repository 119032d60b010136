//! Ahead-of-time compilation: every phase of a program compiled into one relocatable object
//! file (cranelift-object), for `chunkc-build` to link into a program that carries no JIT.
//!
//! The functions have the JIT's signature (`mod.rs`) and are exported under
//! `chunkc_<prefix>_<kernel>`. They call the routines of `chunkc_runtime::cpu_support` by
//! their exported names (math, prefetch, and the SIMD routines of the chosen level), which
//! the program links with the runtime: the same code the JIT calls. The code is for the
//! build machine's ISA (as `-C target-cpu=native`); the linked program refuses to run on a
//! CPU without the SIMD level it was compiled for.

use super::{build, host_isa, plan_fused, CodegenError, Simd};
use crate::program::Program;
use chunkc_runtime::cpu_kernel::Resume;
use cranelift_module::{default_libcall_names, Linkage, Module};
use cranelift_object::{ObjectBuilder, ObjectModule};

/// One kernel of an object file: the phase it runs and what its executor needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectKernel {
    /// The phase's entry (`ProgramSpec::phases[i].entry`).
    pub entry: String,
    /// The exported function.
    pub symbol: String,
    /// Scratch bytes per call.
    pub workspace: usize,
    pub vtiles: usize,
    /// How the loop may run in pieces (time blocks), when it may.
    pub resume: Option<Resume>,
}

/// A program's kernels as object code.
pub struct ObjectCode {
    /// The SIMD level whose routines the code calls.
    pub simd: Simd,
    /// The relocatable object file (ELF on Linux, Mach-O on macOS).
    pub bytes: Vec<u8>,
    /// One per phase, in order.
    pub kernels: Vec<ObjectKernel>,
}

/// Compiles every phase of `program` into one object file calling the routines of `simd`
/// (or of the best level below it that the build machine has), the functions named
/// `chunkc_<prefix>_<kernel>` (`prefix` keeps two programs of one rule apart).
pub fn compile_object(program: &Program, prefix: &str, simd: Simd) -> Result<ObjectCode, CodegenError> {
    let simd = simd.min(Simd::best());
    let merr = |what: &str, e: String| CodegenError(format!("{what}: {e}"));
    let builder = ObjectBuilder::new(host_isa(true)?, format!("chunkc_{prefix}"), default_libcall_names())
        .map_err(|e| merr("object builder", e.to_string()))?;
    let mut module = ObjectModule::new(builder);
    let mut kernels = vec![];
    for kernel in &program.kernels {
        let prepared = plan_fused(kernel, simd)?;
        let symbol = format!("chunkc_{prefix}_{}", kernel.name);
        let mut ctx = module.make_context();
        let id = build(&mut module, &mut ctx, &prepared, simd, (&symbol, Linkage::Export))?;
        module
            .define_function(id, &mut ctx)
            .map_err(|e| merr(&format!("compiling {}", kernel.name), format!("{e:?}")))?;
        module.clear_context(&mut ctx);
        kernels.push(ObjectKernel {
            entry: kernel.name.clone(),
            symbol,
            workspace: prepared.plan.bytes,
            vtiles: kernel.vtiles,
            resume: crate::resume::analyse(&prepared.kernel),
        });
    }
    let bytes = module.finish().emit().map_err(|e| merr("writing the object file", e.to_string()))?;
    Ok(ObjectCode { simd, bytes, kernels })
}
