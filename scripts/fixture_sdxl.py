"""SDXL base 1.0 as a model family (issue #22), for `make_fixtures.py --only sdxl`.

Writes tests/fixtures/tiny-sdxl/ (a tiny random StableDiffusionXLPipeline laid out file for file like
stabilityai/stable-diffusion-xl-base-1.0 on the Hub), tests/fixtures/tiny-sdxl-single-file.safetensors
(the same weights in the original SGM layout of sd_xl_base_1.0.safetensors) and diffusers' references
under tests/fixtures/reference/families/sdxl/ + sdxl.json. The helpers (random models, the entropy
attention processor, image diffs) are make_fixtures.py's, passed in as `mf`.

THE REAL LAYOUT (stabilityai/stable-diffusion-xl-base-1.0, files of diffusers 0.19/0.20 and
transformers 4.32) and what tiny-sdxl/ holds of it:
  model_index.json          StableDiffusionXLPipeline, force_zeros_for_empty_prompt true
  scheduler/                EulerDiscreteScheduler, timestep_spacing "leading", steps_offset 1 (verbatim)
  text_encoder/             CLIPTextModel (OpenAI CLIP ViT-L, quick_gelu), torch_dtype float16
  text_encoder_2/           CLIPTextModelWithProjection (OpenCLIP bigG, gelu), torch_dtype float16
  tokenizer/                CLIP BPE, pads with <|endoftext|>
  tokenizer_2/              the same BPE, pads with "!" (id 0)
  unet/                     addition_embed_type "text_time", addition_time_embed_dim,
                            projection_class_embeddings_input_dim, transformer_layers_per_block (a list),
                            attention_head_dim = head COUNTS, use_linear_projection, level 0 DownBlock2D
  vae/                      scaling_factor 0.13025, force_upcast true
  vae_1_0/                  a second VAE folder the pipeline never reads (here: decoy weights)
  */*.safetensors, */*.fp16.safetensors; ONNX (text_encoder/model.onnx, unet/model.onnx, ...),
  OpenVINO (openvino_model.xml/.bin) and Flax (flax_model.msgpack, diffusion_flax_model.msgpack)
  files: decoys that no loader may open.

Tiny sizes: UNet block_out_channels [16, 32, 32], heads [1, 2, 4] (level 0 has no attention),
transformer depth [1, 2, 2]; sample_size 16 latents, so the training size is 128 px and the entropy
scale's T is 64 tokens at level 1 and 16 at level 2. Text encoders of width 4 (CLIP-L) and 8 (bigG,
projection 8): cross_attention_dim 12; addition_time_embed_dim 8, so the added embedding reads
8 + 6·8 = 56 values.

References: diffusers' StableDiffusionXLPipeline (add_watermarker=False, CPU, f32, one
torch.Generator("cpu").manual_seed(seed) per image), with DDIMScheduler.from_config(the model's
scheduler config) and, separately, with the model's own EulerDiscreteScheduler.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from fixture_families import copy_files, save_weights

NAME = "sdxl"
VERSION = "0.19.0.dev0"
VAE_VERSION = "0.20.0.dev0"
TRANSFORMERS_VERSION = "4.32.0.dev0"
SINGLE_FILE = "tiny-sdxl-single-file.safetensors"
STEPS = 4

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": VERSION,
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json, verbatim.
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": VERSION,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# The keys of the real unet/config.json (diffusers 0.19.0.dev0).
UNET_KEYS = (
    "_class_name", "_diffusers_version", "act_fn", "addition_embed_type", "addition_embed_type_num_heads",
    "addition_time_embed_dim", "attention_head_dim", "block_out_channels", "center_input_sample",
    "class_embed_type", "class_embeddings_concat", "conv_in_kernel", "conv_out_kernel", "cross_attention_dim",
    "cross_attention_norm", "down_block_types", "downsample_padding", "dual_cross_attention", "encoder_hid_dim",
    "encoder_hid_dim_type", "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block",
    "mid_block_only_cross_attention", "mid_block_scale_factor", "mid_block_type", "norm_eps", "norm_num_groups",
    "num_attention_heads", "num_class_embeds", "only_cross_attention", "out_channels",
    "projection_class_embeddings_input_dim", "resnet_out_scale_factor", "resnet_skip_time_act",
    "resnet_time_scale_shift", "sample_size", "time_cond_proj_dim", "time_embedding_act_fn", "time_embedding_dim",
    "time_embedding_type", "timestep_post_act", "transformer_layers_per_block", "up_block_types",
    "upcast_attention", "use_linear_projection",
)
# The real config's values for these keys: null in the file (diffusers writes None for the unset ones).
UNET_NULLS = ("class_embed_type", "cross_attention_norm", "encoder_hid_dim", "encoder_hid_dim_type",
              "mid_block_only_cross_attention", "num_attention_heads", "num_class_embeds", "time_cond_proj_dim",
              "time_embedding_act_fn", "time_embedding_dim", "timestep_post_act", "upcast_attention")
TEXT_DIM, TEXT2_DIM, TIME_DIM = 4, 8, 8
TINY_UNET = dict(
    in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[16, 32, 32],
    layers_per_block=2,
    attention_head_dim=[1, 2, 4],  # head COUNTS, as SDXL's [5, 10, 20] (head size 64)
    transformer_layers_per_block=[1, 2, 2],  # SDXL: [1, 2, 10]
    norm_num_groups=8,
    cross_attention_dim=TEXT_DIM + TEXT2_DIM,  # SDXL: 768 + 1280 = 2048
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=TIME_DIM,  # SDXL: 256
    projection_class_embeddings_input_dim=TEXT2_DIM + 6 * TIME_DIM,  # SDXL: 1280 + 6·256 = 2816
    sample_size=16,  # SDXL: 128 latents = 1024 px
    flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, act_fn="silu", center_input_sample=False,
    downsample_padding=1, mid_block_scale_factor=1, dual_cross_attention=False, only_cross_attention=False,
)
TEXT_COMMON = dict(
    vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
    pad_token_id=1, attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
)
# openai/clip-vit-large-patch14's text tower (12 layers of 768) and OpenCLIP ViT-bigG's (32 of 1280), shrunk.
TINY_TEXT = dict(TEXT_COMMON, hidden_act="quick_gelu", hidden_size=TEXT_DIM, num_hidden_layers=3,
                 num_attention_heads=2, intermediate_size=8, projection_dim=768)
TINY_TEXT2 = dict(TEXT_COMMON, hidden_act="gelu", hidden_size=TEXT2_DIM, num_hidden_layers=3,
                  num_attention_heads=2, intermediate_size=16, projection_dim=TEXT2_DIM)
TEXT_CONFIG_KEYS = (
    "architectures", "attention_dropout", "bos_token_id", "dropout", "eos_token_id", "hidden_act", "hidden_size",
    "initializer_factor", "initializer_range", "intermediate_size", "layer_norm_eps", "max_position_embeddings",
    "model_type", "num_attention_heads", "num_hidden_layers", "pad_token_id", "projection_dim", "torch_dtype",
    "transformers_version", "vocab_size",
)
VAE_KEYS = (
    "_class_name", "_diffusers_version", "_name_or_path", "act_fn", "block_out_channels", "down_block_types",
    "force_upcast", "in_channels", "latent_channels", "layers_per_block", "norm_num_groups", "out_channels",
    "sample_size", "scaling_factor", "up_block_types",
)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, act_fn="silu", latent_channels=4,
                block_out_channels=[16, 16, 32, 32], norm_num_groups=8, sample_size=1024,
                scaling_factor=0.13025, force_upcast=True)
SEEDS = (2201, 2202, 2203, 2204)  # UNet, text_encoder, text_encoder_2, VAE
SHARPEN = 5.5  # chosen by the calibration below (4.5: modes differ by 1.66 mean, under the 2.0 floor; 7: by 6.6 but SDPA vs explicit softmax by 0.77 mean, 8 max: chaotic)

PROMPT = "a corgi on a beach"
LONG_PROMPT = " ".join(["a photo of a corgi on a sunny beach, high detail"] * 12)  # > 77 tokens
# (name, prompt, negative (None = not given), width, height, guidance, seed, mode, steps, images)
CASES = [
    ("train128_default", PROMPT, None, 128, 128, 5.0, 42, "default", STEPS, 1),
    ("train128_entropy", PROMPT, None, 128, 128, 5.0, 42, "entropy", STEPS, 1),
    ("wide192x128_default", PROMPT, None, 192, 128, 5.0, 7, "default", STEPS, 1),
    ("wide192x128_entropy", PROMPT, None, 192, 128, 5.0, 7, "entropy", STEPS, 1),
    ("tall96x160_entropy", PROMPT, None, 96, 160, 5.0, 3, "entropy", STEPS, 1),
    ("negempty_sq128_default", PROMPT, "", 128, 128, 5.0, 11, "default", STEPS, 1),
    ("negtext_wide192x128_entropy", PROMPT, "blurry, low quality", 192, 128, 5.0, 12, "entropy", STEPS, 1),
    ("guidance1_wide160x96_default", PROMPT, None, 160, 96, 1.0, 13, "default", STEPS, 1),
    ("long_sq128_default", LONG_PROMPT, "blurry", 128, 128, 5.0, 14, "default", STEPS, 1),
    ("two_wide160x96_entropy", PROMPT, None, 160, 96, 5.0, 15, "entropy", STEPS, 2),
]
# The same pipeline with the model's own EulerDiscreteScheduler (for `--sampler model`).
EULER_CASES = [
    ("euler_train128_default", PROMPT, None, 128, 128, 5.0, 42, "default", STEPS, 1),
    ("euler_wide192x128_entropy", PROMPT, "", 192, 128, 5.0, 7, "entropy", STEPS, 1),
    ("euler_guidance1_sq128_default", PROMPT, None, 128, 128, 1.0, 13, "default", STEPS, 1),
]
# f16 from the .fp16.safetensors files alone; the VAE decodes in f32 (force_upcast).
F16_CASES = [
    ("f16_wide192x128_default", PROMPT, None, 192, 128, 5.0, 7, "default", STEPS, 1),
]
TOKEN_PROMPTS = [PROMPT, "", "Hello, World!!", LONG_PROMPT]


def case_dict(case) -> dict:
    name, prompt, negative, width, height, guidance, seed, mode, steps, images = case
    files = [f"{name}.png"] if images == 1 else [f"{name}_{i}.png" for i in range(images)]
    return {"file": files[0], "files": files, "prompt": prompt, "negative_prompt": negative, "width": width,
            "height": height, "steps": steps, "guidance": guidance, "seed": seed, "mode": mode, "eta": 0.0,
            "num_images": images}


def write_tokenizers(mf, out: Path) -> None:
    """tokenizer/ pads with <|endoftext|> (openai/clip-vit-large-patch14's files, as tiny-sd15's);
    tokenizer_2/ with "!" (laion/CLIP-ViT-bigG-14's special tokens, as SD 2.x's tiny-sd)."""
    copy_files(mf.FIXTURES / "tiny-sd15" / "tokenizer", out / "tokenizer",
               ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"])
    copy_files(mf.TINY_DIR / "tokenizer", out / "tokenizer_2",
               ["vocab.json", "merges.txt", "special_tokens_map.json"])
    config = json.loads((mf.TINY_DIR / "tokenizer" / "tokenizer_config.json").read_text())
    config.update({"name_or_path": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "pad_token": "!"})
    mf.write_json(out / "tokenizer_2" / "tokenizer_config.json", config)


@torch.no_grad()
def build_text(mf, cfg: dict, seed: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(**cfg)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = cls(config)
    mf.perturb_constant_params(model, seed + 1)
    return model.eval()


def text_config_json(model, architecture: str) -> dict:
    stamps = {"architectures": [architecture], "model_type": "clip_text_model", "torch_dtype": "float16",
              "transformers_version": TRANSFORMERS_VERSION}
    config = {k: getattr(model.config, k) for k in TEXT_CONFIG_KEYS if k not in stamps} | stamps
    assert sorted(config) == sorted(TEXT_CONFIG_KEYS)
    return dict(sorted(config.items()))


def text_state(model) -> dict[str, torch.Tensor]:
    """transformers 4.32 names (`text_model.` prefix; the projection at the top level), without the
    position_ids buffer (no longer persistent in 4.31+)."""
    state = model.state_dict()
    if not any(k.startswith("text_model.") for k in state):
        state = {(k if k.startswith("text_projection") else f"text_model.{k}"): v for k, v in state.items()}
    return state


def unet_config_json(unet) -> dict:
    config = {k: unet.config[k] for k in UNET_KEYS if not k.startswith("_")}
    for key in UNET_NULLS:
        config[key] = None
    config.update({"_class_name": "UNet2DConditionModel", "_diffusers_version": VERSION})
    assert sorted(config) == sorted(UNET_KEYS)
    return dict(sorted(config.items()))


def vae_config_json(vae) -> dict:
    config = {k: vae.config[k] for k in VAE_KEYS if not k.startswith("_")}
    config.update({"_class_name": "AutoencoderKL", "_diffusers_version": VAE_VERSION,
                   "_name_or_path": "../sdxl-vae/"})
    assert sorted(config) == sorted(VAE_KEYS)
    return dict(sorted(config.items()))


DECOYS = {
    "unet": ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin", "diffusion_flax_model.msgpack",
             "model.onnx", "openvino_model.xml", "openvino_model.bin"),
    "vae": ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin", "diffusion_flax_model.msgpack"),
    "text_encoder": ("pytorch_model.bin", "pytorch_model.fp16.bin", "flax_model.msgpack", "model.onnx",
                     "openvino_model.xml", "openvino_model.bin"),
}


def load_pipeline(folder: Path, **kwargs):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    kwargs = {"dtype": torch.float32, **kwargs}
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True, add_watermarker=False, **kwargs)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def render(mf, pipe, case: dict, classic: bool = False) -> list:
    mf.set_attention_mode(pipe.unet, pipe.vae, case["mode"], classic)
    generators = [torch.Generator("cpu").manual_seed(case["seed"] + i) for i in range(case["num_images"])]
    return pipe(case["prompt"], negative_prompt=case["negative_prompt"], height=case["height"], width=case["width"],
                num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                generator=generators if case["num_images"] > 1 else generators[0],
                num_images_per_prompt=case["num_images"]).images


def render_cases(mf, pipe, case_list, out: Path) -> dict:
    cases = {c[0]: case_dict(c) for c in case_list}
    images = {}
    for key, case in cases.items():
        for file, image in zip(case["files"], render(mf, pipe, case), strict=True):
            image.save(out / file)
            images[file.removesuffix(".png")] = image
        print(f"  {NAME}/{key}: {case['width']}x{case['height']} {case['mode']} guidance {case['guidance']} "
              f"negative {case['negative_prompt']!r} images {case['num_images']}")
    return {"cases": list(cases.values()), "images": images}


@torch.no_grad()
def embeddings(pipe) -> dict[str, torch.Tensor]:
    """encode_prompt's outputs for a few inputs, to find where a port goes wrong."""
    out = {}
    for key, negative in (("none", None), ("empty", ""), ("text", "blurry, low quality")):
        pe, ne, pp, npp = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=True, negative_prompt=negative)
        out[f"{key}.prompt_embeds"], out[f"{key}.negative_prompt_embeds"] = pe, ne
        out[f"{key}.pooled_prompt_embeds"], out[f"{key}.negative_pooled_prompt_embeds"] = pp, npp
    return {k: v.contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# The single file (SGM layout of sd_xl_base_1.0.safetensors)
# --------------------------------------------------------------------------------------------


def sgm_unet_state(mf, unet) -> dict[str, torch.Tensor]:
    """openaimodel names as for SD (make_fixtures' unet_ldm_key), plus the added embedding, which SGM
    calls label_emb (a Sequential(Sequential(Linear, SiLU, Linear)))."""
    cfg = unet.config
    up_has_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    out = {}
    for k, v in unet.state_dict().items():
        head, param = k.rsplit(".", 1)
        if head in ("add_embedding.linear_1", "add_embedding.linear_2"):
            ldm = f"label_emb.0.{0 if head.endswith('1') else 2}.{param}"
        else:
            ldm = mf.unet_ldm_key(k, cfg.layers_per_block, up_has_attn)
        out[f"model.diffusion_model.{ldm}"] = v
    return out


def open_clip_bigg_state(mf, text_encoder_2) -> dict[str, torch.Tensor]:
    """text_encoder_2 as SGM's FrozenOpenCLIPEmbedder2 stores it (`conditioner.embedders.1.model.`):
    every layer (SDXL reads the penultimate one AND the pooled output of the last), fused in_proj,
    text_projection as a bare [hidden, projection] matrix (the transpose of transformers' Linear)."""
    src = text_state(text_encoder_2)
    cfg = text_encoder_2.config
    p = "conditioner.embedders.1.model."
    out = {
        f"{p}token_embedding.weight": src.pop("text_model.embeddings.token_embedding.weight"),
        f"{p}positional_embedding": src.pop("text_model.embeddings.position_embedding.weight"),
        f"{p}ln_final.weight": src.pop("text_model.final_layer_norm.weight"),
        f"{p}ln_final.bias": src.pop("text_model.final_layer_norm.bias"),
        f"{p}text_projection": src.pop("text_projection.weight").T.contiguous(),
        f"{p}logit_scale": torch.tensor(np.log(1 / 0.07), dtype=torch.float32),
    }
    for i in range(cfg.num_hidden_layers):
        prefix = f"text_model.encoder.layers.{i}."
        block = {k.removeprefix(prefix): src.pop(k) for k in list(src) if k.startswith(prefix)}
        out.update({f"{p}transformer.resblocks.{i}.{k}": v for k, v in mf.open_clip_resblock(block).items()})
    src.pop("text_model.embeddings.position_ids", None)
    assert not src, f"unmapped text_encoder_2 weights {sorted(src)}"
    return out


def make_single_file(mf, pipe, folder: Path) -> None:
    """The folder's weights as one f16 checkpoint (f16 as the real file; half the committed bytes),
    checked with diffusers' own converter against the folder's weights rounded to f16."""
    from diffusers import StableDiffusionXLPipeline

    out = mf.FIXTURES / SINGLE_FILE
    text = {f"conditioner.embedders.0.transformer.{k}": v for k, v in text_state(pipe.text_encoder).items()}
    text["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77, dtype=torch.int64).unsqueeze(0)
    parts = (sgm_unet_state(mf, pipe.unet), mf.ldm_vae_state(pipe.vae), text,
             open_clip_bigg_state(mf, pipe.text_encoder_2))
    state = {k: v for part in parts for k, v in part.items()}
    assert len(state) == sum(len(part) for part in parts), "two weights mapped to one SGM name"
    mf.save_safetensors(mf.fp16_variant(state), out)
    print(f"wrote {out.relative_to(mf.REPO)} ({out.stat().st_size} bytes)")

    single = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folder), local_files_only=True,
                                                        dtype=torch.float32, add_watermarker=False)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        rounded = {k: v.half().float() if v.is_floating_point() else v
                   for k, v in getattr(pipe, name).state_dict().items()}
        loaded = {k: v for k, v in getattr(single, name).state_dict().items()}
        for k in set(loaded) - set(rounded):  # position_ids, where transformers keeps it as a buffer
            assert k.endswith("position_ids"), k
            rounded[k] = loaded[k]
        mf.assert_same_weights(loaded, rounded, f"single-file {name}")
    print("single file: from_single_file unet/vae/text_encoder/text_encoder_2 == the folder's weights in f16")


