"""What the tiny vision tower's patch size costs: notebook 03's side-by-side SFT of both formats (the
demo's settings, fewer steps, one thread each) and the scoring of some validation prompts (four views),
once with a tiny Gemma 3 of each patch size (random weights: the time does not depend on them), in one
run on one machine.

    .venv/bin/python benchmarks/bench_vision_patch.py --run-dir runs/demo --steps 150 --rows 128

Needs a run whose notebook 02 finished. Writes only under a temporary folder. Keep the machine idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from bench_side_by_side import plans  # this folder is on sys.path when a benchmark runs as a script

from magseg_nb import models, side_by_side, training


def time_one(run_dir: Path, out: Path, spec: models.TinySpec, steps: int, rows: int) -> float:
    """Seconds to train both formats side by side and score each as notebook 03 does."""
    runs = plans(run_dir, out, steps, rows, base=models.build_tiny(out / "base", spec))
    t0 = time.perf_counter()
    for name in side_by_side.train_sft(runs, 1):
        training.run_sft(runs[name])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=150, help="MAgSeg's steps (Text4Seg gets as many tokens)")
    p.add_argument("--rows", type=int, default=128, help="validation prompts scored per format")
    p.add_argument("--patch-sizes", type=int, nargs="+", default=[8, 4])
    args = p.parse_args()
    default = models.TinySpec()
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ps in args.patch_sizes:
            spec = dataclasses.replace(default, patch_size=ps)
            seconds[ps] = time_one(args.run_dir, Path(tmp) / f"patch{ps}", spec, args.steps, args.rows)
            print(f"patch {ps}: {seconds[ps]:.1f} s", flush=True)
    first = seconds[args.patch_sizes[0]]
    print(
        f"{args.steps} MAgSeg steps, {args.rows} prompts per format; the default patch size is {default.patch_size}"
    )
    print(
        "| vision patch (pixels of the 64 px image) | patches per image | seconds (train and score both formats) | relative |"
    )
    print("| --- | --- | --- | --- |")
    for ps, secs in seconds.items():
        print(f"| {ps} | {(default.image_size // ps) ** 2} | {secs:.1f} | {secs / first:.2f} |")


if __name__ == "__main__":
    main()
