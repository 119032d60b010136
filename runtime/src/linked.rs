//! Programs whose kernels were compiled when the program using them was built
//! (`chunkc-build`): CPU kernels linked into it as object code ([`LinkedProgram`], run by the
//! CPU executor) and PTX text embedded in it ([`LinkedPtx`], run on a CUDA device or in the
//! PTX simulator). The program description ([`ProgramSpec`]) travels as JSON. Nothing here
//! compiles; a program that embeds kernels this way needs this crate only.

use crate::artifact::LaunchMeta;
use crate::cpu_kernel::{CpuKernel, NativeKernel};
use crate::cpu_support::Simd;
use crate::error::RuntimeError;
use crate::exec::{self, Order, ProgramMemory};
use crate::program::{Dim, ProgramSpec, Role, Sizes};
use crate::tensor::Tensor;
use crate::view::TensorRef;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// A compiled program: its description and one linked kernel per phase.
pub struct LinkedProgram {
    spec: ProgramSpec,
    kernels: Vec<NativeKernel>,
    /// Tokens per time block of the executor (the schedule's; 0: whole sequences).
    time_block: usize,
}

impl LinkedProgram {
    /// The program described by `spec_json` with `kernels`, one per phase in order, run in
    /// time blocks of `time_block` tokens where the kernels allow it; `simd` names the SIMD
    /// level whose routines the kernels call (refused when this CPU lacks it).
    ///
    /// # Safety
    /// Each kernel's function must be the compiled code of its phase of exactly this
    /// description (as `chunkc-build` generates them side by side): the executor trusts the
    /// description's shapes for every pointer it hands the kernel.
    pub unsafe fn new(
        spec_json: &str,
        kernels: Vec<NativeKernel>,
        time_block: usize,
        simd: &str,
    ) -> Result<LinkedProgram, RuntimeError> {
        let bad = |m: String| RuntimeError::BadTensor(m);
        let level = [Simd::Portable, Simd::Avx2, Simd::Avx512].into_iter().find(|l| l.name() == simd);
        match level {
            Some(l) if l.available() => {}
            Some(_) => return Err(bad(format!("the kernels were compiled for {simd} routines, which this CPU lacks"))),
            None => return Err(bad(format!("the kernels call an unknown SIMD level `{simd}`"))),
        }
        let spec: ProgramSpec =
            serde_json::from_str(spec_json).map_err(|e| bad(format!("a linked program's description: {e}")))?;
        spec.validate().map_err(|e| bad(e.to_string()))?;
        let matches = kernels.len() == spec.phases.len()
            && kernels.iter().zip(&spec.phases).all(|(k, p)| k.entry() == p.entry && k.vtiles().max(1) == p.vtiles);
        if !matches {
            return Err(bad(format!("program {}: the linked kernels are not its phases", spec.name)));
        }
        Ok(LinkedProgram { spec, kernels, time_block })
    }

    pub fn spec(&self) -> &ProgramSpec {
        &self.spec
    }

