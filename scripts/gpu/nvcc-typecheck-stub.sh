#!/usr/bin/env bash
# An `nvcc` for type-checking the CUDA features only (scripts/gpu/typecheck.sh): every compilation writes an
# empty object, PTX file or library instead of compiling, so `cargo clippy --features flash-attn` runs in
# minutes rather than FlashAttention-2's 1.4 hours of kernels. Queries (--version, …) go to the real nvcc.
# What it makes must never be linked or shipped: typecheck.sh keeps it in a target folder of its own.
set -euo pipefail
real=${REAL_NVCC:-/tmp/cuda13/bin/nvcc}
out="" dir="" source="" lib=0 compile=0 prev=""
for arg in "$@"; do
  case "$prev" in -o) out=$arg ;; --output-directory | -odir) dir=$arg ;; esac
  case "$arg" in --lib) lib=1 ;; -c | --ptx | -ptx) compile=1 ;; *.cu) source=$arg ;; esac
  prev=$arg
done
if [ $lib = 1 ] && [ -n "$out" ]; then rm -f "$out"; ar rc "$out"; exit 0; fi
if [ $compile = 1 ]; then
  [ -n "$out" ] || out=${dir:-.}/$(basename "${source%.cu}").ptx
  : > "$out"
  exit 0
fi
exec "$real" "$@"