# --------------------------------------------------------------------------------------------


def make_sdxl(mf) -> None:
    from diffusers import EulerDiscreteScheduler

    out = mf.FIXTURES / "tiny-sdxl"
    if out.exists():
        shutil.rmtree(out)
    unet = mf.build_unet(TINY_UNET, SEEDS[0], SHARPEN)
    text_encoder = build_text(mf, TINY_TEXT, SEEDS[1], False)
    text_encoder_2 = build_text(mf, TINY_TEXT2, SEEDS[2], True)
    vae = mf.build_vae(TINY_VAE, SEEDS[3], 1.0)

    mf.write_json(out / "model_index.json", MODEL_INDEX)
    mf.write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER)
    write_tokenizers(mf, out)
    mf.write_json(out / "unet" / "config.json", unet_config_json(unet))
    save_weights(mf, out / "unet", "diffusion_pytorch_model", unet.state_dict(), True, DECOYS["unet"])
    for folder, model, arch in (("text_encoder", text_encoder, "CLIPTextModel"),
                                ("text_encoder_2", text_encoder_2, "CLIPTextModelWithProjection")):
        mf.write_json(out / folder / "config.json", text_config_json(model, arch))
        save_weights(mf, out / folder, "model", text_state(model), True, DECOYS["text_encoder"])
    mf.write_json(out / "vae" / "config.json", vae_config_json(vae))
    save_weights(mf, out / "vae", "diffusion_pytorch_model", vae.state_dict(), True, DECOYS["vae"])
    # vae_1_0/: the release's first VAE, kept in the repo and never read by the pipeline.
    mf.write_json(out / "vae_1_0" / "config.json", vae_config_json(vae))
    for decoy in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                  *DECOYS["vae"]):
        mf.write_decoy(out / "vae_1_0" / decoy)
    (out / "vae_decoder").mkdir()
    mf.write_decoy(out / "vae_decoder" / "model.onnx")
    mf.write_decoy(out / "sd_xl_base_1.0.safetensors")  # the root single file: a decoy here
    print(f"wrote {out.relative_to(mf.REPO)}")

    pipe = load_pipeline(out)
    mf.assert_same_weights(pipe.unet, unet, "unet")
    mf.assert_same_weights(pipe.vae, vae, "vae")
    mf.assert_same_weights(pipe.text_encoder, text_encoder, "text_encoder")
    mf.assert_same_weights(pipe.text_encoder_2, text_encoder_2, "text_encoder_2")
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast is True
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!", \
        (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token)
    assert pipe.tokenizer_2.pad_token_id == 0
    assert pipe.default_sample_size == 16 and pipe.vae_scale_factor == 8
    print("unet add_embedding:", pipe.unet.add_embedding, "add_time_proj:", pipe.unet.add_time_proj.num_channels)

    tokens = []
    for prompt in TOKEN_PROMPTS:
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        ids2 = pipe.tokenizer_2(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        tokens.append({"prompt": prompt, "ids": ids, "ids_2": ids2})

    ref = mf.FIXTURES / "reference" / "families" / NAME
    if ref.exists():
        shutil.rmtree(ref)
    ref.mkdir(parents=True)
    mf.save_safetensors(embeddings(pipe), ref / "embeddings.safetensors")

    ddim = render_cases(mf, pipe, CASES, ref)
    images = ddim["images"]
    cases = {c["file"].removesuffix(".png"): c for c in ddim["cases"]}
    off, train = ("wide192x128_default", "wide192x128_entropy"), ("train128_default", "train128_entropy")
    kernel_render = {k: render(mf, pipe, cases[k], classic=True)[0] for k in off}
    from fixture_families import calibrate_images

    calibration = calibrate_images(mf, {k: images[k] for k in (*off, *train)}, off, train, kernel_render)
    # Not given vs given "": force_zeros_for_empty_prompt makes them different images.
    given_empty = render(mf, pipe, dict(cases["train128_default"], negative_prompt=""))[0]
    zeros_vs_empty = mf.image_diff(images["train128_default"], given_empty)
    print("negative not given vs given '':", zeros_vs_empty)
    assert zeros_vs_empty[0] >= 1.0, "force_zeros_for_empty_prompt made no difference"

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.timestep_spacing == "leading"
    euler = render_cases(mf, pipe, EULER_CASES, ref)

    pipe16 = load_pipeline(out, dtype=torch.float16, variant="fp16")
    f16 = render_cases(mf, pipe16, F16_CASES, ref)
    f16_vs_f32 = mf.image_diff(f16["images"]["f16_wide192x128_default"], images["wide192x128_default"])
    print("f16 (fp16 files) vs f32 (diffusers):", f16_vs_f32)

    mf.write_json(ref.parent / f"{NAME}.json", {
        "images": ddim["cases"], "euler": euler["cases"], "f16": f16["cases"],
        "calibration": calibration,
        "negative_not_given_vs_empty": {"mean": zeros_vs_empty[0], "max": zeros_vs_empty[1]},
        "f16_vs_f32": {"images": ["f16_wide192x128_default", "wide192x128_default"], "mean": f16_vs_f32[0],
                       "max": f16_vs_f32[1]},
        "tokens": tokens,
        "scheduler": {"ddim": "DDIMScheduler.from_config(scheduler_config)",
                      "euler": "EulerDiscreteScheduler (the model's own)"},
    })
    make_single_file(mf, load_pipeline(out), out)


def main(mf, only: str) -> None:
    {"sdxl": make_sdxl}[only](mf)
