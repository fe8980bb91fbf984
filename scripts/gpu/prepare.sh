#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored, carried to the GPU machine) on this CPU-only machine:
#   1. a CUDA 13.0 build toolkit from PyPI wheels (shared/gpu/setup-cuda13.sh) in /tmp/cuda13;
#   2. CUTLASS 3.5.0's headers from PyPI's nvidia-cutlass wheel, where candle-flash-attn's build (cudaforge)
#      looks for its GitHub checkout (this machine cannot reach GitHub);
#   3. `cargo build --release --features flash-attn` for H100/H200 (sm_90a), in $CUDA_TARGET_DIR. The
#      FlashAttention-2 kernels (53 files, ~1.4 h on 2 cores, ~7.5 GB RAM) are compiled once per machine
#      into $CANDLE_FLASH_ATTN_BUILD_DIR, outside the repository; later builds reuse them. FLASH_ATTN=0
#      builds `--features cuda` only (~11 min), for which check.sh's FA2 columns then show the cuBLAS path;
#   4. the stripped binary, xz-compressed (the carry limit is 64 MiB), run-binary.sh and the diffusers wheels.
# Then, on the GPU machine: bash scripts/gpu/check.sh   (carry: [".gpu"])
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared/gpu}
TARGET=${CUDA_TARGET_DIR:-/work/target-cuda}
FLASH_ATTN=${FLASH_ATTN:-1}
export CANDLE_FLASH_ATTN_BUILD_DIR=${CANDLE_FLASH_ATTN_BUILD_DIR:-/work/flash-attn-build}
export CUDAFORGE_HOME=${CUDAFORGE_HOME:-/work/cudaforge}
[ -x /tmp/cuda13/bin/nvcc ] || bash "$SHARED/setup-cuda13.sh" /tmp/cuda13

features=cuda
if [ "$FLASH_ATTN" = 1 ]; then
  features=flash-attn
  mkdir -p "$CANDLE_FLASH_ATTN_BUILD_DIR"
  # cudaforge 0.1.6 uses $CUDAFORGE_HOME/git/checkouts/cutlass-<commit[:16]> when it has include/ and its HEAD
  # names the commit candle-flash-attn 0.11.1 pins (v3.5.0); the PyPI wheel carries the same header trees.
  commit=7d49e6c7e2f8896c47f586706e67e1fb215529dc
  cutlass=$CUDAFORGE_HOME/git/checkouts/cutlass-${commit:0:16}
  if [ "$(git -C "$cutlass" rev-parse HEAD 2>/dev/null)" != "$commit" ] || [ ! -d "$cutlass/include/cutlass" ]; then
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps -d "$tmp" nvidia-cutlass==3.5.0.0
    python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$tmp"/nvidia_cutlass-3.5.0.0-*.whl "$tmp/x"
    rm -rf "$cutlass"; mkdir -p "$cutlass/tools/util"
    cp -r "$tmp/x/cutlass_library/source/include" "$cutlass/"
    cp -r "$tmp/x/cutlass_library/source/tools/util/include" "$cutlass/tools/util/"
    git -C "$cutlass" init -q && echo "$commit" > "$cutlass/.git/HEAD"
    rm -rf "$tmp"
  fi
fi

CUDA_HOME=/tmp/cuda13 CUDA_PATH=/tmp/cuda13 CUDA_ROOT=/tmp/cuda13 PATH=/tmp/cuda13/bin:$PATH CUDA_COMPUTE_CAP=90 \
  CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2} CARGO_TARGET_DIR="$TARGET" cargo build --release --features "$features"
mkdir -p .gpu/wheels
strip -o .gpu/sdscale "$TARGET/release/sdscale"
xz -T2 -6 -f .gpu/sdscale
cp "$SHARED/run-binary.sh" .gpu/
pip download -q --no-deps -d .gpu/wheels diffusers==0.42.1 importlib_metadata
du -sh .gpu .gpu/*
size=$(du -sm .gpu | cut -f1)
[ "$size" -lt 62 ] || { echo "prepare.sh: .gpu/ is ${size} MiB, over the device tool's 64 MiB carry limit" >&2; exit 1; }
