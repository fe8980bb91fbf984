//! Single-file checkpoints (`v2-1_512-ema-pruned.safetensors`, as AUTOMATIC1111, ComfyUI and
//! stable-diffusion.cpp keep them): the original LDM key layout, seen through diffusers' names.
//!
//! One file holds all three networks: the UNet under `model.diffusion_model.`, the VAE under
//! `first_stage_model.`, the text encoder under `cond_stage_model.` (OpenCLIP's layout for SD 2.x,
//! with q/k/v fused into one `in_proj`; transformers' CLIP layout for SD 1.x). Each tensor is mapped
//! to the diffusers name the networks ask for (the same mapping as diffusers' `from_single_file`);
//! nothing is converted or copied ahead of time. Tensors with no diffusers name (the scheduler's
//! buffers, `text_projection`, the text tower's last block that SD 2 never runs) are simply never read.

use super::safetensors::{SafetensorsFile, Source};
use anyhow::{bail, Result};
use std::collections::HashMap;

/// Which network of the file to view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Unet,
    Vae,
    TextEncoder,
    /// A VAE on its own in the LDM layout, as `--vae` files come (vae-ft-mse-840000-ema-pruned.safetensors):
    /// the VAE's keys without `first_stage_model.`.
    VaeAlone,
    /// SDXL's second text encoder (OpenCLIP bigG with its projection).
    TextEncoder2,
}

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const OPEN_CLIP: &str = "cond_stage_model.model.";
const HF_CLIP: &str = "cond_stage_model.transformer.";
/// SDXL (SGM layout): CLIP ViT-L in transformers' layout, then OpenCLIP bigG.
const SDXL_CLIP: &str = "conditioner.embedders.0.transformer.";
const SDXL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";

/// What the tensors say the checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// OpenCLIP ViT-H text tower (SD 2.0 / 2.1, 512 or 768).
    Sd2,
    /// OpenAI CLIP ViT-L text encoder in transformers' layout (SD 1.x).
    Sd1,
    /// SDXL base (`sd_xl_base_1.0.safetensors`): `conditioner.embedders.0/1`, the UNet's added
    /// embedding as `label_emb`.
    Sdxl,
}

/// Recognises an LDM-layout Stable Diffusion checkpoint, or says what is missing. The UNet's
/// cross-attention width is the text encoder's hidden size: 768 (CLIP ViT-L) is SD 1.x, 1024 (OpenCLIP
/// ViT-H) SD 2.x. Any other width (a tiny test model, an unknown architecture) leaves it to the text
/// encoder's layout.
pub fn kind(file: &SafetensorsFile) -> Result<Kind> {
    let has_prefix = |prefix: &str| file.names().any(|n| n.starts_with(prefix));
    if !has_prefix(UNET) || !has_prefix(VAE) {
        bail!(
            "{} is not a Stable Diffusion single-file checkpoint (no {UNET}* and {VAE}* tensors); \
             pass a diffusers model folder or a full checkpoint",
            file.path().display()
        );
    }
    if has_prefix(SDXL_OPEN_CLIP) {
        if !has_prefix(SDXL_CLIP) {
            bail!(
                "{}: an SDXL checkpoint without its first text encoder ({SDXL_CLIP}*): a refiner or a \
                 partial file, which sdscale does not run",
                file.path().display()
            );
        }
        return Ok(Kind::Sdxl);
    }
    let by_layout = if has_prefix(OPEN_CLIP) {
        Kind::Sd2
    } else if has_prefix(HF_CLIP) {
        Kind::Sd1
    } else {
        bail!("{}: no text encoder in the checkpoint (no {OPEN_CLIP}* or {HF_CLIP}* tensors)", file.path().display())
    };
    Ok(match cross_attention_width(file) {
        Some(768) => Kind::Sd1,
        Some(1024) => Kind::Sd2,
        _ => by_layout,
    })
}

/// How a VAE file on its own (`--vae FILE`) names its tensors: `None` for diffusers' names (a
/// `diffusion_pytorch_model.safetensors` taken out of its folder), else the LDM part to map it through
/// (`encoder.*`/`decoder.*` as vae-ft-mse-840000-ema-pruned.safetensors, or a whole checkpoint's
/// `first_stage_model.*`); an error when it holds no VAE decoder.
pub fn vae_layout(file: &SafetensorsFile) -> Result<Option<Part>> {
    let has_prefix = |prefix: &str| file.names().any(|n| n.starts_with(prefix));
    if has_prefix("decoder.mid_block.") {
        Ok(None)
    } else if has_prefix("decoder.mid.") {
        Ok(Some(Part::VaeAlone))
    } else if has_prefix(&format!("{VAE}decoder.mid.")) {
        Ok(Some(Part::Vae))
    } else {
        bail!(
            "{} holds no VAE decoder (no decoder.mid_block.*, decoder.mid.* or {VAE}decoder.* tensors); \
             pass a VAE's .safetensors file or its diffusers folder",
            file.path().display()
        )
    }
}

