//! Which implementation computes each kind of op, chosen once when a model loads (as candle-transformers
//! passes `use_flash_attn` to its models) from the device, the compute dtype and the `SDSCALE_*`
//! switches, then handed to every layer as it is built. The layers dispatch on the choice; the kernels
//! (crate::kernels) only compute. A new backend is a variant here, a kernel there, and an arm in the
//! layer (models/layers.rs) or attention (attention.rs) that runs it.
//!
//! Every switch lives here and follows one rule: unset or empty keeps the default; `1`, `true`, `on` or
//! `yes` turns it on; `0`, `false`, `off` or `no` turns it off; anything else is refused when the model
//! loads, naming the variable.
//!
//! | variable                   | default | what                                                          |
//! |----------------------------|---------|---------------------------------------------------------------|
//! | `SDSCALE_PROFILE`          | off     | per-block and per-op-kind timings of every UNet step (profile.rs) |
//! | `SDSCALE_FLASH_ATTN2`      | on      | FlashAttention-2 for f16/bf16 attention on CUDA, in builds with the `flash-attn` feature |
//! | `SDSCALE_FLASH_ATTENTION`  | off     | sdscale's fused CUDA attention for f16 heads of 64             |
//! | `SDSCALE_MAP_WEIGHTS`      | on      | weights are their mapped file's pages (weights/mapped.rs)      |
//! | `SDSCALE_CUDA_CONV`        | on      | sdscale's im2col + cuBLAS convolution on CUDA (off: candle's)  |
//! | `SDSCALE_CUDA_GRAPH`       | on      | replay the UNet step as a CUDA graph (unet_step.rs)            |
//! | `SDSCALE_NO_MALLOPT`       | off     | leave glibc's allocator thresholds alone (lib.rs)              |

use candle_core::{DType, Device};
use std::sync::OnceLock;

/// The attention core (q·kᵀ, softmax, ·v).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionBackend {
    /// f32 on the CPU: blocks of query rows whose scores stay in cache (kernels/cpu/attention.rs).
    CpuBlocks,
    /// f16/bf16 on a GPU: cuBLAS GEMMs around candle's fused softmax, in the inputs' precision.
    GpuHalf,
    /// f16/bf16 on CUDA in builds with the `flash-attn` feature: FlashAttention-2's kernels
    /// (kernels/cuda/flash_attn2.rs) for head sizes they cover (every SD and LDM layer), the f32 chunked
    /// path for others.
    FlashAttn2,
    /// f16 on CUDA with `SDSCALE_FLASH_ATTENTION=1`: sdscale's fused kernel (kernels/cuda/
    /// flash_attention.rs) for layers with heads of 64, [`AttentionBackend::GpuHalf`] for the others.
    FusedCuda,
    /// Anything else: query chunks in f32 through candle's ops.
    Chunked,
}

/// 2-D convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvBackend {
    /// f32 on the CPU: banded im2col + one gemm per band (kernels/cpu/conv.rs).
    CpuIm2col,
    /// f16/f32 on CUDA: sdscale's im2col kernel + cuBLAS (kernels/cuda/conv.rs); inputs too large for
    /// its 32-bit indices go to candle's.
    CudaIm2col,
    /// candle's convolution.
    Candle,
}

/// GroupNorm (with the SiLU that follows it fused in where the backend can).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormBackend {
    /// f32 on the CPU: f64 statistics and one output pass, SiLU fused (kernels/cpu/ops.rs).
    CpuFused,
    /// f16/bf16/f32 on CUDA: each group one row of candle's fused layer-norm kernel, then the affine.
    CudaRows,
    /// candle-nn's GroupNorm.
    Candle,
}

/// Linear layers and the GEGLU gate after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearBackend {
    /// f32 on the CPU: one gemm with the bias pre-filled; GEGLU in one pass (kernels/cpu/ops.rs).
    CpuGemm,
    /// candle-nn's linear and candle's element-wise ops.
    Candle,
}

/// The backends of one model on one device in one dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backends {
    /// Attention in the model's dtype (the UNet's).
    pub attention: AttentionBackend,
    /// Attention of layers that always compute in f32 whatever the model's dtype (the VAE's mid block).
    pub attention_f32: AttentionBackend,
    pub conv: ConvBackend,
    pub norm: NormBackend,
    pub linear: LinearBackend,
    /// Whether denoising loops replay the UNet step as a CUDA graph (CUDA only; never while profiling).
    pub cuda_graph: bool,
}

