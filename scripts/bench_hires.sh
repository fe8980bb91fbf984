#!/usr/bin/env bash
# Issue #21: one guided UNet step at 1024² on the full-size SD 2.1-base architecture for default, entropy,
# hidiffusion and deepshrink, sdscale beside diffusers (+ hidiffusion 0.1.10 / kohya_hires_fix.py) in the
# same run. Both time the first call of a 50-step DDIM run (t = 981): HiDiffusion's RAU-Net and windows act,
# Deep Shrink (600 < t) shrinks.
#
#   python scripts/make_fixtures.py --full ~/.cache/sdscale/sd21-random     # once, ~5 GB
#   PYTHON=~/.venvs/sdscale-ref/bin/python scripts/bench_hires.sh
#
# sdscale: tests/full_size.rs `full_size_hires_step_at_1024` (the UNet built in memory with random weights);
# diffusers: scripts/bench_diffusers.py --hires-step on the same architecture's random-weight folder.
# Needs scripts/vendor/kohya_hires_fix.py (see scripts/fixture_hires.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODEL=${SDSCALE_BENCH_MODEL:-$HOME/.cache/sdscale/sd21-random}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

cargo test --release --test integration --no-run --quiet 2>/dev/null
echo "# $(date -u +%F) $(uname -m), $(nproc) cores, commit $(git rev-parse --short HEAD), 1024², CFG (batch 2), f32"
cargo test --release --quiet --test integration -- --ignored --nocapture full_size_hires 2>&1 \
  | sed -n 's/^1024² guided UNet step, \([a-z]*\): \([0-9.]*\) s$/\1\t\2/p' > "$out/sdscale.tsv"
"$PYTHON" scripts/bench_diffusers.py --model "$MODEL" --hires-step --sizes 1024 2>/dev/null \
  | awk -F'\t' '{ printf "%s\t%.1f\n", $3, $4 / 1000 }' > "$out/diffusers.tsv"
echo
echo "| mode | sdscale s | diffusers s | ratio | sdscale vs its default | diffusers vs its default |"
echo "|---|---|---|---|---|---|"
awk -F'\t' 'NR == FNR { d[$1] = $2; next }
  { s[$1] = $2; order[++n] = $1 }
  END { for (i = 1; i <= n; i++) { m = order[i];
    printf "| %s | %.1f | %.1f | %.2f× | %.2f× | %.2f× |\n", m, s[m], d[m], s[m] / d[m], s[m] / s["default"], d[m] / d["default"] } }' \
  "$out/diffusers.tsv" "$out/sdscale.tsv"
