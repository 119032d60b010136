//! The CUDA executor (verification ladder, rung 6): runs a [`Run`] (a program's launches) on
//! device 0 through the driver API (cudarc), with buffers copied in and the read-back ones
//! copied out.
//!
//! libcuda is loaded at run time (cudarc's `dynamic-loading`), so this module builds and
//! links everywhere; a machine without a driver or a device gets [`CudaError::NoDriver`] or
//! [`CudaError::NoDevice`] from every call. cudarc panics when it cannot load the library or
//! a symbol (an older driver); every public function here runs inside [`guarded`], which
//! turns such a panic into [`CudaError::Panicked`] and keeps the panic message off stderr,
//! so that callers can print one line.

use crate::launch::{Arg, KernelLaunch, ReadBack, Run};
use cudarc::driver::{sys, CudaContext, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::cell::Cell;
use std::fmt;
use std::panic;
use std::sync::Once;

/// Dynamic shared memory a kernel may use without opting in (per block, every arch).
const SMEM_WITHOUT_OPT_IN: u32 = 48 * 1024;

/// Why a CUDA run did not happen or failed. One line when displayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaError {
    /// libcuda could not be loaded.
    NoDriver,
    /// The driver loaded but reports no device.
    NoDevice,
    /// The device cannot run this launch (compute capability, shared memory).
    Unsuitable(String),
    /// A driver call failed: what was being done, and the driver's error.
    Driver { during: &'static str, error: String },
    /// cudarc panicked (a missing driver symbol, ...): the first line of its message.
    Panicked(String),
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::NoDriver => f.write_str("no CUDA driver found (libcuda.so not loadable)"),
            CudaError::NoDevice => f.write_str("the CUDA driver found no device"),
            CudaError::Unsuitable(why) => f.write_str(why),
            CudaError::Driver { during, error } => write!(f, "{during}: {error}"),
            CudaError::Panicked(msg) => write!(f, "the CUDA bindings failed: {msg}"),
        }
    }
}

impl std::error::Error for CudaError {}

/// A closure for `map_err` that names the step that failed.
fn during(step: &'static str) -> impl Fn(DriverError) -> CudaError {
    move |e| CudaError::Driver { during: step, error: e.to_string().replace('\n', " ") }
}

thread_local! {
    /// Set while this thread runs inside [`guarded`]: its panics are caught and reported
    /// as errors, so the panic hook stays silent for them.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic inside it into [`CudaError::Panicked`] without printing it.
/// The process-wide panic hook is wrapped once; it stays silent only on a thread that is
/// inside `guarded`, so panics elsewhere (other test threads) print as before.
fn guarded<T>(f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    static WRAP_HOOK: Once = Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was_quiet = QUIET.with(|q| q.replace(true));
    let result = panic::catch_unwind(panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was_quiet));
    result.unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        Err(CudaError::Panicked(msg.lines().next().unwrap_or("").to_string()))
    })
}

/// Loads the driver and counts devices (no panic, no output): `NoDriver` when libcuda is
/// not loadable, `NoDevice` when it reports none.
fn probe() -> Result<usize, CudaError> {
    // SAFETY: only tries to open the library (libloading), calling nothing in it.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err(CudaError::NoDevice),
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => Err(CudaError::NoDevice),
        Err(e) => Err(during("initialising the CUDA driver")(e)),
    }
}

/// The number of CUDA devices; an error when there is no driver or no device.
pub fn device_count() -> Result<usize, CudaError> {
    guarded(probe)
}

/// Device 0, as [`run`] uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    /// `major * 10 + minor` (90 for an H100).
    pub sm: u32,
}

/// The name and compute capability of device 0.
pub fn device_info() -> Result<DeviceInfo, CudaError> {
    guarded(|| {
        probe()?;
        let ctx = CudaContext::new(0).map_err(during("creating a context on device 0"))?;
        info(&ctx)
    })
}

fn info(ctx: &CudaContext) -> Result<DeviceInfo, CudaError> {
    let name = ctx.name().map_err(during("reading the device name"))?;
    let (major, minor) = ctx.compute_capability().map_err(during("reading the compute capability"))?;
    Ok(DeviceInfo { name, sm: (major * 10 + minor).max(0) as u32 })
}

