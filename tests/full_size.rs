//! The real SD 2.1-base architecture (865M-parameter UNet) with random weights, built in memory: proves
//! the config handling and shapes at full size without a 5 GB download. Slow (~4 GB of RAM, tens of
//! seconds on 2 cores), so ignored by default: `cargo test --release -- --ignored full_size`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sdscale::attention::AttentionScale;
use sdscale::models::unet::{UNet2DConditionModel, UNetConfig, UNetConfigFile};

/// `unet/config.json` of stabilityai/stable-diffusion-2-1-base (mirrored at sd2-community/…).
const SD21_BASE_UNET_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.10.0.dev0",
  "act_fn": "silu",
  "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "dual_cross_attention": false,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "num_class_embeds": null,
  "only_cross_attention": false,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "use_linear_projection": true
}"#;

#[test]
#[ignore = "builds the 865M-parameter UNet; run with --ignored"]
fn full_size_unet_one_guided_step_at_224_and_512x288() {
    let file: UNetConfigFile = serde_json::from_str(SD21_BASE_UNET_CONFIG).unwrap();
    let config = UNetConfig::from_file(file).unwrap();
    assert_eq!(config.num_attention_heads, [5, 10, 20, 20]);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let unet = UNet2DConditionModel::new(vb, config).unwrap();
    let parameters: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    assert!((860_000_000..870_000_000).contains(&parameters), "{parameters} parameters");

    let text = Tensor::randn(0f32, 1.0, (2, 77, 1024), &Device::Cpu).unwrap();
    let entropy = AttentionScale::Entropy { train_latent: sdscale::size::LatentSize { height: 64, width: 64 } };
    // 224×224 → 28×28 latents (28 → 14 → 7 → 4: an odd level); 512×288 → 64×36 latents.
    for (latent_height, latent_width) in [(28, 28), (36, 64)] {
        let sample = Tensor::randn(0f32, 1.0, (2, 4, latent_height, latent_width), &Device::Cpu).unwrap();
        for mode in [AttentionScale::Default, entropy] {
            let out = unet.forward(&sample, 981.0, &text, mode).unwrap();
            assert_eq!(out.dims(), &[2, 4, latent_height, latent_width]);
            let values = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "non-finite output at {latent_height}x{latent_width}");
        }
    }
}

/// Seconds of one guided UNet step (batch 2) at 1024² for default, entropy, hidiffusion (its first
/// step: RAU-Net and windows, 50-step schedule) and deepshrink (t = 981 > 600: shrunk) on the full-size
/// random SD 2.1-base UNet, CPU f32. A benchmark, not a check: `cargo test --release --test integration
/// -- --ignored --nocapture full_size_hires`.
#[test]
#[ignore = "benchmark: minutes on 2 cores; run with --ignored"]
fn full_size_hires_step_at_1024() {
    use sdscale::hires::{DeepShrink, HiDiffusion, StepContext, Structure, StructureState};
    let file: UNetConfigFile = serde_json::from_str(SD21_BASE_UNET_CONFIG).unwrap();
    let config = UNetConfig::from_file(file).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let unet = UNet2DConditionModel::new(vb, config).unwrap();
    let text = Tensor::randn(0f32, 1.0, (2, 77, 1024), &Device::Cpu).unwrap();
    let sample = Tensor::randn(0f32, 1.0, (2, 4, 128, 128), &Device::Cpu).unwrap();
    let entropy = AttentionScale::Entropy { train_latent: sdscale::size::LatentSize { height: 64, width: 64 } };
    let step = StepContext { index: 0, steps: 50, timestep: 981.0, latent: (128, 128), blocks: 4 };
    let structures = [
        ("default", Structure::Plain, AttentionScale::Default),
        ("entropy", Structure::Plain, entropy),
        ("hidiffusion", Structure::HiDiffusion(HiDiffusion::default()), AttentionScale::Default),
        ("deepshrink", Structure::DeepShrink(DeepShrink::default()), AttentionScale::Default),
    ];
    for (name, structure, scale) in structures {
        let plan = structure.plan(step, &mut StructureState::new(&[42]));
        let time = unet.time_features(981.0, 2, DType::F32, &Device::Cpu).unwrap();
        let started = std::time::Instant::now();
        let out = unet.forward_with_time(&sample, &time, &text, scale, None, &plan).unwrap();
        assert_eq!(out.dims(), &[2, 4, 128, 128]);
        eprintln!("1024² guided UNet step, {name}: {:.1} s", started.elapsed().as_secs_f64());
    }
}
