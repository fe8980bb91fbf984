"""The Turbo models (issue #22's last item), for `make_fixtures.py --only turbo`.

Writes two tiny models laid out like the real ones and diffusers' references for them:
  tests/fixtures/tiny-sdxl-turbo/   stabilityai/sdxl-turbo (SDXL at 512²): the tiny SDXL networks of
                                    tiny-sdxl/ (the same weight files, byte for byte) under Turbo's configs
  tests/fixtures/tiny-sd-turbo/     stabilityai/sd-turbo (SD 2.1 at 512², now held by users as a local
                                    folder): the tiny SD 2.x networks of tiny-sd/ under SD-Turbo's configs
  tests/fixtures/reference/families/turbo/*.png + turbo.json
                                    diffusers' AutoPipelineForText2Image.from_pretrained(folder) (CPU, f32,
                                    add_watermarker=False for SDXL) called as the model cards say:
                                    num_inference_steps 1 (and 2 / 4 for some cases), guidance_scale 0.0,
                                    generator=torch.Generator("cpu").manual_seed(seed); no negative prompt

The weight and tokenizer files are copies of the committed tiny-sdxl/ and tiny-sd/ ones (git stores each
blob once, so the two fixtures add only their JSON files and the reference PNGs to the repository). What
Turbo changes is all in the configs: the UNet's sample_size 64 (512 px, both models), the scheduler
(trailing spacing), the pipeline index of diffusers 0.24.

WHAT IS CONFIRMED and what is written from memory (no Hub access here; searched public code for copies):
  sdxl-turbo scheduler/scheduler_config.json   CONFIRMED: EulerAncestralDiscreteScheduler, 0.24.0.dev0,
      timestep_spacing "trailing", steps_offset 1 (quoted verbatim in public code, e.g. Fooocus-derived
      SCHEDULER_EULERA_CONFIG_JSON; the same dict as fixture_samplers.HUB_CONFIGS["sdxl-turbo"], used here).
  sdxl-turbo unet/config.json   key SET confirmed as diffusers 0.22–0.24's (SDXL base's keys plus
      attention_type "default", dropout 0.0, reverse_transformer_layers_per_block null: an SDXL UNet config
      of that era quoted in public code, and exactly diffusers 0.42's UNet2DConditionModel arguments);
      sample_size 64 and _diffusers_version "0.24.0.dev0" from memory (UNCONFIRMED file).
  sdxl-turbo model_index.json   UNCONFIRMED (memory): StableDiffusionXLPipeline, 0.24.0.dev0,
      force_zeros_for_empty_prompt true, feature_extractor / image_encoder [null, null] (the IP-Adapter slots
      diffusers 0.24 writes), scheduler EulerAncestralDiscreteScheduler.
  sdxl-turbo vae/config.json    UNCONFIRMED: SDXL's VAE config (scaling_factor 0.13025, force_upcast true)
      with the 0.24.0.dev0 stamp and sample_size 512.
  sdxl-turbo text_encoder*/config.json, tokenizer*/   UNCONFIRMED: tiny-sdxl's files unchanged (base 1.0's keys
      and stamps; Turbo ships the same two CLIP encoders and tokenizers).
  sd-turbo scheduler/scheduler_config.json   the CLASS corroborated: EulerDiscreteScheduler, not ancestral
      (public code loads `EulerDiscreteScheduler.from_pretrained("stabilityai/sd-turbo", subfolder="scheduler")`,
      and diffusers.js tells SD-Turbo from SD by model_index's scheduler being EulerDiscreteScheduler);
      timestep_spacing "trailing" follows from the model card (AutoPipelineForText2Image with its own scheduler
      at num_inference_steps=1 gives images: "leading" and "linspace" put one step at t = 1 / 0, "trailing" at
      999). The rest from memory (UNCONFIRMED): 0.24.0.dev0, steps_offset 1, epsilon (SD-Turbo renders at
      512, from SD 2.1-base), and that class's 0.24 keys (interpolation_type, sigma_min/sigma_max null,
      timestep_type "discrete", use_karras_sigmas false).
  sd-turbo model_index.json     StableDiffusionPipeline with EulerDiscreteScheduler (corroborated, above); the
      rest UNCONFIRMED (memory): 0.24.0.dev0, safety_checker / feature_extractor / image_encoder [null, null],
      requires_safety_checker true (diffusers warns only).
  sd-turbo unet/config.json     the 0.24 key set as above, SD 2.x values (no added embedding, linear
      projection, no upcast_attention), sample_size 64 (UNCONFIRMED file).
  sd-turbo vae/config.json      UNCONFIRMED: tiny-sd's keys plus force_upcast true, scaling_factor 0.18215,
      stamped 0.24.0.dev0, sample_size 768.
  sd-turbo text_encoder/, tokenizer/   tiny-sd's files unchanged (SD 2.x's OpenCLIP-H encoder and tokenizer).
  Root single files (sd_xl_turbo_1.0.safetensors, sd_xl_turbo_1.0_fp16.safetensors, sd_turbo.safetensors):
      text decoys here, as tiny-sdxl's sd_xl_base_1.0.safetensors.

Asserted below for each folder: the pipeline class AutoPipelineForText2Image picked, the scheduler class and
its timestep_spacing, the UNet's sample_size (default size 512 px), the weights equal to the source fixture's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import fixture_sdxl
from fixture_samplers import HUB_CONFIGS

NAME = "turbo"
VERSION = "0.24.0.dev0"
PROMPT = "a corgi on a beach"
# diffusers 0.22-0.24's UNet2DConditionModel config keys (= diffusers 0.42's __init__ arguments).
UNET_KEYS = tuple(sorted((*fixture_sdxl.UNET_KEYS, "attention_type", "dropout",
                          "reverse_transformer_layers_per_block")))

SDXL_TURBO_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": VERSION,
    "feature_extractor": [None, None],
    "force_zeros_for_empty_prompt": True,
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD_TURBO_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": True,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD_TURBO_SCHEDULER = {
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
    "sigma_max": None,
    "sigma_min": None,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "timestep_type": "discrete",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# (name, width, height, steps, seed): guidance 0, no negative prompt, mode default. The training size and
# one other per model at 1 step; 4 and 2 steps off it (the ancestral noise of Euler a between steps for
# SDXL-Turbo). Only the 1-step case at 512² keeps the committed PNGs small.
CASES = [
    ("train512_1step", 512, 512, 1, 42),
    ("wide384x256_1step", 384, 256, 1, 7),
    ("tall256x384_4steps", 256, 384, 4, 11),
    ("sq256_2steps", 256, 256, 2, 5),
]
MODELS = {
    # key: (folder, source fixture, pipeline class, scheduler class)
    "sdxl_turbo": ("tiny-sdxl-turbo", "tiny-sdxl", "StableDiffusionXLPipeline", "EulerAncestralDiscreteScheduler"),
    "sd_turbo": ("tiny-sd-turbo", "tiny-sd", "StableDiffusionPipeline", "EulerDiscreteScheduler"),
}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def copy_weights(src: Path, out: Path, folder: str) -> None:
    """The f32 and fp16 safetensors of one component, byte for byte."""
    (out / folder).mkdir(parents=True, exist_ok=True)
    for path in sorted((src / folder).glob("*.safetensors")):
        shutil.copyfile(path, out / folder / path.name)


def unet_config(src: Path) -> dict:
    """The source UNet's config with the 0.24 key set filled from diffusers' defaults (as the 0.24 writer
    does), sample_size 64, the 0.24 stamp."""
    from diffusers import UNet2DConditionModel

    config = read_json(src / "unet" / "config.json")
    defaults = UNet2DConditionModel.load_config(src / "unet")
    full = UNet2DConditionModel.from_config(defaults).config  # every argument, defaults included
    for key in UNET_KEYS:
        if not key.startswith("_") and key not in config:
            config[key] = full[key]
    config.update({"_diffusers_version": VERSION, "sample_size": 64})
    assert sorted(config) == sorted(UNET_KEYS), sorted(set(config) ^ set(UNET_KEYS))
    return dict(sorted(config.items()))


def make_sdxl_turbo(mf) -> Path:
    src, out = mf.FIXTURES / "tiny-sdxl", mf.FIXTURES / "tiny-sdxl-turbo"
    if out.exists():
        shutil.rmtree(out)
    mf.write_json(out / "model_index.json", SDXL_TURBO_INDEX)
    mf.write_json(out / "scheduler" / "scheduler_config.json", HUB_CONFIGS["sdxl-turbo"])
    mf.write_json(out / "unet" / "config.json", unet_config(src))
    vae = read_json(src / "vae" / "config.json")
    vae.pop("_name_or_path", None)
    vae.update({"_diffusers_version": VERSION, "sample_size": 512})
    mf.write_json(out / "vae" / "config.json", dict(sorted(vae.items())))
    for folder in ("unet", "vae", "text_encoder", "text_encoder_2"):
        copy_weights(src, out, folder)
    for folder in ("text_encoder", "text_encoder_2"):
        shutil.copyfile(src / folder / "config.json", out / folder / "config.json")
    for folder in ("tokenizer", "tokenizer_2"):
        shutil.copytree(src / folder, out / folder)
    for decoy in ("sd_xl_turbo_1.0.safetensors", "sd_xl_turbo_1.0_fp16.safetensors"):
        mf.write_decoy(out / decoy)
    print(f"wrote {out.relative_to(mf.REPO)}")
    return out


def make_sd_turbo(mf) -> Path:
    src, out = mf.TINY_DIR, mf.FIXTURES / "tiny-sd-turbo"
    if out.exists():
        shutil.rmtree(out)
    mf.write_json(out / "model_index.json", SD_TURBO_INDEX)
    mf.write_json(out / "scheduler" / "scheduler_config.json", SD_TURBO_SCHEDULER)
    mf.write_json(out / "unet" / "config.json", unet_config(src))
    vae = read_json(src / "vae" / "config.json")
    vae.update({"_diffusers_version": VERSION, "force_upcast": True, "scaling_factor": 0.18215,
                "sample_size": 768})
    mf.write_json(out / "vae" / "config.json", dict(sorted(vae.items())))
    for folder in ("unet", "vae", "text_encoder"):
        copy_weights(src, out, folder)
    shutil.copyfile(src / "text_encoder" / "config.json", out / "text_encoder" / "config.json")
    shutil.copytree(src / "tokenizer", out / "tokenizer")
    mf.write_decoy(out / "sd_turbo.safetensors")
    print(f"wrote {out.relative_to(mf.REPO)}")
    return out


def load(mf, key: str, folder: Path):
    """AutoPipelineForText2Image, as the model cards call it; asserts what it picked."""
    from diffusers import AutoPipelineForText2Image

    _, source, pipeline_class, scheduler_class = MODELS[key]
    kwargs = {"add_watermarker": False} if key == "sdxl_turbo" else {}
    pipe = AutoPipelineForText2Image.from_pretrained(folder, dtype=torch.float32, use_safetensors=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == pipeline_class, type(pipe).__name__
    assert type(pipe.scheduler).__name__ == scheduler_class, type(pipe.scheduler).__name__
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.unet.config.sample_size == 64 and pipe.vae_scale_factor == 8
    if key == "sdxl_turbo":
        assert pipe.watermark is None and pipe.config.force_zeros_for_empty_prompt is True
    else:
        assert pipe.safety_checker is None
    # The same weights as the source fixture, as diffusers loads both.
    base = AutoPipelineForText2Image.from_pretrained(mf.FIXTURES / source, dtype=torch.float32,
                                                     use_safetensors=True, **kwargs)
    for name in ("unet", "vae", "text_encoder", *(("text_encoder_2",) if key == "sdxl_turbo" else ())):
        mf.assert_same_weights(getattr(pipe, name), getattr(base, name), f"{key} {name}")
    return pipe


@torch.no_grad()
def render(mf, key: str, pipe, ref: Path) -> list[dict]:
    mf.set_attention_mode(pipe.unet, pipe.vae, "default")
    cases = []
    for name, width, height, steps, seed in CASES:
        file = f"{key}_{name}.png"
        generator = torch.Generator("cpu").manual_seed(seed)
        image = pipe(PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
                     generator=generator).images[0]
        image.save(ref / file)
        scheduler = pipe.scheduler
        cases.append({"file": file, "files": [file], "prompt": PROMPT, "negative_prompt": None, "width": width,
                      "height": height, "steps": steps, "guidance": 0.0, "seed": seed, "mode": "default",
                      "eta": 0.0, "num_images": 1,
                      "timesteps": [round(float(t), 4) for t in scheduler.timesteps],
                      "sigmas": [round(float(s), 6) for s in scheduler.sigmas],
                      "init_noise_sigma": round(float(scheduler.init_noise_sigma), 6)})
        print(f"  {key}/{name}: {width}x{height} steps {steps} seed {seed} timesteps {cases[-1]['timesteps']} "
              f"init_noise_sigma {cases[-1]['init_noise_sigma']}")
    return cases


def make_turbo(mf) -> None:
    folders = {"sdxl_turbo": make_sdxl_turbo(mf), "sd_turbo": make_sd_turbo(mf)}
    ref = mf.REF_DIR / "families" / NAME
    if ref.exists():
        shutil.rmtree(ref)
    ref.mkdir(parents=True)
    out = {}
    for key, folder in folders.items():
        pipe = load(mf, key, folder)
        out[key] = {"model": folder.name, "pipeline": type(pipe).__name__,
                    "scheduler": type(pipe.scheduler).__name__,
                    "timestep_spacing": pipe.scheduler.config.timestep_spacing,
                    "cases": render(mf, key, pipe, ref)}
    mf.write_json(ref.parent / f"{NAME}.json", out)
    print(f"wrote {ref.relative_to(mf.REPO)} and {NAME}.json")


def main(mf, only: str) -> None:
    {"turbo": make_turbo}[only](mf)
