#!/usr/bin/env bash
# sdscale vs diffusers on this CPU, measured in the same run, with ratios.
#
#   scripts/bench_cpu.sh                     # the fixture model: whole `gen` + stages at 192²
#   SDSCALE_BENCH_MODEL=~/.cache/sdscale/sd21-random SDSCALE_BENCH_SIZES=224,512 SDSCALE_BENCH_SKIP_GEN=1 scripts/bench_cpu.sh
#   SDSCALE_BENCH_UNET_ONLY=1 SDSCALE_BENCH_MODEL=~/.cache/sdscale/ldm-random SDSCALE_BENCH_SIZES=256,512 \
#     SDSCALE_BENCH_SKIP_GEN=1 scripts/bench_cpu.sh     # any family: the guided UNet step alone
#     (full-size SD 1.5 / LDM-256 / SDXL folders: scripts/make_full_family.py)
#   SDSCALE_BENCH_MODEL=~/.cache/sdscale/sdxl-random SDSCALE_BENCH_GEN_SIZE=1024 SDSCALE_BENCH_GEN_STEPS=1 \
#     SDSCALE_BENCH_GEN_MODES=default SDSCALE_BENCH_SKIP_STAGES=1 scripts/bench_cpu.sh   # one whole gen, peak RSS
# SDSCALE_BENCH_MODES narrows the stages' UNet modes (default,entropy), SDSCALE_BENCH_GEN_MODES the gen's.
#
# Needs the reference Python environment (scripts/requirements.txt) as $PYTHON (default: python3).
# The full-size random model comes from `python scripts/make_fixtures.py --full ~/.cache/sdscale/sd21-random`.
# Whole-run peak RSS comes from /usr/bin/time (max resident set size), the same instrument for both.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODEL=${SDSCALE_BENCH_MODEL:-tests/fixtures/tiny-sd}
SIZES=${SDSCALE_BENCH_SIZES:-192}
RUNS=${SDSCALE_BENCH_RUNS:-3}
GEN_SIZE=${SDSCALE_BENCH_GEN_SIZE:-192}
GEN_STEPS=${SDSCALE_BENCH_GEN_STEPS:-4}
STAGES=${SDSCALE_BENCH_STAGES:-load,tokenizer,text,unet,vae}
UNET_ONLY=()
if [ -n "${SDSCALE_BENCH_UNET_ONLY:-}" ]; then STAGES=unet; UNET_ONLY=(--unet-only); fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

cargo build --release --quiet
cargo bench --bench stages --no-run --quiet 2>/dev/null

echo "# $(date -u +%F) $(uname -m), $(nproc) cores, commit $(git rev-parse --short HEAD), model $MODEL"
if [ -z "${SDSCALE_BENCH_SKIP_GEN:-}" ]; then
echo
echo "## whole gen: ${GEN_SIZE}x${GEN_SIZE}, $GEN_STEPS steps, CFG 7.5, fp32"
printf "%-10s %-8s %10s %12s\n" tool mode seconds peak_RSS_MiB
for mode in ${SDSCALE_BENCH_GEN_MODES:-default entropy}; do
  /usr/bin/time -f "%e %M" -o "$out/s.time" target/release/sdscale gen --model "$MODEL" --prompt "a corgi on a beach" \
    --width "$GEN_SIZE" --height "$GEN_SIZE" --steps "$GEN_STEPS" --seed 42 --mode "$mode" --device cpu -o "$out/s-$mode.png" >/dev/null 2>&1
  read -r s_sec s_kb < "$out/s.time"
  /usr/bin/time -f "%e %M" -o "$out/d.time" "$PYTHON" scripts/bench_diffusers.py --gen --model "$MODEL" --prompt "a corgi on a beach" \
    --width "$GEN_SIZE" --height "$GEN_SIZE" --steps "$GEN_STEPS" --seed 42 --mode "$mode" --out "$out/d-$mode.png" >/dev/null 2>&1
  read -r d_sec d_kb < "$out/d.time"
  printf "%-10s %-8s %10s %12d\n" sdscale "$mode" "$s_sec" $((s_kb / 1024)) diffusers "$mode" "$d_sec" $((d_kb / 1024))
  awk -v a="$s_sec" -v b="$d_sec" -v c="$s_kb" -v d="$d_kb" 'BEGIN { printf "%-10s %-8s %10.2fx %11.2fx\n", "ratio", "", a / b, c / d }'
done
fi
[ -z "${SDSCALE_BENCH_SKIP_STAGES:-}" ] || exit 0
echo
echo "## stages (median of $RUNS after a warm-up), ms"
SDSCALE_BENCH_MODEL="$MODEL" SDSCALE_BENCH_SIZES="$SIZES" SDSCALE_BENCH_RUNS="$RUNS" SDSCALE_BENCH_STAGES="$STAGES" \
  cargo bench --bench stages --quiet 2>/dev/null > "$out/sdscale.tsv"
"$PYTHON" scripts/bench_diffusers.py --model "$MODEL" --sizes "$SIZES" --runs "$RUNS" "${UNET_ONLY[@]}" 2>/dev/null > "$out/diffusers.tsv"
awk -F'\t' 'NR == FNR { d[$1 FS $2 FS $3] = $4; next }
  FNR == 1 { printf "%-16s %-10s %-8s %12s %12s %8s\n", "stage", "size", "mode", "sdscale", "diffusers", "ratio" }
  { key = $1 FS $2 FS $3; if (key in d) printf "%-16s %-10s %-8s %12.1f %12.1f %7.2fx\n", $1, $2, $3, $4, d[key], $4 / d[key] }' \
  "$out/diffusers.tsv" "$out/sdscale.tsv"