    /// Runs the program on `inputs` (by name; an optional one, like `h0`, may be left out)
    /// on `threads` workers (0: all cores), B and T read off the per-token inputs, every
    /// shape checked. Returns the outputs by name, NaN-filled before the run.
    pub fn forward(
        &self,
        inputs: &[(&str, &TensorRef<'_>)],
        threads: usize,
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        let spec = &self.spec;
        let (sizes, dense) = bind_inputs(spec, inputs)?;
        let mut memory = ProgramMemory::new(spec, sizes).map_err(|e| RuntimeError::BadTensor(e.to_string()))?;
        let threads = if threads == 0 { exec::default_threads() } else { threads };
        let order = Order { threads, time_block: self.time_block, poison_scratch: false };
        let kernels: Vec<&dyn CpuKernel> = self.kernels.iter().map(|k| k as &dyn CpuKernel).collect();
        let get = |name: &str| dense.get(name).map(|d| &**d);
        exec::run_program(spec, &kernels, &get, &mut memory, order)
            .map_err(|e| RuntimeError::BadTensor(e.to_string()))?;
        memory.into_outputs(spec).map_err(|e| RuntimeError::BadTensor(e.to_string()))
    }
}

/// Inputs by name as dense f32 (borrowed where they already are).
type DenseInputs<'i> = BTreeMap<String, Cow<'i, [f32]>>;

/// Checks `inputs` against `spec` (names, shapes for the B and T the per-token inputs give)
/// and returns the sizes and the inputs as dense f32.
fn bind_inputs<'i>(
    spec: &ProgramSpec,
    inputs: &[(&str, &TensorRef<'i>)],
) -> Result<(Sizes, DenseInputs<'i>), RuntimeError> {
    let bad = |m: String| Err(RuntimeError::BadTensor(m));
    for (name, _) in inputs {
        if !spec.tensor(name).is_some_and(|t| t.role == Role::Input) {
            let takes: Vec<&str> = spec.with_role(Role::Input).map(|t| t.name.as_str()).collect();
            return bad(format!("program {} takes no tensor `{name}` (it takes: {})", spec.name, takes.join(", ")));
        }
    }
    let c = spec.compiled_for;
    let (mut batch, mut seq_len) = (None, None);
    for (name, t) in inputs {
        let dims = &spec.tensor(name).map(|s| s.dims.clone()).unwrap_or_default();
        let at = |d: Dim| dims.iter().position(|x| *x == d);
        if let (Some(b), Some(s)) = (at(Dim::Batch), at(Dim::SeqLen)) {
            if t.shape().len() == dims.len() {
                batch = batch.or(Some(t.shape()[b]));
                seq_len = seq_len.or(Some(t.shape()[s]));
            }
        }
    }
    let (Some(batch), Some(seq_len)) = (batch, seq_len) else {
        return bad(format!("program {}: no per-token input to read B and T from", spec.name));
    };
    let sizes = Sizes { batch, seq_len, heads: c.heads, k: c.k, v: c.v };
    let mut dense = BTreeMap::new();
    for t in spec.with_role(Role::Input) {
        match inputs.iter().find(|(n, _)| *n == t.name) {
            Some((_, view)) => {
                let want = spec.shape(t, &sizes).map_err(|e| RuntimeError::BadTensor(e.to_string()))?;
                if view.shape() != want.as_slice() {
                    return Err(RuntimeError::ShapeMismatch {
                        name: t.name.clone(),
                        expected: want,
                        got: view.shape().to_vec(),
                        dims: t.dims_label(),
                    });
                }
                dense.insert(t.name.clone(), view.to_f32());
            }
            None if t.optional => {}
            None => {
                return Err(RuntimeError::MissingTensor {
                    name: t.name.clone(),
                    path: "the call".into(),
                    available: inputs.iter().map(|(n, _)| n.to_string()).collect(),
                })
            }
        }
    }
    Ok((sizes, dense))
}

/// Where [`LinkedPtx::forward`] runs the PTX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// CUDA device 0 (the driver is loaded at run time; no CUDA toolkit needed to build).
    Cuda,
    /// chunkc's PTX simulator: every GPU thread interpreted on the CPU, every access checked
    /// (slow; small problems).
    Simulator,
}

/// A program's PTX, embedded by `chunkc-build`: its description and each phase's PTX text
/// and launch metadata, bound to tensors through the launch ABI (`crate::abi`).
pub struct LinkedPtx {
    spec: ProgramSpec,
    phases: Vec<(String, LaunchMeta)>,
}

impl LinkedPtx {
    /// The program described by `spec_json` with `phases`, (entry, PTX text, launch
    /// metadata as JSON) in phase order.
    pub fn new(spec_json: &str, phases: &[(&str, &str, &str)]) -> Result<LinkedPtx, RuntimeError> {
        let bad = |m: String| RuntimeError::BadTensor(m);
        let spec: ProgramSpec =
            serde_json::from_str(spec_json).map_err(|e| bad(format!("a linked program's description: {e}")))?;
        spec.validate().map_err(|e| bad(e.to_string()))?;
        let mut parsed = vec![];
        for (entry, ptx, meta) in phases {
            let meta: LaunchMeta =
                serde_json::from_str(meta).map_err(|e| bad(format!("phase {entry}'s launch metadata: {e}")))?;
            parsed.push((ptx.to_string(), meta));
        }
        let matches =
            parsed.len() == spec.phases.len() && parsed.iter().zip(&spec.phases).all(|((_, m), p)| m.entry == p.entry);
        if !matches {
            return Err(bad(format!("program {}: the PTX kernels are not its phases", spec.name)));
        }
        Ok(LinkedPtx { spec, phases: parsed })
    }

    /// Runs the program's PTX on `device` with `inputs` as [`LinkedProgram::forward`] takes
    /// them. Returns the outputs by name.
    pub fn forward(
        &self,
        device: Device,
        inputs: &[(&str, &TensorRef<'_>)],
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        let (sizes, dense) = bind_inputs(&self.spec, inputs)?;
        let phases: Vec<_> = self.phases.iter().map(|(ptx, meta)| (ptx.as_str(), meta)).collect();
        let input = |name: &str| dense.get(name).map(|d| &**d);
        let bound = crate::abi::bind_program(&self.spec, &phases, &sizes, input)
            .map_err(|e| RuntimeError::BadTensor(e.to_string()))?;
        let back = match device {
            Device::Cuda => crate::cuda::run(&bound.run).map_err(|e| RuntimeError::BadTensor(e.to_string()))?,
            Device::Simulator => crate::ptxsim::run(&bound.run).map_err(|e| {
                let entry = self.phases.get(e.launch).map_or("?", |p| p.1.entry.as_str());
                RuntimeError::BadTensor(format!(
                    "PTX simulator, kernel {entry}: {}",
                    e.error.to_string().replace('\n', "; ")
                ))
            })?,
        };
        bound.outputs(back).map_err(|e| RuntimeError::BadTensor(e.to_string()))
    }
}
