"""Load to first step: seconds from the start of loading a model to the end of the first denoising step
(weights ready, prompt tokenised and encoded, one guided UNet step), sdscale beside diffusers, same run.

    python scripts/bench_first_step.py --model ~/.cache/sdscale/sd21-random --size 224 --runs 3

sdscale: from spawning `sdscale gen` (its whole process) to its "step 1/2" line on stderr (printed when the
step ends). diffusers: from before `from_pretrained` (torch and diffusers already imported) to its first
`callback_on_step_end` (bench_diffusers.py --gen). Both warm: the files are in the page cache (one
untimed run of each first). Medians of --runs.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sdscale_once(binary: Path, model: str, size: int, out: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen([str(binary), "gen", "--model", model, "--prompt", "a corgi on a beach", "--width", str(size),
                             "--height", str(size), "--steps", "2", "--seed", "1", "--device", "cpu", "--overwrite",
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    for line in proc.stderr:
        if first is None and ": step 1/" in line:
            first = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        sys.exit(f"sdscale failed (exit {proc.returncode})")
    return first


def diffusers_once(model: str, size: int, out: Path) -> float:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_diffusers.py"), "--gen", "--model", model,
                             "--width", str(size), "--height", str(size), "--steps", "2", "--seed", "1", "--out",
                             str(out)], capture_output=True, text=True, check=True)
    for line in result.stdout.splitlines():
        if line.startswith("load_to_first_step_seconds\t"):
            return float(line.split("\t")[1])
    sys.exit("diffusers printed no load_to_first_step_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "sdscale")
    args = parser.parse_args()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"first-step-{os.getpid()}.png"
    model = str(Path(args.model).expanduser())
    sdscale_once(args.binary, model, args.size, out)  # warm the page cache
    diffusers_once(model, args.size, out)
    s = statistics.median(sdscale_once(args.binary, model, args.size, out) for _ in range(args.runs))
    d = statistics.median(diffusers_once(model, args.size, out) for _ in range(args.runs))
    out.unlink(missing_ok=True)
    print("stage\tsize\tsdscale_s\tdiffusers_s\tratio")
    print(f"load_to_first_step\t{args.size}x{args.size}\t{s:.2f}\t{d:.2f}\t{s / d:.2f}x")


if __name__ == "__main__":
    main()
