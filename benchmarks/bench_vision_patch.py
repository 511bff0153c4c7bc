"""What the tiny vision tower's patch size costs: notebook 03's side-by-side SFT of both formats (the
demo's settings, fewer steps, one thread each) and the scoring of some validation prompts (four views),
once with a tiny Gemma 3 of each patch size (random weights: the time does not depend on them), in one
run on one machine.

    .venv/bin/python benchmarks/bench_vision_patch.py --run-dir runs/demo --steps 150 --rows 128

Needs a run whose notebook 02 finished. Writes only under a temporary folder. Keep the machine idle.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from bench_side_by_side import (  # this folder is on sys.path when a benchmark runs as a script
    plans,
    sft_bench_parser,
    time_one_thread_each,
)

from magseg_nb import models


def time_one(run_dir: Path, out: Path, spec: models.TinySpec, steps: int, rows: int) -> float:
    """Seconds to train both formats side by side and score each as notebook 03 does."""
    runs = plans(run_dir, out, steps, rows, base=models.build_tiny(out / "base", spec))
    return time_one_thread_each(runs)[0]


def main() -> None:
    p = sft_bench_parser(__doc__, 150, 128)
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
