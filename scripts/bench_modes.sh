#!/usr/bin/env bash
# The paper's Table 2 columns from the tool itself: seconds and peak memory per image for each mode at
# 224² and 768², on the full-size random-weight SD 2.1-base (the same compute as the real weights).
#
#   python scripts/make_fixtures.py --full ~/.cache/sdscale/sd21-random     # once, ~5 GB
#   SDSCALE_BENCH_STEPS=2 scripts/bench_modes.sh [--device cuda]
#
# Seconds are sdscale's own per-image figure (`gen --json`: text encoding to decoded pixels, weights
# already loaded), for SDSCALE_BENCH_STEPS steps. Memory: on CUDA the process's peak device MiB
# (`peak_device_mib`), on the CPU the whole process's peak RSS (/usr/bin/time), weights included.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${SDSCALE_BENCH_MODEL:-$HOME/.cache/sdscale/sd21-random}
STEPS=${SDSCALE_BENCH_STEPS:-2}
SIZES=${SDSCALE_BENCH_SIZES:-224 768}
BIN=${SDSCALE_BIN:-target/release/sdscale}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
[ -x "$BIN" ] || cargo build --release --quiet

echo "# $(date -u +%F) $(uname -m), $(nproc) cores, commit $(git rev-parse --short HEAD), $STEPS steps, CFG 7.5, $* ${MODEL##*/}"
echo
echo "| size | mode | UNet windows | seconds / image | peak device MiB | peak RSS MiB |"
echo "|---|---|---|---|---|---|"
for size in $SIZES; do
  for mode in default entropy resize multidiffusion multidiffusion:original; do
    extra=()
    name=$mode
    if [ "$mode" = multidiffusion:original ]; then
      mode=multidiffusion; extra=(--md-views original)
      [ "$size" -lt 512 ] || continue  # the rules differ only below 64 latents a side
    fi
    /usr/bin/time -f "%M" -o "$out/rss" "$BIN" gen --model "$MODEL" --prompt "a corgi on a beach" \
      --width "$size" --height "$size" --steps "$STEPS" --seed 42 --mode "$mode" "${extra[@]}" "$@" \
      --json -o "$out/$name-$size.png" > "$out/record" 2> "$out/log"
    seconds=$(sed -n 's/.*"seconds":\([0-9.]*\).*/\1/p' "$out/record")
    device=$(sed -n 's/.*"peak_device_mib":\([0-9.a-z]*\).*/\1/p' "$out/record")
    views=$(python3 - "$size" "${extra[*]}" "$mode" <<'PY'
import sys
size, extra, mode = int(sys.argv[1]) // 8, sys.argv[2], sys.argv[3]
if mode != "multidiffusion":
    print(1)
elif "original" in extra:
    n = (size - 64) // 8 + 1
    print(n * n)
else:
    n = (size - 64) // 8 + 1 if size > 64 else 1
    print(n * n)
PY
)
    printf "| %s² | %s | %s | %s | %s | %d |\n" "$size" "$name" "$views" "$seconds" "$device" $(( $(cat "$out/rss") / 1024 ))
  done
done
