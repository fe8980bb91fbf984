#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored, carried to the GPU machine) on this CPU-only machine:
#   1. a CUDA 13.0 build toolkit from PyPI wheels (shared/gpu/setup-cuda13.sh) in /tmp/cuda13,
#   2. `cargo build --release --features cuda` for H100/H200 (sm_90), in /work/target-cuda,
#   3. the stripped CUDA binary, xz-compressed (60 MiB → ~9 MiB: the carry limit is 64 MiB), run-binary.sh
#      and the diffusers wheels.
# Then, on the GPU machine: bash scripts/gpu/check.sh   (carry: [".gpu"])
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared/gpu}
TARGET=${CUDA_TARGET_DIR:-/work/target-cuda}
[ -x /tmp/cuda13/bin/nvcc ] || bash "$SHARED/setup-cuda13.sh" /tmp/cuda13
CUDA_HOME=/tmp/cuda13 CUDA_PATH=/tmp/cuda13 CUDA_ROOT=/tmp/cuda13 PATH=/tmp/cuda13/bin:$PATH CUDA_COMPUTE_CAP=90 \
  CARGO_TARGET_DIR="$TARGET" cargo build --release --features cuda
mkdir -p .gpu/wheels
strip -o .gpu/sdscale "$TARGET/release/sdscale"
xz -T2 -6 -f .gpu/sdscale
cp "$SHARED/run-binary.sh" .gpu/
pip download -q --no-deps -d .gpu/wheels diffusers==0.42.1 importlib_metadata
du -sh .gpu .gpu/*
