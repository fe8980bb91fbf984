"""VAE fixtures (issues 21 and 22), for `make_fixtures.py --only vae-tiling|vae-swap`.

Both read the committed tiny-sd/ folder and touch nothing else. The helpers (random models, real
layouts, rendering) are make_fixtures.py's, passed in as `mf`.

vae-tiling (issue 21): diffusers 0.42.1 `AutoencoderKL.enable_tiling()` + `tiled_decode`, as
`pipe.vae.enable_tiling()` makes StableDiffusionPipeline decode. Facts pinned by the references (read
in diffusers/models/autoencoders/autoencoder_kl.py):
  * tile_sample_min_size = config.sample_size (tiny-sd: 128 px), tile_latent_min_size =
    int(sample_size / 2 ** (len(block_out_channels) - 1)) (16 latents), tile_overlap_factor 0.25;
  * _decode tiles only when a latent side EXCEEDS tile_latent_min_size (a 16x16 latent decodes whole);
  * tiles start every overlap = int(16 * 0.75) = 12 latents along each side (range(0, side, 12)); each is
    z[i:i+16, j:j+16] (smaller at the far edges, down to 1 latent), post_quant_conv + decoder alone;
  * blend_extent = int(128 * 0.25) = 32 px, row_limit = 128 - 32 = 96 px; each tile is blended IN PLACE
    with the tile above (blend_v: its top rows y < 32 take a[-32 + y]·(1 - y/32) + b[y]·(y/32), at most
    min(a rows, b rows, 32) rows), then with the tile to the left (blend_h, the same over columns), the
    neighbours being the already-blended tensors; then cropped to [:96, :96] and concatenated.
  The cases: 320x448 (latents 40x56: 4x5 tiles), 136x200 (latents 25x17: 3x2 tiles, the last row of
  tiles 1 latent high, the last column 5 wide), 128x128 (16x16: not tiled; equal to the untiled image).

vae-swap (issue 22, `--vae DIR|FILE`): a replacement VAE with its own random weights, in the two forms
people download one:
  tiny-vae-ft-mse/        stabilityai/sd-vae-ft-mse's folder as diffusers 0.4.2 wrote it (2022):
                          config.json with the keys of the time (no scaling_factor, sample_size 256),
                          diffusion_pytorch_model.safetensors with the legacy attention names
                          (query/key/value/proj_attn), diffusion_pytorch_model.bin (a decoy here)
  tiny-vae-ft-mse-840000-ema-pruned.safetensors
                          stabilityai/sd-vae-ft-mse-original's single file: the same weights in the
                          original LDM layout with no prefix (encoder.*, decoder.* with up.{n-1-i},
                          mid.attn_1.q/k/v/proj_out as 1x1 convs, quant_conv.*, post_quant_conv.*)
  References: StableDiffusionPipeline from tiny-sd/ with `vae=` the folder's AutoencoderKL; the single
  file loaded with AutoencoderKL.from_single_file(config=tiny-sd/vae) is checked to be the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TILE_CASES = [
    # (name, width, height, seed, mode)
    ("vae_tiled_320x448", 320, 448, 42, "default"),
    ("vae_tiled_136x200", 136, 200, 7, "entropy"),
    ("vae_tiled_128", 128, 128, 42, "default"),
]
SWAP_CASES = [
    # (name, width, height, seed, mode)
    ("vae_swap_192", 192, 192, 42, "default"),
    ("vae_swap_160x96_entropy", 160, 96, 7, "entropy"),
]
STEPS = 4
SEED_SWAP_VAE = 1303
SWAP_VAE_DIFFUSERS_VERSION = "0.4.2"
SWAP_VAE_SAMPLE_SIZE = 256  # sd-vae-ft-mse/config.json (SD 2.1-base's vae says 768)


def case_dict(mf, name: str, width: int, height: int, seed: int, mode: str) -> dict:
    return {
        "file": f"{name}.png",
        "prompt": mf.IMAGE_PROMPT,
        "negative_prompt": None,
        "width": width,
        "height": height,
        "steps": STEPS,
        "guidance": 7.5,
        "seed": seed,
        "mode": mode,
    }


def tile_starts(side: int, overlap: int) -> list[int]:
    return list(range(0, side, overlap))


def make_tiling(mf) -> None:
    pipe = mf.load_pipeline(mf.TINY_DIR)
    vae = pipe.vae
    sample = vae.config.sample_size
    assert vae.tile_sample_min_size == sample == 128, vae.tile_sample_min_size
    assert vae.tile_latent_min_size == 16 and vae.tile_overlap_factor == 0.25
    overlap = int(vae.tile_latent_min_size * (1 - vae.tile_overlap_factor))

    calls = []
    original_forward = vae.decoder.forward

    def counting_forward(z, *args, **kwargs):
        calls.append(tuple(z.shape[2:]))
        return original_forward(z, *args, **kwargs)

    vae.decoder.forward = counting_forward
    out_dir = mf.REF_DIR / "images"
    entries = []
    for name, width, height, seed, mode in TILE_CASES:
        case = case_dict(mf, name, width, height, seed, mode)
        vae.disable_tiling()
        untiled, untiled_latents = mf.render(pipe, case)
        vae.enable_tiling()
        calls.clear()
        tiled, latents = mf.render(pipe, case)
        vae.disable_tiling()
        assert torch.equal(latents, untiled_latents), "tiling must change the decode only"
        lh, lw = height // 8, width // 8
        rows, cols = tile_starts(lh, overlap), tile_starts(lw, overlap)
        expect = [(min(16, lh - i), min(16, lw - j)) for i in rows for j in cols]
        if lh <= 16 and lw <= 16:
            expect = [(lh, lw)]  # _decode does not tile
        assert calls == expect, (calls, expect)
        mean, worst = mf.image_diff(tiled, untiled)
        if len(expect) > 1:
            assert worst > 4, f"{name}: the tiled decode should differ visibly from the untiled one"
        else:
            assert worst == 0, f"{name}: one tile must equal the untiled decode"
        tiled.save(out_dir / case["file"])
        entries.append({**case, "tiles": [len(rows), len(cols)] if len(expect) > 1 else [1, 1],
                        "tile_latents": expect, "vs_untiled": {"mean": mean, "max": worst}})
        print(f"  {case['file']}: {width}x{height}, latents {lh}x{lw}, decoder calls on {expect}; "
              f"tiled vs untiled mean {mean:.3f} max {worst:.0f} levels", flush=True)
    mf.write_json(mf.REF_DIR / "vae_tiling.json", entries)
    print(f"wrote {(mf.REF_DIR / 'vae_tiling.json').relative_to(mf.REPO)} and {len(entries)} images")


def swap_paths(mf) -> tuple[Path, Path]:
    return mf.FIXTURES / "tiny-vae-ft-mse", mf.FIXTURES / "tiny-vae-ft-mse-840000-ema-pruned.safetensors"


def make_swap(mf) -> None:
    from diffusers import AutoencoderKL

    folder, single = swap_paths(mf)
    cfg = dict(mf.TINY_VAE, sample_size=SWAP_VAE_SAMPLE_SIZE)
    vae = mf.build_vae(cfg, SEED_SWAP_VAE, mf.VAE_CONV_OUT_GAIN)
    # The folder: config of diffusers 0.4.2's keys (the same set as 0.10's for a VAE), legacy names.
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    config = mf.real_config("vae", vae) | {"_diffusers_version": SWAP_VAE_DIFFUSERS_VERSION}
    mf.write_json(folder / "config.json", dict(sorted(config.items())))
    mf.save_safetensors(mf.real_state_dict("vae", vae), folder / "diffusion_pytorch_model.safetensors")
    mf.write_decoy(folder / "diffusion_pytorch_model.bin")
    # The single file: LDM names without `first_stage_model.`.
    state = {k.removeprefix("first_stage_model."): v for k, v in mf.ldm_vae_state(vae).items()}
    assert all(k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv") for k in state)
    mf.save_safetensors(state, single)

    loaded = AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval()
    from_single = AutoencoderKL.from_single_file(str(single), config=str(mf.TINY_DIR), subfolder="vae",
                                                 local_files_only=True).eval()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, vae.state_dict()[key]), key
        assert torch.equal(value, from_single.state_dict()[key]), f"single file: {key}"
    assert loaded.config.scaling_factor == 0.18215, loaded.config.scaling_factor

    pipe = mf.load_pipeline(mf.TINY_DIR)
    own_vae = pipe.vae
    out_dir = mf.REF_DIR / "images"
    entries = []
    for name, width, height, seed, mode in SWAP_CASES:
        case = case_dict(mf, name, width, height, seed, mode)
        pipe.vae = own_vae
        own, own_latents = mf.render(pipe, case)
        pipe.vae = loaded
        swapped, latents = mf.render(pipe, case)
        assert torch.equal(latents, own_latents)
        mean, worst = mf.image_diff(swapped, own)
        assert worst > 4, f"{name}: the replacement VAE should change the image"
        swapped.save(out_dir / case["file"])
        entries.append({**case, "vs_own_vae": {"mean": mean, "max": worst}})
        print(f"  {case['file']}: {width}x{height}; vs the model's own VAE mean {mean:.2f} max {worst:.0f}",
              flush=True)
    mf.write_json(mf.REF_DIR / "vae_swap.json", entries)
    size = sum(p.stat().st_size for p in folder.iterdir()) + single.stat().st_size
    print(f"wrote {folder.relative_to(mf.REPO)}/, {single.relative_to(mf.REPO)} ({size / 1e6:.1f} MB), "
          f"{(mf.REF_DIR / 'vae_swap.json').relative_to(mf.REPO)} and {len(entries)} images")


def main(mf, only: str) -> None:
    {"vae-tiling": make_tiling, "vae-swap": make_swap}[only](mf)
