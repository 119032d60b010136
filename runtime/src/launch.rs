//! Kernel launches as an executor sees them: a [`Run`] is a set of device buffers and the
//! launches that use them, in order (the phases of a program), each with its PTX text, entry,
//! grid and block, dynamic shared memory, and its `.param` values: a buffer of the run, or a
//! 64-bit scalar. Buffers live for the whole run, so one launch reads what an earlier one
//! wrote (a program's intermediate tensors).
//!
//! This is a format, not an executor: the executors (`ptxsim::run`, `cuda::run`) take a
//! [`Run`] and know nothing about tensors, dtypes or the names of parameters. Turning a
//! program's description and tensors into a run, and read-back bytes into tensors, is
//! [`crate::abi`]'s job, so that a new element type or tensor changes one place and no
//! executor.

/// Everything about one launch but its arguments.
#[derive(Clone, Copy, Debug)]
pub struct Launch<'a> {
    pub ptx: &'a str,
    pub entry: &'a str,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_smem_bytes: usize,
    /// The compute capability the PTX targets, as `major * 10 + minor` (90 for sm_90); a
    /// device below it cannot load the module.
    pub sm: u32,
}

/// One `.param`, in declaration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// A pointer to buffer `i` of the run.
    Buffer(usize),
    /// A 64-bit scalar (`.u64`/`.s64`).
    U64(u64),
}

/// A device buffer of a run: its initial bytes, and whether its bytes after the last launch
/// are returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceBuffer {
    pub bytes: Vec<u8>,
    pub read_back: bool,
}

/// One launch with its arguments.
#[derive(Clone, Debug)]
pub struct KernelLaunch<'a> {
    pub launch: Launch<'a>,
    pub args: Vec<Arg>,
}

/// Buffers, then launches that run in order on them.
#[derive(Clone, Debug, Default)]
pub struct Run<'a> {
    pub buffers: Vec<DeviceBuffer>,
    pub launches: Vec<KernelLaunch<'a>>,
}

impl Run<'_> {
    /// Checks that every argument names a buffer of the run (an executor relies on it).
    pub fn check(&self) -> Result<(), String> {
        for l in &self.launches {
            for a in &l.args {
                if let Arg::Buffer(i) = a {
                    if *i >= self.buffers.len() {
                        return Err(format!("launch {} names buffer {i} of {}", l.launch.entry, self.buffers.len()));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The bytes of every `read_back` buffer after the last launch, in buffer order.
pub type ReadBack = Vec<Vec<u8>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ptxsim;

    /// out[i] = in[i] * 2 for i < n: one buffer in, one read back, one scalar.
    const DOUBLE: &str = r#"
.version 7.8
.target sm_80
.address_size 64
.visible .entry double(.param .u64 src, .param .u64 dst, .param .u64 n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<3>;
    .reg .b64 %rd<8>;
    .reg .f32 %f<3>;
    ld.param.u64 %rd1, [src];
    ld.param.u64 %rd2, [dst];
    ld.param.u64 %rd3, [n];
    mov.u32 %r1, %tid.x;
    cvt.u64.u32 %rd4, %r1;
    setp.ge.u64 %p1, %rd4, %rd3;
    @%p1 bra DONE;
    shl.b64 %rd5, %rd4, 2;
    add.s64 %rd6, %rd1, %rd5;
    ld.global.f32 %f1, [%rd6];
    add.rn.f32 %f2, %f1, %f1;
    add.s64 %rd7, %rd2, %rd5;
    st.global.f32 [%rd7], %f2;
DONE:
    ret;
}
"#;

    fn f32_bytes(x: &[f32]) -> Vec<u8> {
        x.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn buffers_and_scalars_reach_the_kernel_and_outputs_come_back() {
        let launch =
            Launch { ptx: DOUBLE, entry: "double", grid: [1, 1, 1], block: [32, 1, 1], dynamic_smem_bytes: 0, sm: 80 };
        let run = Run {
            buffers: vec![
                DeviceBuffer { bytes: f32_bytes(&[1.0, 2.5, -3.0]), read_back: false },
                DeviceBuffer { bytes: f32_bytes(&[f32::NAN; 4]), read_back: true },
            ],
            launches: vec![KernelLaunch { launch, args: vec![Arg::Buffer(0), Arg::Buffer(1), Arg::U64(3)] }],
        };
        let back = ptxsim::run(&run).expect("runs");
        assert_eq!(back.len(), 1);
        let out: Vec<f32> = back[0].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(&out[..3], &[2.0, 5.0, -6.0]);
        assert!(out[3].is_nan(), "the element past n stays poisoned");
    }

    /// A second launch reads what the first wrote: buffers live for the whole run.
    #[test]
    fn launches_share_the_runs_buffers() {
        let launch =
            Launch { ptx: DOUBLE, entry: "double", grid: [1, 1, 1], block: [32, 1, 1], dynamic_smem_bytes: 0, sm: 80 };
        let run = Run {
            buffers: vec![
                DeviceBuffer { bytes: f32_bytes(&[1.0, 2.0]), read_back: false },
                DeviceBuffer { bytes: f32_bytes(&[f32::NAN; 2]), read_back: false },
                DeviceBuffer { bytes: f32_bytes(&[f32::NAN; 2]), read_back: true },
            ],
            launches: vec![
                KernelLaunch { launch, args: vec![Arg::Buffer(0), Arg::Buffer(1), Arg::U64(2)] },
                KernelLaunch { launch, args: vec![Arg::Buffer(1), Arg::Buffer(2), Arg::U64(2)] },
            ],
        };
        let back = ptxsim::run(&run).expect("runs");
        let out: Vec<f32> = back[0].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(out, [4.0, 8.0]);
        let bad = Run { launches: vec![KernelLaunch { launch, args: vec![Arg::Buffer(7)] }], ..run };
        assert!(bad.check().is_err());
    }

    #[test]
    fn an_out_of_bounds_access_is_an_error_not_a_result() {
        let launch =
            Launch { ptx: DOUBLE, entry: "double", grid: [1, 1, 1], block: [32, 1, 1], dynamic_smem_bytes: 0, sm: 80 };
        // n = 8 but the buffers hold 3 and 4 elements.
        let run = Run {
            buffers: vec![
                DeviceBuffer { bytes: f32_bytes(&[1.0; 3]), read_back: false },
                DeviceBuffer { bytes: f32_bytes(&[0.0; 4]), read_back: true },
            ],
            launches: vec![KernelLaunch { launch, args: vec![Arg::Buffer(0), Arg::Buffer(1), Arg::U64(8)] }],
        };
        let err = ptxsim::run(&run).expect_err("out of bounds");
        assert_eq!(err.launch, 0);
        assert!(err.error.line > 0, "{}", err.error);
    }
}
