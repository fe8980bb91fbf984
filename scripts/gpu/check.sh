#!/usr/bin/env bash
# The GPU check of issue #14, one command on the GPU machine, from the repository root:
#
#   bash scripts/gpu/check.sh            # about 6–7 minutes on an H100 (the device tool's limit: 10 per call)
#
# Expects, carried in the git-ignored .gpu/ folder (scripts/gpu/prepare.sh makes them on a CPU machine):
#   .gpu/sdscale.xz       the stripped `cargo build --release --features flash-attn` binary, xz-compressed
#   .gpu/run-binary.sh    finds the CUDA 13 libraries on the machine (PyTorch's)
#   .gpu/wheels/*.whl     diffusers 0.42.1 (+ importlib_metadata), installed with --no-deps
# PyTorch and transformers come with the machine. It builds a full-size random-weight SD 2.1-base, then prints
# ONE table (also $OUT/summary.txt):
#   1. per size (224², 512², 512×288, 768², 1024²; f16, 50 DDIM steps, CFG 7.5, one image per call): seconds
#      per image of sdscale with FlashAttention-2 (the flash-attn build's default), sdscale with cuBLAS +
#      softmax attention (SDSCALE_FLASH_ATTN2=0), and diffusers 0.42.1 eager; ratios to diffusers; peak GPU
#      MiB of each (nvidia-smi memory.used sampled every 100 ms while only that process runs, minus the idle
#      baseline: one instrument for both tools); cold = the first image of a fresh process, warm = the next;
#   2. whether the CUDA graph captured with the library kernel (else the loop ran eagerly and said so);
#   3. image agreement after 3 steps at 512² and 1024²: FA2 vs cuBLAS attention vs sdscale's own fused
#      kernel (SDSCALE_FLASH_ATTENTION=1) vs diffusers, mean/max levels;
#   4. the entropy scale's cost with FA2 (warm seconds, entropy vs default) at 512² and 1024², and the warm
#      seconds of sdscale's own fused kernel there (the one FA2 should replace);
#   5. per-op-kind milliseconds of one guided 1024² UNet step, FA2 and cuBLAS attention (SDSCALE_PROFILE=1).
# Dry run on a CPU machine (exercises every step on the fixture model, no GPU figures):
#   DEVICE=cpu DTYPE=f32 MODEL=tests/fixtures/tiny-sd SIZES="64x64 96x64" STEPS=2 BIG=96x96 MID=64x64 \
#     BIN=target/release/sdscale bash scripts/gpu/check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
G=.gpu
PY=${PYTHON:-python3}
WORK=/tmp/sdscale-gpu
RESULTS=${OUT:-$WORK/results}
MODEL=${MODEL:-/tmp/sd21-random}
SIZES=${SIZES:-"224x224 512x512 512x288 768x768 1024x1024"}
MID=${MID:-512x512}
BIG=${BIG:-1024x1024}
STEPS=${STEPS:-50}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-f16}
PROMPT="a corgi on a beach"
mkdir -p "$WORK" "$RESULTS"
exec > >(tee "$RESULTS/check.log") 2>&1
log() { echo "[$(date +%T)] $*"; }