/// Runs a [`Run`] on device 0: every buffer is copied to the device once, the launches run
/// in order on the default stream (so each sees what the ones before it wrote), and the
/// `read_back` buffers are copied back in buffer order after the last.
pub fn run(run: &Run) -> Result<ReadBack, CudaError> {
    guarded(|| run_on_device_0(run))
}

/// Times a [`Run`] on device 0 with CUDA events: the module is loaded and the buffers are
/// copied once, `warmups` runs of every launch go first, then each of `runs` is timed from an
/// event recorded before its first launch to one after its last. Milliseconds per run.
pub fn time(run: &Run, warmups: usize, runs: usize) -> Result<Vec<f64>, CudaError> {
    guarded(|| {
        let loaded = Loaded::new(run)?;
        for _ in 0..warmups {
            loaded.launch_all()?;
        }
        loaded.stream.synchronize().map_err(during("running the warm-up"))?;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let event = || loaded.ctx.new_event(timing).map_err(during("creating a timing event"));
        let mut out = Vec::with_capacity(runs);
        for _ in 0..runs {
            let (start, end) = (event()?, event()?);
            start.record(&loaded.stream).map_err(during("recording the start event"))?;
            loaded.launch_all()?;
            end.record(&loaded.stream).map_err(during("recording the end event"))?;
            out.push(f64::from(start.elapsed_ms(&end).map_err(during("reading the elapsed time"))?));
        }
        Ok(out)
    })
}

fn run_on_device_0(run: &Run) -> Result<ReadBack, CudaError> {
    let loaded = Loaded::new(run)?;
    loaded.launch_all()?;
    loaded.stream.synchronize().map_err(during("running the kernels"))?;
    let mut back = vec![];
    for (b, buf) in run.buffers.iter().zip(&loaded.buffers) {
        if b.read_back {
            let mut data = loaded.stream.clone_dtoh(buf).map_err(during("copying outputs to the host"))?;
            data.truncate(b.bytes.len());
            back.push(data);
        }
    }
    Ok(back)
}

/// A [`Run`] ready to launch on device 0: its buffers on the device, its modules loaded, each
/// launch's function and configuration (launches with an empty grid are left out).
struct Loaded<'r> {
    ctx: std::sync::Arc<CudaContext>,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    buffers: Vec<cudarc::driver::CudaSlice<u8>>,
    kernels: Vec<(cudarc::driver::CudaFunction, LaunchConfig, &'r [Arg])>,
}

