"""HiDiffusion and Kohya Deep Shrink references (issue #21), for `make_fixtures.py --only hires`.

Writes tests/fixtures/tiny-sd-hires/ (tiny-sd's folder with another UNet) and
tests/fixtures/reference/hires/ (hires.json, PNGs); nothing else is touched.

The UNet: SD 2.1-base's block structure with block_out_channels [16, 24, 32, 32], so that
block_out_channels[0] != [1] != [2] and the `conv_shortcut`s of down_blocks.1/2.resnets.0 exist, as in
the real model. HiDiffusion recognises SD 1.5/2.1-base by module NAMES (its sd15_module_key.txt must be
a subset of the UNet's); without those shortcuts it refuses the model.

References:
  hidiffusion   PyPI hidiffusion 0.1.10, `apply_hidiffusion(pipe)` on diffusers' StableDiffusionPipeline.
                On diffusers 0.42.1 its import of `diffusers.pipelines.controlnet.multicontrolnet` fails;
                that module is aliased to `diffusers.models.controlnets.multicontrolnet` before importing it.
                MSW-MSA draws its window shift from `torch.rand(1)` on torch's GLOBAL generator, one draw
                per windowed transformer-block call. The mapping to sdscale: `torch.manual_seed(seed)`
                right before the pipeline call puts the global generator where sdscale's per-image shift
                generator starts (a torch CPU generator seeded with the image's seed); the initial
                latents (and eta's step noise) come from the pipeline's own
                `torch.Generator("cpu").manual_seed(seed)`, as sdscale's noise generator. Nothing else in
                the call draws from the global generator: every draw is recorded (torch.rand wrapped) and
                stored, and sdscale's shift generator is checked against them.
                T1/T2 ratios: the reference's `switching_threshold_ratio_dict['sd15_1024']` (latents under
                256 on a side); the T2-active case overrides it for that one call.
  deepshrink    diffusers' community examples/community/kohya_hires_fix.py (UNet2DConditionModelHighResFix),
                read from scripts/vendor/kohya_hires_fix.py (git-ignored): fetch it from
                github.com/huggingface/diffusers (main at 58eb52c0803e; it was not changed since v0.42.1's
                release line) and put it there before running this. Its UNet replaces pipe.unet, as its
                StableDiffusionHighResFixPipeline does in __init__.
Both compose with the entropy scale through make_fixtures.py's EntropyAttnProcessor: N is each call's
own key count (a window's, a shrunk level's), T the level's training count.

`--only hires-sdxl` (main_sdxl): HiDiffusion's SDXL rules, written to tests/fixtures/tiny-sdxl-hires/ and
reference/hires/sdxl.json + xl_*.png (the SD references above are not touched). The model: tiny-sdxl's
text encoders, tokenizers, VAE and scheduler (copied: git stores the identical blobs once) with a UNet
whose module names are a superset of the reference's sdxl_module_key.txt, so `apply_hidiffusion`
recognises the local folder as SDXL by module names (name_or_path is a path, not
'stabilityai/sdxl-turbo', so never the turbo rules): transformer_layers_per_block [1, 2, 10] and
block_out_channels [8, 16, 8] (each level's width differs from the one before, so the conv_shortcuts of
down_blocks.1/2.resnets.0 exist; level 2 narrow to keep its 60 transformer blocks small).
StableDiffusionXLPipeline with add_watermarker=False and DDIM from the folder's scheduler config, as
scripts/fixture_sdxl.py calls it. At latents under 512 on a side the reference runs its "aggressive"
RAU-Net (is_aggressive_raunet, aggressive_step 8); the ratio-override case also sets
is_aggressive_raunet=False for that call: sdscale's --hidiffusion-ratios on SDXL means the plain
T1/T2 rule with those ratios.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import torch

STEPS = 5
PROMPT = "a corgi on a beach"
NEGATIVE = "blurry"
HIRES_UNET_SEED = 2101

# (name, mode, width, height, seed, eta, options)
CASES = [
    ("hd_2x", "hidiffusion", 256, 256, 11, 0.0, {}),
    ("hd_3x", "hidiffusion", 384, 384, 12, 0.0, {}),
    ("hd_wide", "hidiffusion", 320, 192, 13, 0.0, {}),
    ("hd_odd", "hidiffusion", 200, 264, 14, 0.0, {}),
    ("hd_train", "hidiffusion", 128, 128, 15, 0.0, {}),
    ("hd_t2", "hidiffusion", 264, 200, 16, 0.0, {"ratios": [0.6, 0.4]}),
    ("hd_eta1", "hidiffusion", 256, 256, 17, 1.0, {}),
    ("hde_2x", "hidiffusion+entropy", 256, 256, 11, 0.0, {}),
    ("ds_default", "deepshrink", 256, 256, 21, 0.0, {}),
    ("ds_wide", "deepshrink", 320, 192, 22, 0.0, {}),
    ("ds_other", "deepshrink", 256, 256, 23, 0.0, {"deepshrink": [[400, 0.7, 1]]}),
    ("ds_multi", "deepshrink", 256, 256, 24, 0.0, {"deepshrink": [[200, 0.5, 1], [800, 0.5, 2], [600, 0.75, 1]]}),
    ("dse_default", "deepshrink+entropy", 256, 256, 21, 0.0, {}),
]


# SDXL: (name, mode, width, height, seed, steps, options). Training size 128 px (16 latents).
XL_CASES = [
    ("xl_2x", "hidiffusion", 256, 256, 31, 5, {}),
    ("xl_wide", "hidiffusion", 384, 256, 32, 7, {}),  # 7 steps: the aggressive stride-4 downsampler at step 0
    ("xl_odd", "hidiffusion", 200, 264, 33, 7, {}),
    ("xl_train", "hidiffusion", 128, 128, 34, 5, {}),
    ("xl_t1t2", "hidiffusion", 264, 200, 35, 5, {"ratios": [0.6, 0.4]}),
    ("xle_2x", "hidiffusion+entropy", 256, 256, 31, 5, {}),
]
XL_UNET_SEED = 2301
# attn1 q/k factor. tiny-sdxl's 5.5 makes this deeper UNet (60 transformer blocks at level 2) chaotic:
# diffusers' SDPA and explicit softmax then differ by 1.42 mean at 128 px; at 4 by 0.0005.
XL_SHARPEN = 4.0
XL_WINDOWED = 10  # transformer_blocks.0/1 of down_blocks.1.attentions.0/1 and up_blocks.1.attentions.0/1/2


def xl_unet_config(fs) -> dict:
    return dict(fs.TINY_UNET, block_out_channels=[8, 16, 8], transformer_layers_per_block=[1, 2, 10])


def hires_unet_config(mf) -> dict:
    return dict(mf.TINY_UNET, block_out_channels=[16, 24, 32, 32])


def import_hidiffusion():
    import diffusers.models.controlnets.multicontrolnet as multicontrolnet

    sys.modules.setdefault("diffusers.pipelines.controlnet.multicontrolnet", multicontrolnet)
    import hidiffusion
    import hidiffusion.hidiffusion as hd

    return hidiffusion, hd


def import_kohya(repo: Path):
    path = repo / "scripts" / "vendor" / "kohya_hires_fix.py"
    if not path.exists():
        sys.exit(f"{path} is missing: fetch examples/community/kohya_hires_fix.py from huggingface/diffusers")
    spec = importlib.util.spec_from_file_location("kohya_hires_fix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_model(mf, out: Path):
    from fixture_families import diffusers_config, save_weights

    if out.exists():
        shutil.rmtree(out)
    unet = mf.build_unet(hires_unet_config(mf), HIRES_UNET_SEED, mf.ATTN_SHARPEN)
    for name in ("text_encoder", "vae", "tokenizer", "scheduler", "feature_extractor"):
        shutil.copytree(mf.TINY_DIR / name, out / name)
    shutil.copy(mf.TINY_DIR / "model_index.json", out / "model_index.json")
    mf.write_json(out / "unet" / "config.json", diffusers_config(unet, mf.REAL_UNET_CONFIG_KEYS, mf.REAL_DIFFUSERS_VERSION))
    save_weights(mf, out / "unet", "diffusion_pytorch_model", unet.state_dict(), False, mf.PICKLE_DECOYS["unet"])
    return unet


class RandLog:
    """Wraps torch.rand to record every draw (HiDiffusion's window shifts)."""

    def __init__(self):
        self.draws: list[float] = []
        self.original = torch.rand

    def __enter__(self):
        def logged(*args, **kwargs):
            out = self.original(*args, **kwargs)
            self.draws.extend(float(v) for v in out.flatten())
            return out

        torch.rand = logged
        return self

    def __exit__(self, *exc):
        torch.rand = self.original


@torch.no_grad()
def call(mf, pipe, case: dict):
    """One reference call, SD's or SDXL's pipeline alike."""
    attention = "entropy" if case["mode"].endswith("+entropy") else "default"
    mf.set_attention_mode(pipe.unet, pipe.vae, attention)
    torch.manual_seed(case["seed"])  # the global generator: HiDiffusion's window shifts
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


def main(mf) -> None:
    torch.set_num_threads(1)
    out = mf.FIXTURES / "tiny-sd-hires"
    ref = mf.REF_DIR / "hires"
    unet = write_model(mf, out)
    print(f"wrote {out.relative_to(mf.REPO)}")
    ref.mkdir(parents=True, exist_ok=True)

    _, hd = import_hidiffusion()
    kohya = import_kohya(mf.REPO)
    entries = []
    for name, mode, width, height, seed, eta, options in CASES:
        case = {"file": f"{name}.png", "prompt": PROMPT, "negative_prompt": NEGATIVE, "width": width,
                "height": height, "steps": STEPS, "guidance": 7.5, "seed": seed, "eta": eta, "mode": mode,
                **options}
        pipe = mf.load_pipeline(str(out))  # a str: HiDiffusion searches name_or_path with `in`
        mf.assert_same_weights(pipe.unet, unet, "unet")
        start = time.perf_counter()
        if mode.startswith("hidiffusion"):
            hd.apply_hidiffusion(pipe)
            assert type(pipe.unet.down_blocks[1]).__name__ == "cross_attn_down_block", "not recognised as SD 2.1"
            saved = dict(hd.switching_threshold_ratio_dict["sd15_1024"])
            if "ratios" in options:
                t1, t2 = options["ratios"]
                hd.switching_threshold_ratio_dict["sd15_1024"].update({"T1_ratio": t1, "T2_ratio": t2})
            try:
                with RandLog() as log:
                    image = call(mf, pipe, case)
            finally:
                hd.switching_threshold_ratio_dict["sd15_1024"].update(saved)
            windowed_calls = 5 * STEPS  # down_blocks.0 ×2, up_blocks.3 ×3 per UNet call
            assert len(log.draws) == windowed_calls, (len(log.draws), windowed_calls)
            case["rand"] = log.draws
        else:
            entries_ = options.get("deepshrink", [[600, 0.5, 1]])
            high_res_fix = [{"timestep": t, "scale_factor": s, "block_num": b} for t, s, b in entries_]
            pipe.unet = kohya.UNet2DConditionModelHighResFix.from_unet(pipe.unet, high_res_fix=high_res_fix).eval()
            with RandLog() as log:
                image = call(mf, pipe, case)
            assert not log.draws, "Deep Shrink draws nothing from torch.rand"
        image.save(ref / case["file"])
        entries.append(case)
        print(f"  {case['file']}: {mode} {width}x{height} seed {seed} eta {eta} {options} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    mf.write_json(ref / "hires.json", entries)
    print(f"wrote {(ref / 'hires.json').relative_to(mf.REPO)}")


def write_sdxl_model(mf, fs, out: Path):
    from fixture_families import copy_files, save_weights

    if out.exists():
        shutil.rmtree(out)
    src = mf.FIXTURES / "tiny-sdxl"
    # Values rounded through f16 (as first made, so the references stay the same), stored in f32 as the real
    # unet/diffusion_pytorch_model.safetensors is.
    unet = mf.build_unet(xl_unet_config(fs), XL_UNET_SEED, XL_SHARPEN).half().float()
    shutil.copytree(src / "scheduler", out / "scheduler")
    shutil.copy(src / "model_index.json", out / "model_index.json")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(src / name, out / name)
    for name, stem in (("text_encoder", "model"), ("text_encoder_2", "model"), ("vae", "diffusion_pytorch_model")):
        copy_files(src / name, out / name, ["config.json", f"{stem}.safetensors"])
    mf.write_json(out / "unet" / "config.json", fs.unet_config_json(unet))
    save_weights(mf, out / "unet", "diffusion_pytorch_model", unet.state_dict(), False, ())
    return unet


def main_sdxl(mf) -> None:
    import fixture_sdxl as fs  # scripts/, beside this file

    torch.set_num_threads(1)
    out = mf.FIXTURES / "tiny-sdxl-hires"
    ref = mf.REF_DIR / "hires"
    unet = write_sdxl_model(mf, fs, out)
    print(f"wrote {out.relative_to(mf.REPO)}")
    ref.mkdir(parents=True, exist_ok=True)
    _, hd = import_hidiffusion()
    keys = {k for k, _ in unet.named_modules()}
    assert set(hd.sdxl_module_key) < keys, sorted(set(hd.sdxl_module_key) - keys)[:10]
    assert not set(hd.sd15_module_key) < keys
    entries = []
    for name, mode, width, height, seed, steps, options in XL_CASES:
        case = {"file": f"{name}.png", "prompt": PROMPT, "negative_prompt": NEGATIVE, "width": width,
                "height": height, "steps": steps, "guidance": 7.5, "seed": seed, "eta": 0.0, "mode": mode,
                **options}
        pipe = fs.load_pipeline(str(out))  # a fresh pipeline: the patched blocks keep state on the instances
        mf.assert_same_weights(pipe.unet, unet, "unet")
        start = time.perf_counter()
        hd.apply_hidiffusion(pipe)
        block = pipe.unet.down_blocks[1]
        assert type(block).__name__ == "cross_attn_down_block" and block.model == "sdxl", "not recognised as SDXL"
        assert type(pipe.unet.down_blocks[1].downsamplers[0].conv).__name__ == "downsampler_block"
        saved = dict(hd.switching_threshold_ratio_dict["sdxl_2048"]), hd.is_aggressive_raunet
        if "ratios" in options:
            t1, t2 = options["ratios"]
            hd.switching_threshold_ratio_dict["sdxl_2048"].update({"T1_ratio": t1, "T2_ratio": t2})
            hd.is_aggressive_raunet = False
        try:
            with RandLog() as log:
                image = call(mf, pipe, case)
        finally:
            hd.switching_threshold_ratio_dict["sdxl_2048"].update(saved[0])
            hd.is_aggressive_raunet = saved[1]
        assert len(log.draws) == XL_WINDOWED * steps, (len(log.draws), XL_WINDOWED * steps)
        case["rand"] = log.draws
        image.save(ref / case["file"])
        entries.append(case)
        print(f"  {case['file']}: {mode} {width}x{height} seed {seed} steps {steps} {options} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    mf.write_json(ref / "sdxl.json", entries)
    print(f"wrote {(ref / 'sdxl.json').relative_to(mf.REPO)}")