/// The input width of the UNet's cross-attention keys (`…attn2.to_k.weight` is (inner, width)).
fn cross_attention_width(file: &SafetensorsFile) -> Option<usize> {
    let name = file.names().filter(|n| n.starts_with(UNET) && n.ends_with(".attn2.to_k.weight")).min()?;
    match file.entry(name)?.shape.as_slice() {
        [_, width] => Some(*width),
        _ => None,
    }
}

/// diffusers name → where it lives in the file, for one network.
pub fn name_map(file: &SafetensorsFile, part: Part) -> HashMap<String, Source> {
    let names: Vec<&str> = file.names().collect();
    let mut map = HashMap::new();
    let mut add = |name: String, stored: &str, chunk| {
        map.insert(name, Source { name: stored.to_string(), chunk, transpose: false });
    };
    match part {
        Part::Unet => {
            let layers = unet_layers_per_block(&names);
            for stored in &names {
                if let Some(name) = stored.strip_prefix(UNET).and_then(|key| unet_name(key, layers)) {
                    add(name, stored, None);
                }
            }
        }
        Part::Vae | Part::VaeAlone => {
            let prefix = if part == Part::Vae { VAE } else { "" };
            let blocks = vae_block_count(&names, prefix);
            for stored in &names {
                if let Some(name) = stored.strip_prefix(prefix).and_then(|key| vae_name(key, blocks)) {
                    add(name, stored, None);
                }
            }
        }
        Part::TextEncoder2 => {
            for stored in &names {
                let Some(key) = stored.strip_prefix(SDXL_OPEN_CLIP) else { continue };
                if key == "text_projection" {
                    // A bare (hidden, projection) matrix: transformers' Linear weight is its transpose.
                    let source = Source { name: stored.to_string(), chunk: None, transpose: true };
                    map.insert("text_projection.weight".to_string(), source);
                }
                for (name, chunk) in open_clip_names(key) {
                    map.insert(name, Source { name: stored.to_string(), chunk, transpose: false });
                }
            }
        }
        Part::TextEncoder => {
            for stored in &names {
                if let Some(key) = stored.strip_prefix(OPEN_CLIP) {
                    for (name, chunk) in open_clip_names(key) {
                        add(name, stored, chunk);
                    }
                } else if let Some(key) = stored.strip_prefix(HF_CLIP).or_else(|| stored.strip_prefix(SDXL_CLIP)) {
                    // Older SD 1.x files lack transformers' `text_model.` level.
                    let name =
                        if key.starts_with("text_model.") { key.to_string() } else { format!("text_model.{key}") };
                    add(name, stored, None);
                }
            }
        }
    }
    map
}

/// `input_blocks.{i}`: each level has `layers_per_block` blocks, then a downsampler (`….0.op`).
fn unet_layers_per_block(names: &[&str]) -> usize {
    names
        .iter()
        .filter_map(|n| {
            n.strip_prefix(UNET)?.strip_prefix("input_blocks.")?.split_once(".0.op.")?.0.parse::<usize>().ok()
        })
        .min()
        .map_or(2, |first_downsampler| first_downsampler.saturating_sub(1).max(1))
}

fn vae_block_count(names: &[&str], prefix: &str) -> usize {
    names
        .iter()
        .filter_map(|n| n.strip_prefix(prefix)?.strip_prefix("decoder.up.")?.split_once('.')?.0.parse::<usize>().ok())
        .max()
        .map_or(4, |last| last + 1)
}

/// Splits "12.0.rest" into (12, 0, "rest").
fn two_indices(key: &str) -> Option<(usize, usize, &str)> {
    let (i, rest) = key.split_once('.')?;
    let (j, rest) = rest.split_once('.')?;
    Some((i.parse().ok()?, j.parse().ok()?, rest))
}

fn unet_resnet(rest: &str) -> Option<String> {
    let (old, new) = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ]
    .into_iter()
    .find(|(old, _)| rest.starts_with(old))?;
    Some(format!("{new}{}", &rest[old.len()..]))
}

