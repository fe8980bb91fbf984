//! Opt-in timings (`SDSCALE_PROFILE=1`), off by default and then free: one cached switch
//! (crate::backend). The model load prints the backends it chose (`sdscale: profile backends …`).
//!
//! Two views of one UNet step, printed to stderr as `sdscale: profile …`:
//! - [`Clock`] laps per block: each lap synchronises the device first, so on CUDA the time is the GPU's,
//!   not the launch queue's;
//! - [`op`] spans per op kind (conv, matmul, attention, norm, elementwise): on CUDA a pair of CUDA events
//!   around each span (no synchronisation, so the GPU keeps its queue full), on the CPU the wall clock.
//!   What no span covers — launch gaps and the few unlabelled ops — is reported as the rest of the step.

use candle_core::{Device, Result};
use std::cell::RefCell;
use std::time::Instant;

pub fn enabled() -> bool {
    crate::backend::switch_or_default(|switches| switches.profile)
}

/// What a span of work is, for the per-kind totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Convolutions, bias included (im2col + GEMM in candle).
    Conv,
    /// Linear layers: GEMMs over tokens.
    Matmul,
    /// The attention core: q·kᵀ, softmax, ·v (the projections are Matmul).
    Attention,
    /// Group and layer norms.
    Norm,
    /// Activations, residual adds, concatenations, layout copies.
    Elementwise,
}

const KINDS: [OpKind; 5] = [OpKind::Conv, OpKind::Matmul, OpKind::Attention, OpKind::Norm, OpKind::Elementwise];

enum Mark {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Event(candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

impl Mark {
    fn now(device: &Device) -> Option<Mark> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
                cuda.cuda_stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).ok().map(Mark::Event)
            }
            _ => Some(Mark::Host(Instant::now())),
        }
    }

    /// Milliseconds from `self` to `end`; on CUDA only valid once the device has been synchronised.
    fn ms_until(&self, end: &Mark) -> f64 {
        match (self, end) {
            (Mark::Host(a), Mark::Host(b)) => (*b - *a).as_secs_f64() * 1e3,
            #[cfg(feature = "cuda")]
            (Mark::Event(a), Mark::Event(b)) => a.elapsed_ms(b).map(f64::from).unwrap_or(f64::NAN),
            #[allow(unreachable_patterns)]
            _ => f64::NAN,
        }
    }
}

/// The spans of the pass a [`Clock`] is timing. Nested spans are not recorded (`depth`): the outermost
/// kind owns its time.
struct SpanLog {
    depth: usize,
    spans: Vec<(OpKind, Mark, Mark)>,
}

thread_local! {
    /// None when no clock runs.
    static SPANS: RefCell<Option<SpanLog>> = const { RefCell::new(None) };
}

/// Runs `f` as one span of `kind` when profiling, else just runs it.
pub fn op<T>(kind: OpKind, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() || SPANS.with(|log| log.borrow().as_ref().is_none_or(|log| log.depth > 0)) {
        return f();
    }
    SPANS.with(|log| log.borrow_mut().as_mut().map(|log| log.depth += 1));
    let start = Mark::now(device);
    let out = f();
    let end = Mark::now(device);
    SPANS.with(|log| {
        if let Some(log) = log.borrow_mut().as_mut() {
            log.depth -= 1;
            if let (Some(start), Some(end)) = (start, end) {
                log.spans.push((kind, start, end));
            }
        }
    });
    out
}

/// Laps of one pass (e.g. one UNet step), printed to stderr as `sdscale: profile <what> <lap> <ms>`,
/// then, on [`Clock::finish`], the pass's time per [`OpKind`].
pub struct Clock<'a> {
    what: &'static str,
    device: &'a Device,
    started: Option<Instant>,
    last: Option<Instant>,
}

impl<'a> Clock<'a> {
    pub fn start(what: &'static str, device: &'a Device) -> Self {
        let last = enabled().then(|| {
            let _ = device.synchronize();
            SPANS.with(|log| *log.borrow_mut() = Some(SpanLog { depth: 0, spans: Vec::new() }));
            Instant::now()
        });
        Self { what, device, started: last, last }
    }

    pub fn lap(&mut self, name: impl std::fmt::Display) {
        if let Some(last) = self.last {
            let _ = self.device.synchronize();
            let now = Instant::now();
            eprintln!("sdscale: profile {} {name} {:.3} ms", self.what, (now - last).as_secs_f64() * 1e3);
            self.last = Some(now);
        }
    }

    /// Prints the pass's total and its time per op kind.
    pub fn finish(self) {
        let Some(started) = self.started else { return };
        let _ = self.device.synchronize();
        let total = started.elapsed().as_secs_f64() * 1e3;
        let spans = SPANS.with(|log| log.borrow_mut().take()).map(|log| log.spans).unwrap_or_default();
        let mut covered = 0.0;
        for kind in KINDS {
            let (count, ms) = spans
                .iter()
                .filter(|(k, _, _)| *k == kind)
                .fold((0, 0.0), |(n, sum), (_, start, end)| (n + 1, sum + start.ms_until(end)));
            covered += ms;
            let share = 100.0 * ms / total;
            eprintln!("sdscale: profile {}-ops {kind:?} {ms:.3} ms ({share:.1}%, {count} spans)", self.what);
        }
        let rest = total - covered;
        eprintln!(
            "sdscale: profile {}-ops rest(launch gaps, unlabelled, profiling syncs) {rest:.3} ms ({:.1}%)",
            self.what,
            100.0 * rest / total
        );
        eprintln!("sdscale: profile {}-ops total {total:.3} ms", self.what);
    }
}
