#!/usr/bin/env bash
# Issue 20's numbers, sdscale beside diffusers 0.42.1 in the same run, on the full-size random SD 2.1-base:
#  1. each sampler's own cost per UNet call (scale_model_input + step, no UNet) at 256², and
#  2. whole `gen` seconds at 256²: DDIM 50 steps, DPM++ 2M Karras 20 steps, Euler a 25 steps.
#
#   python scripts/make_fixtures.py --full ~/.cache/sdscale/sd21-random     # once, ~5 GB
#   PYTHON=~/.venvs/sdscale-ref/bin/python scripts/bench_samplers.sh
#
# `gen` seconds: sdscale's own per-image figure (`gen --json`, weights loaded, text encoding to decoded
# pixels) and diffusers' `generate_seconds` (the same span, scripts/bench_diffusers.py --gen).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${SDSCALE_BENCH_MODEL:-$HOME/.cache/sdscale/sd21-random}
PYTHON=${PYTHON:-python3}
SIZE=${SDSCALE_BENCH_SIZE:-256}
BIN=${SDSCALE_BIN:-target/release/sdscale}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
[ -x "$BIN" ] || cargo build --release --quiet

echo "# $(date -u +%F) $(uname -m), $(nproc) cores, commit $(git rev-parse --short HEAD), ${MODEL##*/}, ${SIZE}²"
echo
echo "## Sampler cost per UNet call, ms (20 steps, no UNet)"
echo
SDSCALE_BENCH_MODEL=$MODEL SDSCALE_BENCH_SIZES=$SIZE cargo bench --quiet --bench samplers > "$out/ours.tsv"
"$PYTHON" scripts/bench_diffusers.py --model "$MODEL" --sampler-steps --sizes "$SIZE" --steps 20 --runs 5 > "$out/theirs.tsv"
echo "| sampler | sdscale | diffusers |"
echo "|---|---|---|"
join -t $'\t' -1 3 -2 3 <(sort -t $'\t' -k3,3 "$out/ours.tsv") <(sort -t $'\t' -k3,3 "$out/theirs.tsv") \
  | awk -F'\t' '{ printf "| %s | %s | %s |\n", $1, $4, $8 }'
echo
echo "## Whole gen at ${SIZE}², CFG 7.5, seconds (weights loaded)"
echo
echo "| sampler | steps | UNet calls | sdscale | diffusers | ratio |"
echo "|---|---|---|---|---|---|"
for run in "ddim::50" "dpmpp_2m:karras:20" "euler_ancestral::25"; do
  IFS=: read -r sampler schedule steps <<< "$run"
  ours=(--sampler "$sampler"); theirs=(--sampler "$sampler")
  if [ -n "$schedule" ]; then ours+=(--schedule "$schedule"); theirs+=(--schedule "$schedule"); fi
  "$BIN" gen --model "$MODEL" --prompt "a corgi on a beach" --width "$SIZE" --height "$SIZE" --steps "$steps" \
    --seed 42 "${ours[@]}" --json -o "$out/$sampler.png" > "$out/record" 2> "$out/log"
  seconds=$(sed -n 's/.*"seconds":\([0-9.]*\).*/\1/p' "$out/record")
  "$PYTHON" scripts/bench_diffusers.py --model "$MODEL" --gen --width "$SIZE" --height "$SIZE" --steps "$steps" \
    --seed 42 "${theirs[@]}" --out "$out/d-$sampler.png" > "$out/theirs" 2> /dev/null
  diffusers=$(sed -n 's/^generate_seconds\t//p' "$out/theirs")
  printf "| %s%s | %s | %s | %.1f | %.1f | %.2f |\n" "$sampler" "${schedule:+ $schedule}" "$steps" "$steps" \
    "$seconds" "$diffusers" "$(echo "$seconds / $diffusers" | bc -l)"
done