if [ -z "${BIN:-}" ]; then
  BIN=$WORK/sdscale
  xz -dc "$G/sdscale.xz" > "$BIN" && chmod +x "$BIN"
  # run-binary.sh finds the CUDA 13 libraries; ask it once, then run the binary directly.
  bash "$G/run-binary.sh" "$BIN" --version > "$WORK/run-binary.log" 2>&1
  export LD_LIBRARY_PATH=$(sed -n 's/^=== LD_LIBRARY_PATH=\(.*\) ===$/\1/p' "$WORK/run-binary.log")
  $PY -m pip install -q --no-index --no-deps --target "$WORK/pydeps" "$G"/wheels/*.whl 2>&1 | tail -2
  export PYTHONPATH=$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
"$BIN" --version || { tail -30 "$WORK/run-binary.log"; exit 1; }
HAVE_SMI=0; command -v nvidia-smi > /dev/null && HAVE_SMI=1
[ $HAVE_SMI = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
if [ ! -f "$MODEL/unet/diffusion_pytorch_model.safetensors" ]; then
  log "building the full-size random model"
  $PY scripts/make_fixtures.py --full "$MODEL" | tail -3
fi

# Peak GPU MiB above the idle baseline while "$@" runs ("-" without nvidia-smi); stdout to $WORK/last.out.
gpu_peak() {
  local base sampler peak rc
  if [ $HAVE_SMI = 0 ]; then "$@" > "$WORK/last.out" 2> "$WORK/last.err"; rc=$?; echo "-"; return $rc; fi
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$WORK/mem.log" &
  sampler=$!
  "$@" > "$WORK/last.out" 2> "$WORK/last.err"
  rc=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  peak=$(sort -n "$WORK/mem.log" | tail -1)
  echo $(( ${peak:-0} - base ))
  return $rc
}
# sdscale's --json lines: the first image's seconds (cold), the second's (warm).
cold_s() { grep -oE '"seconds":[0-9.]+' "$1" | sed -n 1p | cut -d: -f2; }
warm_s() { grep -oE '"seconds":[0-9.]+' "$1" | sed -n 2p | cut -d: -f2; }
sdscale_gen() { # size, output template, extra args…: two images, one at a time (cold, warm); $ATTN2 picks FA2
  local w=${1%x*} h=${1#*x} out=$2; shift 2
  SDSCALE_FLASH_ATTN2=${ATTN2:-1} "$BIN" gen --model "$MODEL" --prompt "$PROMPT" --width "$w" --height "$h" \
    --steps "$STEPS" --seed 1 --device "$DEVICE" --dtype "$DTYPE" --num-images 2 --overwrite --json -o "$out" "$@"
}
ratio() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", a / b; else printf "-" }'; }

log "1. seconds per image and peak MiB: sdscale (FA2 | cuBLAS attention) vs diffusers eager, $STEPS steps, $DTYPE"
T=$WORK/table.txt
printf "%-10s %8s %8s %8s %8s %8s %8s %8s %8s %8s %9s\n" size fa2_warm gemm_warm dif_warm fa2/dif gemm/dif \
  fa2_cold dif_cold fa2_MiB gemm_MiB dif_MiB > "$T"
for size in $SIZES; do
  w=${size%x*}; h=${size#*x}
  fa2_mib=$(gpu_peak sdscale_gen "$size" "$WORK/fa2-$size-{image}.png")
  cp "$WORK/last.out" "$WORK/fa2-$size.json"; cp "$WORK/last.err" "$WORK/fa2-$size.err"
  gemm_mib=$(ATTN2=0 gpu_peak sdscale_gen "$size" "$WORK/gemm-$size-{image}.png")
  cp "$WORK/last.out" "$WORK/gemm-$size.json"; cp "$WORK/last.err" "$WORK/gemm-$size.err"
  dif_mib=$(gpu_peak $PY scripts/bench_diffusers.py --gen --model "$MODEL" --width "$w" --height "$h" --steps "$STEPS" \
    --seed 1 --device "$DEVICE" --dtype "$DTYPE" --repeat 1 --out "$WORK/diffusers-$size.png")
  dif_cold=$(awk -F'\t' '/^generate_seconds/ {print $2}' "$WORK/last.out")
  dif_warm=$(awk -F'\t' '/^warm_seconds/ {print $2}' "$WORK/last.out")
  fa2_warm=$(warm_s "$WORK/fa2-$size.json"); gemm_warm=$(warm_s "$WORK/gemm-$size.json")
  for tool in fa2 gemm; do [ -n "$(warm_s "$WORK/$tool-$size.json")" ] || { log "sdscale $tool failed at $size:"; tail -3 "$WORK/$tool-$size.err"; }; done
  [ -n "$dif_warm" ] || { log "diffusers failed at $size:"; tail -3 "$WORK/last.err"; }
  printf "%-10s %8s %8s %8s %8s %8s %8s %8s %8s %8s %9s\n" "$size" "${fa2_warm:--}" "${gemm_warm:--}" "${dif_warm:--}" \
    "$(ratio "$fa2_warm" "$dif_warm")" "$(ratio "$gemm_warm" "$dif_warm")" "$(cold_s "$WORK/fa2-$size.json")" \
    "${dif_cold:--}" "$fa2_mib" "$gemm_mib" "$dif_mib" >> "$T"
  tail -1 "$T"
done

log "2. CUDA graph capture with each attention backend (a failed capture runs eagerly and says so)"
G2=$WORK/graphs.txt; : > "$G2"
for tool in fa2 gemm; do
  failed=$(grep -l "CUDA graph capture failed" "$WORK"/$tool-*.err 2>/dev/null | wc -l)
  echo "$tool: graph capture failed in $failed of $(ls "$WORK"/$tool-*.err 2>/dev/null | wc -l) runs" >> "$G2"
  grep -h "CUDA graph capture failed" "$WORK"/$tool-*.err 2>/dev/null | head -1 >> "$G2"
done
cat "$G2"

log "3. agreement after 3 steps: FA2 vs cuBLAS attention vs sdscale's fused kernel vs diffusers"
few() { # size, output, env assignments…
  local size=$1 out=$2; shift 2
  env "$@" "$BIN" gen --model "$MODEL" --prompt "$PROMPT" --width "${size%x*}" --height "${size#*x}" --steps 3 --seed 1 \
    --device "$DEVICE" --dtype "$DTYPE" --overwrite -o "$out" > /dev/null 2> "$WORK/last.err" || tail -3 "$WORK/last.err"
}
for size in $MID $BIG; do
  few "$size" "$WORK/few-fa2-$size.png" SDSCALE_FLASH_ATTN2=1
  few "$size" "$WORK/few-gemm-$size.png" SDSCALE_FLASH_ATTN2=0
  few "$size" "$WORK/few-fused-$size.png" SDSCALE_FLASH_ATTN2=0 SDSCALE_FLASH_ATTENTION=1
  $PY scripts/bench_diffusers.py --gen --model "$MODEL" --width "${size%x*}" --height "${size#*x}" --steps 3 --seed 1 \
    --device "$DEVICE" --dtype "$DTYPE" --out "$WORK/few-diffusers-$size.png" > /dev/null 2> "$WORK/last.err" || tail -3 "$WORK/last.err"
done
$PY - "$WORK" $MID $BIG > "$WORK/agreement.txt" <<'PY'
import sys, os, numpy as np
from PIL import Image
w = sys.argv[1]
load = lambda p: np.asarray(Image.open(p)).astype(int) if os.path.exists(p) else None
for size in sys.argv[2:]:
    im = {k: load(f"{w}/few-{k}-{size}.png") for k in ("fa2", "gemm", "fused", "diffusers")}
    for a, b in (("fa2", "gemm"), ("fa2", "diffusers"), ("gemm", "diffusers"), ("fused", "gemm")):
        if im[a] is None or im[b] is None:
            print(f"{size:<10} {a} vs {b}: image missing"); continue
        d = np.abs(im[a] - im[b])
        ok = all(np.isfinite(x).all() and x.std() > 1 for x in (im[a], im[b]))
        print(f"{size:<10} {a + ' vs ' + b:<18} |d| mean {d.mean():6.3f} max {d.max():3d}  {'' if ok else 'FLAT/NaN image'}")
PY
cat "$WORK/agreement.txt"

log "4. the entropy scale's cost with FA2, and sdscale's own fused kernel (SDSCALE_FLASH_ATTENTION=1), warm seconds"
E=$WORK/entropy.txt
printf "%-10s %10s %10s %8s %10s\n" size fa2_s fa2_entropy cost own_fused > "$E"
for size in $MID $BIG; do
  sdscale_gen "$size" "$WORK/entropy-$size-{image}.png" --mode entropy > "$WORK/last.out" 2> "$WORK/last.err" || tail -3 "$WORK/last.err"
  d=$(warm_s "$WORK/fa2-$size.json"); e=$(warm_s "$WORK/last.out")
  SDSCALE_FLASH_ATTENTION=1 ATTN2=0 sdscale_gen "$size" "$WORK/fused-$size-{image}.png" > "$WORK/last.out" 2> "$WORK/last.err" \
    || tail -3 "$WORK/last.err"
  printf "%-10s %10s %10s %8s %10s\n" "$size" "${d:--}" "${e:--}" \
    "$(awk -v a="$e" -v b="$d" 'BEGIN { if (a > 0 && b > 0) printf "%+.1f%%", 100 * (a / b - 1); else printf "-" }')" \
    "$(warm_s "$WORK/last.out")" >> "$E"
done
cat "$E"

log "5. one guided UNet step at $BIG, per op kind (CUDA events), FA2 and cuBLAS attention"
P=$WORK/profile.txt; : > "$P"
for variant in fa2:1 gemm:0; do
  SDSCALE_FLASH_ATTN2=${variant#*:} SDSCALE_PROFILE=1 "$BIN" gen --model "$MODEL" --prompt "$PROMPT" --width "${BIG%x*}" \
    --height "${BIG#*x}" --steps 2 --seed 1 --device "$DEVICE" --dtype "$DTYPE" --overwrite -o "$WORK/profile.png" \
    2> "$WORK/profile-${variant%:*}.log" > /dev/null
  echo "${variant%:*}: $(grep -m1 "profile backends" "$WORK/profile-${variant%:*}.log" | sed 's/^sdscale: profile //')" >> "$P"
  # The last step's block (the first is the warm-up).
  grep "profile unet-ops" "$WORK/profile-${variant%:*}.log" | sed 's/^sdscale: profile unet-ops /  /' \
    | awk '{ block = block $0 "\n" } / total / { last = block; block = "" } END { printf "%s", last }' >> "$P"
done
cat "$P"

{
  echo "# scripts/gpu/check.sh, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo ?), $DEVICE $DTYPE, $STEPS steps"
  [ $HAVE_SMI = 1 ] && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  echo; echo "## 1. seconds per image (warm = 2nd image of a process, cold = 1st), peak MiB above idle"; cat "$T"
  echo; echo "## 2. CUDA graphs"; cat "$G2"
  echo; echo "## 3. agreement after 3 steps (levels of 255)"; cat "$WORK/agreement.txt"
  echo; echo "## 4. entropy scale's cost (FA2) and sdscale's own fused kernel"; cat "$E"
  echo; echo "## 5. one guided UNet step at $BIG, per op kind"; cat "$P"
} > "$RESULTS/summary.txt"
echo; cat "$RESULTS/summary.txt"
cp "$WORK/few-fa2-$MID.png" "$WORK/few-diffusers-$MID.png" "$RESULTS/" 2>/dev/null
exit 0
