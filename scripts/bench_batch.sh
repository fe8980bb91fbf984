#!/usr/bin/env bash
# Per-image time at batch sizes 1, 2 and 4 (issue 3): the same IMAGES images (one prompt, seeds 1…IMAGES,
# entropy mode) rendered with each --batch-size; "seconds" in gen --json is the batch's wall time (text
# encoder + denoising + VAE, not the PNG write) divided by its size. Each configuration runs REPEATS times
# and the fastest run counts (the machine is shared).
#
#   scripts/bench_batch.sh MODEL WIDTH HEIGHT STEPS IMAGES [REPEATS]
#   scripts/bench_batch.sh tests/fixtures/tiny-sd 192 192 4 8 3
#   scripts/bench_batch.sh ~/.cache/sdscale/sd21-random 224 224 4 4 1
set -euo pipefail
model=$1 width=$2 height=$3 steps=$4 images=$5 repeats=${6:-1}
bin=${SDSCALE:-target/release/sdscale}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "| batch size | s/image | vs batch 1 |"
echo "|---|---|---|"
base=""
for batch in 1 2 4; do
    best=""
    for run in $(seq "$repeats"); do
        per_image=$("$bin" gen --model "$model" --prompt "a corgi on a beach" --width "$width" --height "$height" \
            --steps "$steps" --seed 1 --num-images "$images" --mode entropy --batch-size "$batch" --json \
            --device cpu -o "$out/b$batch-r$run-{index}.png" 2>/dev/null |
            python3 -c 'import json,sys; s=[json.loads(l)["seconds"] for l in sys.stdin]; print(f"{sum(s)/len(s):.3f}")')
        best=$(python3 -c "print(min(x for x in [$per_image, ${best:-1e9}]))")
    done
    base=${base:-$best}
    echo "| $batch | $best | $(python3 -c "print(f'{$base/$best:.2f}x')") |"
done
