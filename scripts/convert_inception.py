#!/usr/bin/env python3
"""Convert pytorch-fid's Inception-v3 weights (a torch pickle) to safetensors for `sdscale eval`.

    python scripts/convert_inception.py pt_inception-2015-12-05-6726825d.pth inception-2015-12-05.safetensors

The input is the file pytorch-fid downloads on first use (FID_WEIGHTS_URL in pytorch_fid/inception.py,
the TensorFlow 2015-12-05 Inception ported to PyTorch; pytorch-fid caches it under
~/.cache/torch/hub/checkpoints/). Every floating-point tensor is written as it is: same names
(`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch_pool.bn.running_var`, ..., `fc.weight`), same shapes,
float32. BatchNorm's integer `num_batches_tracked` counters (training bookkeeping, absent from some
copies of the file) are left out. Needs only torch and safetensors; the pickle is loaded with
`weights_only=True`, so it cannot run code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def convert(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors sdscale reads: every floating-point entry, as float32 and contiguous."""
    return {
        name: tensor.detach().to(torch.float32).contiguous()
        for name, tensor in state_dict.items()
        if tensor.is_floating_point()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pth", type=Path, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("out", type=Path, help="the .safetensors file to write (refused if it exists)")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; remove it or choose another name")
    state = torch.load(args.pth, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        sys.exit(f"{args.pth}: not pytorch-fid's Inception state dict (no Mixed_7c.branch_pool.conv.weight)")
    tensors = convert(state)
    # Written next to the target, then renamed: an interrupted run leaves no half-written file.
    partial = args.out.with_name(f".{args.out.name}.partial")
    save_file(tensors, str(partial), metadata={"source": args.pth.name, "format": "pytorch-fid InceptionV3"})
    partial.replace(args.out)
    params = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.out}: {len(tensors)} tensors, {params / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