fn unet_name(key: &str, layers: usize) -> Option<String> {
    for (old, new) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        // SDXL's added embedding (SGM's label_emb: Sequential(Sequential(Linear, SiLU, Linear))).
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ] {
        if let Some(rest) = key.strip_prefix(old) {
            return Some(format!("{new}{rest}"));
        }
    }
    if let Some(key) = key.strip_prefix("input_blocks.") {
        let (i, j, rest) = two_indices(key)?;
        let (block, layer) = ((i.checked_sub(1)?) / (layers + 1), (i - 1) % (layers + 1));
        return match (layer < layers, j) {
            (true, 0) => Some(format!("down_blocks.{block}.resnets.{layer}.{}", unet_resnet(rest)?)),
            (true, 1) => Some(format!("down_blocks.{block}.attentions.{layer}.{rest}")),
            (false, 0) => Some(format!("down_blocks.{block}.downsamplers.0.conv.{}", rest.strip_prefix("op.")?)),
            _ => None,
        };
    }
    if let Some(key) = key.strip_prefix("middle_block.") {
        let (j, rest) = key.split_once('.')?;
        return match j {
            "0" => Some(format!("mid_block.resnets.0.{}", unet_resnet(rest)?)),
            "1" => Some(format!("mid_block.attentions.0.{rest}")),
            "2" => Some(format!("mid_block.resnets.1.{}", unet_resnet(rest)?)),
            _ => None,
        };
    }
    if let Some(key) = key.strip_prefix("output_blocks.") {
        let (i, j, rest) = two_indices(key)?;
        let (block, layer) = (i / (layers + 1), i % (layers + 1));
        return match j {
            0 => Some(format!("up_blocks.{block}.resnets.{layer}.{}", unet_resnet(rest)?)),
            // Index 1 is the attention, or the upsampler in a level without attention.
            1 | 2 if rest.starts_with("conv.") => Some(format!("up_blocks.{block}.upsamplers.0.{rest}")),
            1 => Some(format!("up_blocks.{block}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    None
}

fn vae_resnet(rest: &str) -> String {
    match rest.strip_prefix("nin_shortcut.") {
        Some(tail) => format!("conv_shortcut.{tail}"),
        None => rest.to_string(),
    }
}

fn vae_name(key: &str, blocks: usize) -> Option<String> {
    if key.starts_with("quant_conv.") || key.starts_with("post_quant_conv.") {
        return Some(key.to_string());
    }
    let (coder, rest) = key.split_once('.')?;
    if coder != "encoder" && coder != "decoder" {
        return None;
    }
    let inner = if let Some(tail) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{tail}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else if let Some(tail) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{}", vae_resnet(tail))
    } else if let Some(tail) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{}", vae_resnet(tail))
    } else if let Some(tail) = rest.strip_prefix("mid.attn_1.") {
        // 1×1 conv weights here, (C, C, 1, 1); the VAE accepts either shape.
        let (old, param) = tail.split_once('.')?;
        let new = match old {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        format!("mid_block.attentions.0.{new}.{param}")
    } else {
        let (level, tail) = rest.strip_prefix("down.").or_else(|| rest.strip_prefix("up."))?.split_once('.')?;
        let level: usize = level.parse().ok()?;
        // LDM numbers the decoder's levels from the bottom; diffusers from the top.
        let (blocks_name, level) = if rest.starts_with("down.") {
            ("down_blocks", level)
        } else {
            ("up_blocks", blocks.checked_sub(level + 1)?)
        };
        if let Some(tail) = tail.strip_prefix("block.") {
            let (j, param) = tail.split_once('.')?;
            format!("{blocks_name}.{level}.resnets.{j}.{}", vae_resnet(param))
        } else if let Some(param) =
            tail.strip_prefix("downsample.conv.").or_else(|| tail.strip_prefix("upsample.conv."))
        {
            let sampler = if blocks_name == "down_blocks" { "downsamplers" } else { "upsamplers" };
            format!("{blocks_name}.{level}.{sampler}.0.conv.{param}")
        } else {
            return None;
        }
    };
    Some(format!("{coder}.{inner}"))
}

/// OpenCLIP text-tower names → transformers' CLIPTextModel names (with the q/k/v chunk of `in_proj`).
fn open_clip_names(key: &str) -> Vec<(String, Option<(usize, usize)>)> {
    let one = |name: String| vec![(name, None)];
    match key {
        "token_embedding.weight" => return one("text_model.embeddings.token_embedding.weight".into()),
        "positional_embedding" => return one("text_model.embeddings.position_embedding.weight".into()),
        _ => {}
    }
    if let Some(param) = key.strip_prefix("ln_final.") {
        return one(format!("text_model.final_layer_norm.{param}"));
    }
    let Some((layer, rest)) = key.strip_prefix("transformer.resblocks.").and_then(|k| k.split_once('.')) else {
        return Vec::new();
    };
    let prefix = format!("text_model.encoder.layers.{layer}");
    for (fused, param) in [("attn.in_proj_weight", "weight"), ("attn.in_proj_bias", "bias")] {
        if rest == fused {
            return ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(|(i, proj)| (format!("{prefix}.self_attn.{proj}.{param}"), Some((i, 3))))
                .collect();
        }
    }
    for (old, new) in [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ] {
        if let Some(param) = rest.strip_prefix(old) {
            return one(format!("{prefix}.{new}{param}"));
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_keys_map_as_diffusers_converts_them() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            ("input_blocks.1.0.in_layers.0.weight", "down_blocks.0.resnets.0.norm1.weight"),
            (
                "input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight",
                "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight",
            ),
            ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
            ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
            ("input_blocks.11.0.out_layers.3.bias", "down_blocks.3.resnets.1.conv2.bias"),
            ("middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
            ("middle_block.2.emb_layers.1.weight", "mid_block.resnets.1.time_emb_proj.weight"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            ("output_blocks.5.1.norm.weight", "up_blocks.1.attentions.2.norm.weight"),
            ("output_blocks.11.0.in_layers.2.weight", "up_blocks.3.resnets.2.conv1.weight"),
            ("out.2.weight", "conv_out.weight"),
            ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
            ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(unet_name(ldm, 2).as_deref(), Some(diffusers), "{ldm}");
        }
    }

    #[test]
    fn vae_and_text_keys_map_as_diffusers_converts_them() {
        assert_eq!(
            vae_name("decoder.up.3.block.0.nin_shortcut.weight", 4).unwrap(),
            "decoder.up_blocks.0.resnets.0.conv_shortcut.weight"
        );
        assert_eq!(
            vae_name("decoder.up.1.upsample.conv.bias", 4).unwrap(),
            "decoder.up_blocks.2.upsamplers.0.conv.bias"
        );
        assert_eq!(
            vae_name("decoder.mid.attn_1.proj_out.weight", 4).unwrap(),
            "decoder.mid_block.attentions.0.to_out.0.weight"
        );
        assert_eq!(vae_name("decoder.norm_out.bias", 4).unwrap(), "decoder.conv_norm_out.bias");
        assert_eq!(vae_name("post_quant_conv.weight", 4).unwrap(), "post_quant_conv.weight");
        let qkv = open_clip_names("transformer.resblocks.22.attn.in_proj_bias");
        assert_eq!(qkv[1], ("text_model.encoder.layers.22.self_attn.k_proj.bias".to_string(), Some((1, 3))));
        assert!(open_clip_names("text_projection").is_empty());
        assert_eq!(open_clip_names("positional_embedding")[0].0, "text_model.embeddings.position_embedding.weight");
    }

    /// A file holding only the named tensors (zeros; shapes as given).
    fn file_with(tensors: &[(&str, &[usize])]) -> (tempfile::TempDir, SafetensorsFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let tensors: HashMap<String, candle_core::Tensor> = tensors
            .iter()
            .map(|(name, shape)| {
                (
                    name.to_string(),
                    candle_core::Tensor::zeros(*shape, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        (dir, file)
    }

    /// The cross-attention width decides where it is a real model's (768 SD 1.x, 1024 SD 2.x); other
    /// widths leave it to the text encoder's layout.
    #[test]
    fn the_kind_comes_from_the_cross_attention_width_then_the_layout() {
        let to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
        let vae = "first_stage_model.decoder.conv_in.weight";
        let hf_clip = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight";
        let open_clip = "cond_stage_model.model.token_embedding.weight";
        let kind_of = |width: usize, text: &str| {
            let (_dir, file) = file_with(&[(to_k, &[8, width]), (vae, &[1, 1, 1, 1]), (text, &[2, 2])]);
            kind(&file).unwrap()
        };
        assert_eq!(kind_of(768, hf_clip), Kind::Sd1);
        assert_eq!(kind_of(1024, open_clip), Kind::Sd2);
        assert_eq!(kind_of(768, open_clip), Kind::Sd1, "the UNet's shapes win over the text encoder's layout");
        assert_eq!(kind_of(1024, hf_clip), Kind::Sd2);
        assert_eq!(kind_of(4, hf_clip), Kind::Sd1, "a tiny model: its text encoder's layout decides");
        assert_eq!(kind_of(16, open_clip), Kind::Sd2);

        let (_dir, file) = file_with(&[(to_k, &[8, 768]), (vae, &[1, 1, 1, 1])]);
        assert!(kind(&file).unwrap_err().to_string().contains("no text encoder"));
        let (_dir, file) = file_with(&[(hf_clip, &[2, 2])]);
        assert!(kind(&file).unwrap_err().to_string().contains("not a Stable Diffusion single-file checkpoint"));
    }
}