impl<'r> Loaded<'r> {
    fn new(run: &'r Run) -> Result<Loaded<'r>, CudaError> {
        run.check().map_err(CudaError::Unsuitable)?;
        probe()?;
        let ctx = CudaContext::new(0).map_err(during("creating a context on device 0"))?;
        let dev = info(&ctx)?;
        let stream = ctx.default_stream();
        let mut buffers = Vec::with_capacity(run.buffers.len());
        for b in &run.buffers {
            buffers.push(if b.bytes.is_empty() {
                stream.alloc_zeros::<u8>(1).map_err(during("allocating device memory"))?
            } else {
                stream.clone_htod(b.bytes.as_slice()).map_err(during("copying inputs to the device"))?
            });
        }
        // One module per distinct PTX text (a program's phases usually share none).
        let mut modules: Vec<(&str, std::sync::Arc<cudarc::driver::CudaModule>)> = vec![];
        let mut kernels = vec![];
        for KernelLaunch { launch, args } in &run.launches {
            if dev.sm < launch.sm {
                return Err(CudaError::Unsuitable(format!(
                    "kernel {} targets sm_{} but device 0 ({}) is sm_{}",
                    launch.entry, launch.sm, dev.name, dev.sm
                )));
            }
            let smem = u32::try_from(launch.dynamic_smem_bytes).map_err(|_| {
                CudaError::Unsuitable(format!(
                    "kernel {} asks for {} bytes of dynamic shared memory, more than any launch takes",
                    launch.entry, launch.dynamic_smem_bytes
                ))
            })?;
            if launch.grid.contains(&0) {
                continue;
            }
            let module = match modules.iter().find(|(p, _)| *p == launch.ptx) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = ctx.load_module(Ptx::from_src(launch.ptx)).map_err(during("loading the PTX module"))?;
                    modules.push((launch.ptx, m.clone()));
                    m
                }
            };
            let func = module.load_function(launch.entry).map_err(during("finding the kernel's entry"))?;
            if smem > SMEM_WITHOUT_OPT_IN {
                let most = ctx
                    .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                    .map_err(during("reading the shared-memory limit"))?;
                if i64::from(smem) > i64::from(most) {
                    return Err(CudaError::Unsuitable(format!(
                        "kernel {} needs {smem} bytes of shared memory per block; device 0 ({}) allows {most}",
                        launch.entry, dev.name
                    )));
                }
                func.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .map_err(during("raising the kernel's dynamic shared-memory limit"))?;
            }
            let [gx, gy, gz] = launch.grid;
            let [bx, by, bz] = launch.block;
            let cfg = LaunchConfig { grid_dim: (gx, gy, gz), block_dim: (bx, by, bz), shared_mem_bytes: smem };
            kernels.push((func, cfg, args.as_slice()));
        }
        Ok(Loaded { ctx, stream, buffers, kernels })
    }

    /// Queues every launch, in order, on the default stream (so each sees what the ones before
    /// it wrote); the caller synchronises.
    fn launch_all(&self) -> Result<(), CudaError> {
        for (func, cfg, args) in &self.kernels {
            let mut builder = self.stream.launch_builder(func);
            let scalars: Vec<u64> = args
                .iter()
                .filter_map(|a| match a {
                    Arg::U64(x) => Some(*x),
                    Arg::Buffer(_) => None,
                })
                .collect();
            let mut next_scalar = scalars.iter();
            for arg in args.iter() {
                match arg {
                    Arg::Buffer(i) => {
                        builder.arg(&self.buffers[*i]);
                    }
                    Arg::U64(_) => {
                        if let Some(x) = next_scalar.next() {
                            builder.arg(x);
                        }
                    }
                }
            }
            // SAFETY: the arguments follow the entry's `.param` list in order (the launch ABI,
            // `crate::abi`), every buffer is as large as the problem the kernel indexes, and
            // the caller synchronises the stream before any buffer is read or freed.
            unsafe { builder.launch(*cfg) }.map_err(during("launching the kernel"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_the_guard_becomes_an_error_with_its_message() {
        let r: Result<(), CudaError> = guarded(|| panic!("Missing symbol cuFoo\nsecond line"));
        assert_eq!(r, Err(CudaError::Panicked("Missing symbol cuFoo".into())));
        // The thread is loud again afterwards, and a guarded Ok passes through.
        assert!(!QUIET.with(Cell::get));
        assert_eq!(guarded(|| Ok(3)), Ok(3));
    }

    /// What the guard is for: without libcuda, cudarc 0.19 panics on the first driver call
    /// (its lazy library load). The guard must turn that into an error.
    #[test]
    fn cudarc_panics_without_libcuda_and_the_guard_catches_it() {
        // SAFETY: only tries to open the library.
        if unsafe { sys::is_culib_present() } {
            return; // the unguarded call would succeed here: nothing to show
        }
        let r = guarded(|| CudaContext::device_count().map_err(during("counting devices")));
        match r {
            Err(CudaError::Panicked(msg)) => assert!(msg.contains("cuda"), "{msg}"),
            other => panic!("expected a caught panic, got {other:?}"),
        }
    }

    /// Without libcuda every entry point reports `NoDriver` (and never panics); with a driver
    /// the count and the device agree.
    #[test]
    fn probing_never_panics_and_agrees_with_the_library_check() {
        // SAFETY: only tries to open the library.
        let present = unsafe { sys::is_culib_present() };
        let count = device_count();
        if !present {
            assert_eq!(count, Err(CudaError::NoDriver));
            assert_eq!(device_info(), Err(CudaError::NoDriver));
            let launch = crate::launch::Launch {
                ptx: "",
                entry: "none",
                grid: [1, 1, 1],
                block: [1, 1, 1],
                dynamic_smem_bytes: 0,
                sm: 80,
            };
            let one = Run { buffers: vec![], launches: vec![KernelLaunch { launch, args: vec![] }] };
            assert_eq!(run(&one), Err(CudaError::NoDriver));
        } else if let Ok(n) = count {
            assert!(n > 0);
            assert!(device_info().is_ok());
        }
    }
}
