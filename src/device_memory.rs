//! Peak device memory per image, for the memory column of the paper's tables, from the tool itself.
//!
//! CUDA only. A background thread samples the device's memory in use (`cuMemGetInfo`: total − free)
//! every millisecond; the figure reported for an image is the highest sample while its batch ran,
//! minus what was in use when the meter started (before the weights were loaded). So it counts the
//! weights, activations and the allocator's pool, as `nvidia-smi` would show for this process, and
//! not the CUDA context itself. Another process allocating on the same GPU meanwhile would be
//! counted too: on a cluster, give each process its own GPU.

use candle_core::Device;
#[cfg(feature = "cuda")]
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
#[cfg(feature = "cuda")]
use std::sync::Arc;

/// Samples device memory in use while alive; nothing on the CPU.
pub struct DeviceMemoryMeter {
    #[cfg(feature = "cuda")]
    cuda: Option<CudaMeter>,
}

#[cfg(feature = "cuda")]
struct CudaMeter {
    baseline: usize,
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    context: Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
}

impl DeviceMemoryMeter {
    /// Starts sampling `device` (on CUDA); call it before the model is loaded.
    pub fn start(device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        {
            let cuda = match device {
                Device::Cuda(cuda) => CudaMeter::start(cuda.cuda_stream().context().clone()),
                _ => None,
            };
            Self { cuda }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Self {}
        }
    }

    /// Forgets the peak so far: the next [`Self::peak_mib`] covers what runs from now on.
    pub fn reset(&self) {
        #[cfg(feature = "cuda")]
        if let Some(meter) = &self.cuda {
            meter.peak.store(meter.used().unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// The highest memory in use since the last reset, above the starting point, in MiB; `None` off CUDA.
    pub fn peak_mib(&self) -> Option<f64> {
        #[cfg(feature = "cuda")]
        if let Some(meter) = &self.cuda {
            // One last sample: a batch shorter than the sampling period still has one.
            let now = meter.used().unwrap_or(0);
            let peak = meter.peak.fetch_max(now, Ordering::Relaxed).max(now);
            let mib = peak.saturating_sub(meter.baseline) as f64 / (1024.0 * 1024.0);
            return Some((mib * 10.0).round() / 10.0);
        }
        None
    }
}

/// The memory a new allocation on `device` can count on now, in bytes: on the CPU the kernel's
/// `MemAvailable` (or what the process's cgroup still allows, if less), on CUDA the device's free
/// memory; `None` where it cannot be told. `SDSCALE_MEMORY_MIB` overrides it (to plan for less than
/// the machine has, and for tests).
pub fn available_bytes(device: &Device) -> Option<u64> {
    if let Some(mib) = std::env::var("SDSCALE_MEMORY_MIB").ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(mib << 20);
    }
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda.cuda_stream().context().mem_get_info().ok().map(|(free, _)| free as u64),
        Device::Cpu => cpu_available_bytes(),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

fn cpu_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    let system = kib << 10;
    // cgroup v2: a container's limit can be far below the machine's memory.
    let read = |name: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok()?.trim().parse::<u64>().ok();
    match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(current)) => Some(system.min(max.saturating_sub(current))),
        _ => Some(system),
    }
}

#[cfg(feature = "cuda")]
impl CudaMeter {
    fn start(context: Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>) -> Option<Self> {
        let baseline = used(&context)?;
        let peak = Arc::new(AtomicUsize::new(baseline));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_peak, thread_stop, thread_context) = (peak.clone(), stop.clone(), context.clone());
        std::thread::Builder::new()
            .name("device-memory".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    if let Some(now) = used(&thread_context) {
                        thread_peak.fetch_max(now, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
            .ok()?;
        Some(Self { baseline, peak, stop, context })
    }

    fn used(&self) -> Option<usize> {
        used(&self.context)
    }
}

/// Device memory in use now (total − free), in bytes.
#[cfg(feature = "cuda")]
fn used(context: &candle_core::cuda_backend::cudarc::driver::CudaContext) -> Option<usize> {
    context.mem_get_info().ok().map(|(free, total)| total.saturating_sub(free))
}

#[cfg(feature = "cuda")]
impl Drop for CudaMeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_reports_available_memory() {
        // Skipped when the override is set in the environment that runs the tests.
        if std::env::var_os("SDSCALE_MEMORY_MIB").is_none() {
            let available = available_bytes(&Device::Cpu).expect("/proc/meminfo on Linux");
            assert!(available > 1 << 20, "{available}");
        }
    }

    #[test]
    fn the_cpu_has_no_device_memory_figure() {
        let meter = DeviceMemoryMeter::start(&Device::Cpu);
        meter.reset();
        assert_eq!(meter.peak_mib(), None);
    }
}
