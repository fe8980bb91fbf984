"""Full-size random-weight SD 1.5, LDM-256 or SDXL base models, for benchmarks (issue #11: one guided UNet
step of each; issue #22: SDXL beside diffusers).

    python scripts/make_full_family.py sd15 ~/.cache/sdscale/sd15-random --vae-from ~/.cache/sdscale/sd21-random
    python scripts/make_full_family.py ldm ~/.cache/sdscale/ldm-random --vae-from ~/.cache/sdscale/sd21-random
    python scripts/make_full_family.py sdxl ~/.cache/sdscale/sdxl-random     # ~14 GB of f32 weights

Starts from the committed tiny fixture of the family (tests/fixtures/tiny-sd15, tiny-ldm: the real Hub layout,
its config keys and tokenizer files), sets every size field to the real model's, and writes weights drawn
with diffusers' / transformers' default initialisation from a fixed seed. The UNet and text encoder are the
real models' shapes; the VAE is SD's KL-f8 autoencoder (the same architecture in both families), hard-linked
from a full-size SD 2.1-base folder made by `make_fixtures.py --full`. LDMBert keeps the fixture's small
vocabulary (its tokenizer is the fixture's): only its embedding table is smaller than the real one.
Random weights cost the same compute as real ones; the images are noise.

SDXL: the layout of tests/fixtures/tiny-sdxl (stabilityai/stable-diffusion-xl-base-1.0's folders, tokenizers
with the real vocabulary) with the real base-1.0 configs that sdscale ships in assets/sdxl-base-1-0/, every
network full size (UNet 2.6 B parameters, CLIP-L, OpenCLIP bigG with its projection, the SDXL VAE), f32 only:
the benchmark runs f32 on the CPU from mapped files. The UNet (10 GB) is written tensor by tensor, so making
it needs its own size in RAM, not twice that.
"""

import argparse
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
FULL_UNET = {"attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "norm_num_groups": 32}
FAMILIES = {
    "sd15": {
        "fixture": "tiny-sd15",
        "unet": {**FULL_UNET, "cross_attention_dim": 768, "sample_size": 64},
        "text": ("text_encoder", "model.safetensors",
                 {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}),
        "vae": "vae",
    },
    "ldm": {
        "fixture": "tiny-ldm",
        "unet": {**FULL_UNET, "cross_attention_dim": 1280, "sample_size": 32},
        "text": ("bert", "model.safetensors",
                 {"d_model": 1280, "encoder_attention_heads": 8, "head_dim": 64, "encoder_ffn_dim": 5120,
                  "encoder_layers": 32}),
        "vae": "vqvae",
    },
}


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def save_streaming(state: dict, path: Path) -> None:
    """safetensors' file format written one tensor at a time: `save_file` serialises every tensor into
    bytes first, which for SDXL's 10 GB UNet would need twice its size in RAM."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for tensor in state.values():
            file.write(tensor.contiguous().numpy().tobytes())


def make_sdxl(out: Path) -> None:
    assets = REPO / "assets" / "sdxl-base-1-0"
    # Configs, tokenizers and scheduler as the fixture lays them out; no weights, decoys or exports.
    shutil.copytree(REPO / "tests" / "fixtures" / "tiny-sdxl", out,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.msgpack", "*.onnx", "*.xml",
                                                  "*.onnx_data", "vae_1_0", "vae_decoder", "vae_encoder"))
    for folder in ("unet", "vae", "text_encoder", "text_encoder_2"):
        shutil.copy(assets / folder / "config.json", out / folder / "config.json")
    torch.manual_seed(0)

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    for folder, build, weights in [
        ("unet", lambda c: UNet2DConditionModel.from_config(c), "diffusion_pytorch_model.safetensors"),
        ("vae", lambda c: AutoencoderKL.from_config(c), "diffusion_pytorch_model.safetensors"),
        ("text_encoder", lambda c: CLIPTextModel(CLIPTextConfig(**c)), "model.safetensors"),
        ("text_encoder_2", lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)), "model.safetensors"),
    ]:
        with torch.no_grad():
            model = build(json.loads((out / folder / "config.json").read_text()))
        state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        save_streaming(state, out / folder / weights)
        print(f"{folder}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters", flush=True)
        del model, state
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted([*FAMILIES, "sdxl"]))
    parser.add_argument("out", type=Path)
    parser.add_argument("--vae-from", type=Path, help="sd15, ldm: a full-size SD 2.1-base folder (make_fixtures.py --full)")
    args = parser.parse_args()
    if REPO in args.out.resolve().parents:
        sys.exit(f"writes several GB: choose a directory outside the repository, not {args.out}")
    if args.family == "sdxl":
        if args.out.exists():
            shutil.rmtree(args.out)
        make_sdxl(args.out)
        return
    if args.vae_from is None:
        sys.exit(f"{args.family} needs --vae-from DIR: a full-size SD 2.1-base folder (make_fixtures.py --full)")
    spec = FAMILIES[args.family]
    fixture = REPO / "tests" / "fixtures" / spec["fixture"]
    if args.out.exists():
        shutil.rmtree(args.out)
    # Configs, tokenizer and scheduler files as the fixture has them; no weights, no pickle decoys.
    shutil.copytree(fixture, args.out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    torch.manual_seed(0)

    from diffusers import UNet2DConditionModel
    unet_config_path = args.out / "unet" / "config.json"
    unet_config = {**json.loads(unet_config_path.read_text()), **spec["unet"]}
    unet_config_path.write_text(json.dumps(unet_config, indent=2, sort_keys=True) + "\n")
    unet = UNet2DConditionModel.from_config(unet_config)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
              args.out / "unet" / "diffusion_pytorch_model.safetensors")
    print(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters")
    del unet

    folder, weights, sizes = spec["text"]
    text_config_path = args.out / folder / "config.json"
    text_config = {**json.loads(text_config_path.read_text()), **sizes}
    text_config_path.write_text(json.dumps(text_config, indent=2, sort_keys=True) + "\n")
    if args.family == "ldm":
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
        known = LDMBertConfig().to_dict()
        text = LDMBertModel(LDMBertConfig(**{k: v for k, v in text_config.items() if k in known}))
    else:
        from transformers import CLIPTextConfig, CLIPTextModel
        text = CLIPTextModel(CLIPTextConfig(**text_config))
    state = {k: v.contiguous() for k, v in text.state_dict().items() if v.is_floating_point()}
    save_file(state, args.out / folder / weights)
    print(f"{folder}: {sum(p.numel() for p in text.parameters()) / 1e6:.0f} M parameters")

    vae_src = args.vae_from / "vae"
    vae_dst = args.out / spec["vae"]
    vae_dst.mkdir(exist_ok=True)
    shutil.copy(vae_src / "config.json", vae_dst / "config.json")
    os.link(vae_src / "diffusion_pytorch_model.safetensors", vae_dst / "diffusion_pytorch_model.safetensors")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
