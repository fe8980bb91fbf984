//! Opt-in stage timings (`SDSCALE_PROFILE=1`): each lap synchronises the device first, so on CUDA the
//! time is the GPU's, not the launch queue's. Off by default and then free: one cached env lookup.

use candle_core::Device;
use std::sync::OnceLock;
use std::time::Instant;

pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("SDSCALE_PROFILE").is_some_and(|v| !v.is_empty() && v != "0"))
}

/// Laps of one pass (e.g. one UNet step), printed to stderr as `sdscale: profile <what> <lap> <ms>`.
pub struct Clock<'a> {
    what: &'static str,
    device: &'a Device,
    last: Option<Instant>,
}

impl<'a> Clock<'a> {
    pub fn start(what: &'static str, device: &'a Device) -> Self {
        let last = enabled().then(|| {
            let _ = device.synchronize();
            Instant::now()
        });
        Self { what, device, last }
    }

    pub fn lap(&mut self, name: impl std::fmt::Display) {
        if let Some(last) = self.last {
            let _ = self.device.synchronize();
            let now = Instant::now();
            eprintln!("sdscale: profile {} {name} {:.3} ms", self.what, (now - last).as_secs_f64() * 1e3);
            self.last = Some(now);
        }
    }
}
