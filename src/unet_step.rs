//! The UNet call of the denoising loop: eager, or on CUDA replayed as a captured CUDA graph.
//!
//! A guided UNet step is a few thousand small kernels. Launched one by one from the host, the launches
//! rather than the GPU set the pace at small sizes (diffusers on an H100: 27 ms a step eager, 7.7 ms
//! replayed as a graph, at 224²). Every step of a loop runs the same kernels on same-shaped tensors;
//! only the latents and t's sinusoidal features change. So on CUDA the first step runs eagerly (loading
//! kernels and filling candle's cache of small host→device uploads, which a capture may not do), the
//! second is captured into a graph whose inputs are fixed buffers, and every later step copies its
//! inputs into those buffers and replays the graph: one launch instead of thousands. If anything in the
//! capture fails, the loop carries on eagerly and says so once.
//!
//! `SDSCALE_CUDA_GRAPH=0` turns graphs off (for comparison); measuring runs (the entropy probe reads
//! values back to the host) and profiled runs are always eager.

use crate::attention::{AttentionObserver, AttentionScale};
use crate::hires::UNetPlan;
use crate::models::unet::UNet2DConditionModel;
use candle_core::{Device, Result, Tensor};

pub struct UNetStepper {
    #[cfg(feature = "cuda")]
    graph: graph::State,
}

impl UNetStepper {
    /// `use_graph` (the load-time choice [`crate::backend::Backends::cuda_graph`]; `SDSCALE_CUDA_GRAPH=0`
    /// says no) only has an effect on CUDA builds and devices.
    pub fn new(device: &Device, use_graph: bool) -> Self {
        #[cfg(not(feature = "cuda"))]
        let _ = (device, use_graph);
        Self {
            #[cfg(feature = "cuda")]
            graph: graph::State::new(device, use_graph),
        }
    }

    /// The noise prediction for `sample` at `timestep`, the UNet run as `plan` says (a structural
    /// mode's plan changes from step to step: only the plain network is captured into a graph);
    /// `added`: SDXL's added features ([`UNet2DConditionModel::added_features`]). `on_warning` hears,
    /// once, why graphs were given up.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        unet: &UNet2DConditionModel,
        sample: &Tensor,
        timestep: f64,
        text: &Tensor,
        added: Option<&Tensor>,
        scale: AttentionScale,
        probe: Option<&dyn AttentionObserver>,
        plan: &UNetPlan,
        on_warning: &mut dyn FnMut(String),
    ) -> Result<Tensor> {
        let time = unet.time_features(timestep, sample.dim(0)?, sample.dtype(), sample.device())?;
        // SDXL's added conditioning rides along with the time features (the same every step).
        let time = match added {
            Some(added) => Tensor::cat(&[&time, added], 1)?,
            None => time,
        };
        #[cfg(feature = "cuda")]
        if probe.is_none() && plan.is_plain() {
            if let Some(out) = self.graph.step(unet, sample, &time, text, scale, on_warning)? {
                return Ok(out);
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = on_warning;
        unet.forward_with_time(sample, &time, text, scale, probe, plan)
    }
}

#[cfg(feature = "cuda")]
mod graph {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use candle_core::cuda_backend::cudarc::driver::CudaGraph;
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use std::any::Any;

    pub enum State {
        Off,
        /// Graphs wanted; the cache guard makes candle keep its small uploads (kernel dims/strides) on
        /// the device, keyed by content, so the capture finds them there instead of copying from the host.
        Warming {
            cache: Box<dyn Any>,
            device: CudaDevice,
            warmed: bool,
        },
        Ready(Captured),
        Failed,
    }

    pub struct Captured {
        // Field order is drop order: the output (graph memory) goes before the graph.
        out: Tensor,
        graph: CudaGraph,
        sample: Tensor,
        time: Tensor,
        text: Tensor,
        text_id: candle_core::TensorId,
        scale: AttentionScale,
        _cache: Box<dyn Any>,
    }

    impl State {
        pub fn new(device: &Device, use_graph: bool) -> Self {
            match device {
                Device::Cuda(cuda) if use_graph => {
                    let cache = Box::new(cuda.enable_cuda_graph_htod_cache());
                    State::Warming { cache, device: cuda.clone(), warmed: false }
                }
                _ => State::Off,
            }
        }

        /// Some(output) when the graph ran this step (captured now or replayed), None to run eagerly.
        pub fn step(
            &mut self,
            unet: &UNet2DConditionModel,
            sample: &Tensor,
            time: &Tensor,
            text: &Tensor,
            scale: AttentionScale,
            on_warning: &mut dyn FnMut(String),
        ) -> Result<Option<Tensor>> {
            match std::mem::replace(self, State::Failed) {
                State::Off => {
                    *self = State::Off;
                    Ok(None)
                }
                State::Failed => Ok(None),
                State::Warming { cache, device, warmed: true } => {
                    match capture(unet, sample, time, text, scale, &device, cache) {
                        Ok(captured) => {
                            let out = captured.out.copy()?;
                            *self = State::Ready(captured);
                            Ok(Some(out))
                        }
                        Err(e) => {
                            on_warning(format!("CUDA graph capture failed, continuing without graphs: {e}"));
                            Ok(None)
                        }
                    }
                }
                State::Warming { cache, device, warmed: false } => {
                    // This step runs eagerly under the cache guard; the next one is captured.
                    *self = State::Warming { cache, device, warmed: true };
                    Ok(None)
                }
                State::Ready(captured) => {
                    if captured.sample.dims() != sample.dims()
                        || captured.scale != scale
                        || captured.text.dims() != text.dims()
                    {
                        *self = State::Ready(captured);
                        return Ok(None);
                    }
                    captured.sample.slice_set(&sample.contiguous()?, 0, 0)?;
                    captured.time.slice_set(&time.contiguous()?, 0, 0)?;
                    if captured.text_id != text.id() {
                        captured.text.slice_set(&text.contiguous()?, 0, 0)?;
                    }
                    captured.graph.launch().w()?;
                    let out = captured.out.copy()?;
                    let mut captured = captured;
                    captured.text_id = text.id();
                    *self = State::Ready(captured);
                    Ok(Some(out))
                }
            }
        }
    }

    /// A fresh, contiguous device buffer holding `t`: a fixed address for the graph to read.
    fn buffer(t: &Tensor) -> Result<Tensor> {
        let buffer = Tensor::zeros(t.shape(), t.dtype(), t.device())?;
        buffer.slice_set(&t.contiguous()?, 0, 0)?;
        Ok(buffer)
    }

    fn capture(
        unet: &UNet2DConditionModel,
        sample: &Tensor,
        time: &Tensor,
        text: &Tensor,
        scale: AttentionScale,
        device: &CudaDevice,
        cache: Box<dyn Any>,
    ) -> Result<Captured> {
        let (sample_in, time_in, text_in) = (buffer(sample)?, buffer(time)?, buffer(text)?);
        let stream = device.cuda_stream();
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
        let out = unet.forward_with_time(&sample_in, &time_in, &text_in, scale, None, &UNetPlan::default());
        // End the capture whatever happened, or the stream stays in capture mode. Auto-free: the
        // output is allocated inside the graph and outlives each launch; the next launch frees it.
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        let out = out?;
        let graph = graph.w()?.ok_or_else(|| candle_core::Error::Msg("the captured CUDA graph is empty".into()))?;
        graph.launch().w()?;
        Ok(Captured {
            out,
            graph,
            sample: sample_in,
            time: time_in,
            text: text_in,
            text_id: text.id(),
            scale,
            _cache: cache,
        })
    }
}