impl Backends {
    /// The backends for a model computing in `dtype` on `device`, under the `SDSCALE_*` switches; an
    /// unreadable switch is an error naming it.
    pub fn choose(device: &Device, dtype: DType) -> Result<Self, String> {
        Ok(Self::with_switches(device, dtype, switches()?))
    }

    /// [`Self::choose`] under explicit switches.
    pub fn with_switches(device: &Device, dtype: DType, switches: &Switches) -> Self {
        let (cpu, cuda) = (device.is_cpu(), device.is_cuda());
        let f32 = dtype == DType::F32;
        let half = matches!(dtype, DType::F16 | DType::BF16);
        let attention = |dtype: DType| match dtype {
            DType::F32 if cpu => AttentionBackend::CpuBlocks,
            DType::F16 if cuda && switches.flash_attention => AttentionBackend::FusedCuda,
            DType::F16 | DType::BF16 if cuda && switches.flash_attn2 && cfg!(feature = "flash-attn") => {
                AttentionBackend::FlashAttn2
            }
            DType::F16 | DType::BF16 if !cpu => AttentionBackend::GpuHalf,
            _ => AttentionBackend::Chunked,
        };
        Self {
            attention: attention(dtype),
            attention_f32: attention(DType::F32),
            conv: match () {
                _ if cpu && f32 => ConvBackend::CpuIm2col,
                _ if cuda && switches.cuda_conv && (f32 || dtype == DType::F16) => ConvBackend::CudaIm2col,
                _ => ConvBackend::Candle,
            },
            norm: match () {
                _ if cpu && f32 => NormBackend::CpuFused,
                _ if cuda && (f32 || half) => NormBackend::CudaRows,
                _ => NormBackend::Candle,
            },
            linear: if cpu && f32 { LinearBackend::CpuGemm } else { LinearBackend::Candle },
            cuda_graph: cuda_graph(device, switches),
        }
    }
}

/// Whether denoising loops on `device` replay the UNet step as a CUDA graph: on CUDA unless switched off
/// or profiling (profiled steps must run eagerly to be timed op by op).
pub fn cuda_graph(device: &Device, switches: &Switches) -> bool {
    device.is_cuda() && switches.cuda_graph && !switches.profile
}

impl std::fmt::Display for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |debug: String| {
            let mut out = String::new();
            for (i, c) in debug.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    out.push('-');
                }
                out.push(c.to_ascii_lowercase());
            }
            out
        };
        write!(
            f,
            "attention={} attention-f32={} conv={} norm={} linear={} cuda-graph={}",
            name(format!("{:?}", self.attention)),
            name(format!("{:?}", self.attention_f32)),
            name(format!("{:?}", self.conv)),
            name(format!("{:?}", self.norm)),
            name(format!("{:?}", self.linear)),
            if self.cuda_graph { "on" } else { "off" }
        )
    }
}

/// The `SDSCALE_*` switches, read once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switches {
    pub profile: bool,
    pub flash_attention: bool,
    /// FlashAttention-2 where the binary has it (the `flash-attn` feature); off: cuBLAS + softmax.
    pub flash_attn2: bool,
    pub cuda_conv: bool,
    pub cuda_graph: bool,
    pub no_mallopt: bool,
    /// Weights are the mapped file's pages (weights/mapped.rs); off reads them into fresh buffers.
    pub map_weights: bool,
}

impl Default for Switches {
    fn default() -> Self {
        Self {
            profile: false,
            flash_attention: false,
            flash_attn2: true,
            cuda_conv: true,
            cuda_graph: true,
            no_mallopt: false,
            map_weights: true,
        }
    }
}

impl Switches {
    /// Reads every switch through `lookup` (the environment, or a test's map) with the one rule.
    pub fn read(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let defaults = Self::default();
        let switch = |name: &str, default: bool| -> Result<bool, String> {
            let Some(value) = lookup(name) else { return Ok(default) };
            match value.trim().to_ascii_lowercase().as_str() {
                "" => Ok(default),
                "1" | "true" | "on" | "yes" => Ok(true),
                "0" | "false" | "off" | "no" => Ok(false),
                _ => Err(format!("{name}={value:?} is not a switch; use 1 (on) or 0 (off), or unset it")),
            }
        };
        Ok(Self {
            profile: switch("SDSCALE_PROFILE", defaults.profile)?,
            flash_attention: switch("SDSCALE_FLASH_ATTENTION", defaults.flash_attention)?,
            flash_attn2: switch("SDSCALE_FLASH_ATTN2", defaults.flash_attn2)?,
            cuda_conv: switch("SDSCALE_CUDA_CONV", defaults.cuda_conv)?,
            cuda_graph: switch("SDSCALE_CUDA_GRAPH", defaults.cuda_graph)?,
            no_mallopt: switch("SDSCALE_NO_MALLOPT", defaults.no_mallopt)?,
            map_weights: switch("SDSCALE_MAP_WEIGHTS", defaults.map_weights)?,
        })
    }
}

