#!/usr/bin/env bash
# Type-checks and lints the CUDA code paths (features `cuda` and `flash-attn`) on a machine without a GPU,
# in minutes: clippy with an nvcc that writes empty kernels (nvcc-typecheck-stub.sh), in a target folder of
# its own. Needs the CUDA 13.0 toolkit from PyPI (shared/gpu/setup-cuda13.sh /tmp/cuda13). Nothing it builds
# can run: the real build is scripts/gpu/prepare.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x /tmp/cuda13/bin/nvcc ] || bash "${SHARED:-../shared/gpu}/setup-cuda13.sh" /tmp/cuda13
export CUDA_HOME=/tmp/cuda13 CUDA_PATH=/tmp/cuda13 CUDA_ROOT=/tmp/cuda13 PATH=/tmp/cuda13/bin:$PATH CUDA_COMPUTE_CAP=90
export NVCC=$PWD/scripts/gpu/nvcc-typecheck-stub.sh REAL_NVCC=/tmp/cuda13/bin/nvcc
export CARGO_TARGET_DIR=${TYPECHECK_TARGET_DIR:-/work/target-cuda-typecheck}
export CANDLE_FLASH_ATTN_BUILD_DIR=$CARGO_TARGET_DIR/flash-attn-stub CUDAFORGE_HOME=$CARGO_TARGET_DIR/cudaforge
mkdir -p "$CANDLE_FLASH_ATTN_BUILD_DIR"
# cudaforge wants CUTLASS's checkout to exist (its headers are never read by the stub).
commit=7d49e6c7e2f8896c47f586706e67e1fb215529dc
cutlass=$CUDAFORGE_HOME/git/checkouts/cutlass-${commit:0:16}
mkdir -p "$cutlass/include/cutlass" && git -C "$cutlass" init -q && echo "$commit" > "$cutlass/.git/HEAD"
for features in cuda flash-attn; do
  echo "== cargo clippy --features $features"
  cargo clippy --features "$features" --lib --bins --tests --benches -- -D warnings
done
