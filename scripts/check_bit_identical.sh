#!/usr/bin/env bash
# Behaviour-preserving refactors: renders the same images with the binary of a base commit and with the
# working tree's, on the committed fixture model, and requires every PNG's pixels to be identical
# (CPU, f32). Covers gen's reference cases (both modes, odd sizes, long prompts, guidance 1), resize,
# batches, MultiDiffusion (batched windows, the original rule) and compare. The base must know every mode used.
#
#   scripts/check_bit_identical.sh [BASE_COMMIT]      (default: HEAD~1)
#
# The base is built in a temporary worktree sharing this repository's target folder (dependencies are
# not rebuilt; debug builds, whose dependencies are optimised as in release).
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-HEAD~1}
repo=$(pwd)
work=$(mktemp -d)
trap 'git worktree remove --force "$work/base" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach -q "$work/base" "$base"
(cd "$work/base" && CARGO_TARGET_DIR="$repo/target" cargo build -q)
cp "$repo/target/debug/sdscale" "$work/sdscale-base"
cargo build -q
model="$repo/tests/fixtures/tiny-sd"

render() { # binary, output folder
    local bin=$1 out=$2
    mkdir -p "$out"
    python3 - "$bin" "$out" "$model" "$repo/tests/fixtures/reference/images.json" <<'PY'
import json, subprocess, sys
bin, out, model, cases = sys.argv[1:]
for case in json.load(open(cases)):
    args = [bin, "gen", "--model", model, "--prompt", case["prompt"], "-o", f"{out}/{case['file']}"]
    if case.get("negative_prompt"):
        args += ["--negative-prompt", case["negative_prompt"]]
    for key in ["width", "height", "steps", "guidance", "seed", "mode"]:
        args += [f"--{key}", str(case[key])]
    subprocess.run(args, check=True, capture_output=True)
common = ["--model", model, "--steps", "3", "--seed", "5"]
subprocess.run([bin, "gen", *common, "--prompt", "a red boat", "--width", "192", "--height", "128", "--mode", "resize",
                "-o", f"{out}/resize.png"], check=True, capture_output=True)
subprocess.run([bin, "gen", *common, "--prompt", "a red boat", "--num-images", "3", "--batch-size", "2",
                "--width", "96", "--height", "160", "--mode", "entropy", "-o", f"{out}/batch-{{index}}.png"],
               check=True, capture_output=True)
# --train-size 512x512: diffusers' 64-latent windows on the 128-px fixture (the window is the training size).
for name, extra in [("md-576x512", ["--width", "512", "--height", "576", "--view-batch", "2"]),
                    ("md-original-224", ["--width", "224", "--height", "224", "--md-views", "original"])]:
    subprocess.run([bin, "gen", *common, "--prompt", "a red boat", "--mode", "multidiffusion", *extra,
                    "--train-size", "512x512",
                    "-o", f"{out}/{name}.png"], check=True, capture_output=True)
subprocess.run([bin, "compare", "--model", model, "--steps", "3", "--seeds", "5,6", "--prompt", "a red boat",
                "--width", "160", "--height", "160",
                "-o", f"{out}/compare.png"], check=True, capture_output=True)
PY
}
render "$work/sdscale-base" "$work/before"
render "$repo/target/debug/sdscale" "$work/after"
python3 - "$work/before" "$work/after" <<'PY'
import pathlib, sys, zlib
before, after = map(pathlib.Path, sys.argv[1:])

def pixels(path):
    # IDAT payload, decompressed: the pixels, independent of text chunks (the version string).
    data, pos, idat = path.read_bytes(), 8, b""
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return zlib.decompress(idat)

names = sorted(p.name for p in before.glob("*.png"))
assert names == sorted(p.name for p in after.glob("*.png")), "different sets of files"
different = [n for n in names if pixels(before / n) != pixels(after / n)]
print(f"{len(names) - len(different)} of {len(names)} images bit-identical")
if different:
    print("different:", *different)
    sys.exit(1)
PY
