//! A kernel launch as an executor sees it: PTX text, the entry, grid and block, dynamic
//! shared memory, and the `.param` values in order, each a byte buffer or a 64-bit scalar.
//!
//! The executors ([`simulate`] here, `cuda::run`) know nothing about tensors, dtypes or the
//! names of parameters: turning launch metadata and tensors into [`Arg`]s, and read-back
//! bytes into tensors, is [`crate::abi`]'s job, so that a new
//! element type or parameter changes one place and no executor.

use crate::ptxsim::{self, GlobalMemory, SimError, SimParam};

/// Everything but the arguments.
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
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    /// A pointer to a fresh device buffer holding `bytes`; when `read_back` is set, the
    /// buffer's bytes after the launch are returned.
    Buffer { bytes: Vec<u8>, read_back: bool },
    /// A 64-bit scalar (`.u64`/`.s64`).
    U64(u64),
}

/// The bytes of every `read_back` buffer after the launch, in argument order.
pub type ReadBack = Vec<Vec<u8>>;

/// Runs the launch in the PTX simulator ([`ptxsim`]), which checks every access as it goes.
pub fn simulate(launch: &Launch, args: &[Arg]) -> Result<ReadBack, SimError> {
    let mut memory = GlobalMemory::new();
    let mut params = Vec::with_capacity(args.len());
    let mut back = vec![];
    for arg in args {
        match arg {
            Arg::Buffer { bytes, read_back } => {
                let base = memory.alloc(bytes.len());
                if let Some(dst) = memory.bytes_mut(base, bytes.len()) {
                    dst.copy_from_slice(bytes);
                }
                if *read_back {
                    back.push((base, bytes.len()));
                }
                params.push(SimParam::U64(base));
            }
            Arg::U64(x) => params.push(SimParam::U64(*x)),
        }
    }
    ptxsim::launch(
        launch.ptx,
        launch.entry,
        launch.grid,
        launch.block,
        launch.dynamic_smem_bytes,
        &params,
        &mut memory,
    )?;
    back.into_iter()
        .map(|(base, len)| {
            memory
                .bytes(base, len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| SimError { line: 0, message: format!("buffer at {base:#x} vanished") })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let args = [
            Arg::Buffer { bytes: f32_bytes(&[1.0, 2.5, -3.0]), read_back: false },
            Arg::Buffer { bytes: f32_bytes(&[f32::NAN; 4]), read_back: true },
            Arg::U64(3),
        ];
        let back = simulate(&launch, &args).expect("runs");
        assert_eq!(back.len(), 1);
        let out: Vec<f32> = back[0].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(&out[..3], &[2.0, 5.0, -6.0]);
        assert!(out[3].is_nan(), "the element past n stays poisoned");
    }

    #[test]
    fn an_out_of_bounds_access_is_an_error_not_a_result() {
        let launch =
            Launch { ptx: DOUBLE, entry: "double", grid: [1, 1, 1], block: [32, 1, 1], dynamic_smem_bytes: 0, sm: 80 };
        // n = 8 but the buffers hold 3 and 4 elements.
        let args = [
            Arg::Buffer { bytes: f32_bytes(&[1.0; 3]), read_back: false },
            Arg::Buffer { bytes: f32_bytes(&[0.0; 4]), read_back: true },
            Arg::U64(8),
        ];
        let err = simulate(&launch, &args).expect_err("out of bounds");
        assert!(err.line > 0, "{err}");
    }
}
