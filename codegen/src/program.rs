//! Programs of phases: a compiled rule as tile-IR kernels that run in order, exchanging named
//! tensors, with the ABI description ([`ProgramSpec`], owned by the runtime's format) that
//! every executor binds through.
//!
//! A [`Program`] is built by a plan (`plan::program`) and checked here: the kernels' parameter
//! names and accesses become the phases' parameter lists, so the description cannot drift
//! from the code, and [`ProgramSpec::validate`] holds the result to the ABI's rules.

use crate::ir::{Access, Kernel};
pub use chunkc_runtime::program::{
    Dim, PhaseKind, PhaseParam, PhaseSpec, ProgramSpec, Role, Sizes, SpecError, StaticSizes, TensorSpec,
};
use std::fmt;

/// A compiled rule: its phases' kernels, in order, and the ABI description.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub spec: ProgramSpec,
    /// One kernel per phase of `spec`, in the same order.
    pub kernels: Vec<Kernel>,
}

impl Program {
    /// The program running `kernels` in order over `tensors`. Each kernel's parameters must
    /// be tensors of the program (by name), each phase is chunk-parallel exactly when its
    /// kernel is, and the whole must satisfy [`ProgramSpec::validate`]; a failure is a bug
    /// in the plan that built it.
    pub fn new(
        name: impl Into<String>,
        chunk: usize,
        compiled_for: StaticSizes,
        tensors: Vec<TensorSpec>,
        kernels: Vec<Kernel>,
    ) -> Result<Program, SpecError> {
        let phases = kernels
            .iter()
            .map(|k| PhaseSpec {
                entry: k.name.clone(),
                kind: if k.chunk_parallel { PhaseKind::ChunkParallel } else { PhaseKind::Sequential },
                vtiles: k.vtiles.max(1),
                params: k
                    .params
                    .iter()
                    .map(|p| PhaseParam {
                        tensor: p.name.clone(),
                        access: match p.access {
                            Access::Read => chunkc_runtime::program::Access::Read,
                            Access::Write => chunkc_runtime::program::Access::Write,
                        },
                    })
                    .collect(),
            })
            .collect();
        let spec = ProgramSpec { name: name.into(), chunk, compiled_for, tensors, phases };
        spec.validate()?;
        for (i, k) in kernels.iter().enumerate() {
            if kernels[..i].iter().any(|j| j.name == k.name) {
                return Err(SpecError(format!("program {}: two phases are named {}", spec.name, k.name)));
            }
        }
        Ok(Program { spec, kernels })
    }

    /// The single kernel of a one-phase program.
    pub fn only_kernel(&self) -> Option<&Kernel> {
        match &self.kernels[..] {
            [k] => Some(k),
            _ => None,
        }
    }
}

impl fmt::Display for Program {
    /// The program's tensors and phases, then every phase's kernel.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec.describe())?;
        for k in &self.kernels {
            writeln!(f)?;
            write!(f, "{k}")?;
        }
        Ok(())
    }
}
