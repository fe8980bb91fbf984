#!/usr/bin/env bash
# The VAE decode whole vs in tiles (diffusers' enable_tiling()), full-size random SD 2.1-base VAE on the
# CPU: seconds and peak RSS, one process per measurement (benches/vae.rs). Usage:
#   scripts/bench_vae.sh [MODEL_DIR] [SIZE:whole|tiled ...]
#   scripts/bench_vae.sh ~/.cache/sdscale/sd21-random 1024:whole 1024:tiled 2048:tiled
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-$HOME/.cache/sdscale/sd21-random}
shift || true
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(1024:whole 1024:tiled 2048:tiled)
bin=$(cargo bench --profile "${PROFILE:-release}" --bench vae --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and "vae" in m["target"]["name"]][-1])')
printf 'stage\tsize\tdecode\tseconds\tpeak_rss_mib\trss_before_mib\testimate_mib\n'
for run in "${runs[@]}"; do
  size=${run%%:*}
  tiled=0; [ "${run#*:}" = tiled ] && tiled=1
  SDSCALE_BENCH_MODEL=$model SDSCALE_BENCH_SIZE=$size SDSCALE_BENCH_TILED=$tiled "$bin"
done