/// The process's switches, read from the environment on first use. A bad value is an error here (the
/// model load reports it); [`switch_or_default`] serves callers that cannot fail.
pub fn switches() -> Result<&'static Switches, String> {
    static SWITCHES: OnceLock<Result<Switches, String>> = OnceLock::new();
    SWITCHES.get_or_init(|| Switches::read(|name| std::env::var(name).ok())).as_ref().map_err(Clone::clone)
}

/// One switch, its default while the environment holds a bad value (which the model load then refuses).
pub fn switch_or_default(pick: impl Fn(&Switches) -> bool) -> bool {
    pick(switches().unwrap_or(&Switches::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(pairs: &[(&str, &str)]) -> Result<Switches, String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Switches::read(|name| map.get(name).cloned())
    }

    #[test]
    fn every_switch_follows_one_rule() {
        assert_eq!(read(&[]).unwrap(), Switches::default());
        for name in [
            "SDSCALE_PROFILE",
            "SDSCALE_FLASH_ATTENTION",
            "SDSCALE_FLASH_ATTN2",
            "SDSCALE_CUDA_CONV",
            "SDSCALE_CUDA_GRAPH",
            "SDSCALE_NO_MALLOPT",
            "SDSCALE_MAP_WEIGHTS",
        ] {
            let get = |s: Switches| match name {
                "SDSCALE_PROFILE" => s.profile,
                "SDSCALE_FLASH_ATTENTION" => s.flash_attention,
                "SDSCALE_FLASH_ATTN2" => s.flash_attn2,
                "SDSCALE_CUDA_CONV" => s.cuda_conv,
                "SDSCALE_CUDA_GRAPH" => s.cuda_graph,
                "SDSCALE_NO_MALLOPT" => s.no_mallopt,
                _ => s.map_weights,
            };
            let default = get(Switches::default());
            for on in ["1", "true", "ON", " yes "] {
                assert!(get(read(&[(name, on)]).unwrap()), "{name}={on}");
            }
            for off in ["0", "false", "Off", "no"] {
                assert!(!get(read(&[(name, off)]).unwrap()), "{name}={off}");
            }
            assert_eq!(get(read(&[(name, "")]).unwrap()), default, "{name} empty keeps the default");
            let err = read(&[(name, "maybe")]).unwrap_err();
            assert!(err.contains(name) && err.contains("1 (on) or 0 (off)"), "{err}");
        }
    }

    #[test]
    fn the_cpu_runs_sdscale_kernels_in_f32_and_candle_otherwise() {
        let switches = Switches { flash_attention: true, ..Switches::default() };
        let f32 = Backends::with_switches(&Device::Cpu, DType::F32, &switches);
        assert_eq!(
            f32,
            Backends {
                attention: AttentionBackend::CpuBlocks,
                attention_f32: AttentionBackend::CpuBlocks,
                conv: ConvBackend::CpuIm2col,
                norm: NormBackend::CpuFused,
                linear: LinearBackend::CpuGemm,
                cuda_graph: false,
            }
        );
        assert_eq!(
            f32.to_string(),
            "attention=cpu-blocks attention-f32=cpu-blocks conv=cpu-im2col norm=cpu-fused linear=cpu-gemm cuda-graph=off"
        );
        // f16 on the CPU: candle's ops, attention upcast to f32 in chunks; the VAE's f32 attention blocks.
        let f16 = Backends::with_switches(&Device::Cpu, DType::F16, &switches);
        assert_eq!((f16.attention, f16.attention_f32), (AttentionBackend::Chunked, AttentionBackend::CpuBlocks));
        assert_eq!((f16.conv, f16.norm, f16.linear), (ConvBackend::Candle, NormBackend::Candle, LinearBackend::Candle));
    }
}
