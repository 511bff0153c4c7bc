"""What LoRA dropout costs on the CPU: notebook 03's side-by-side SFT of both formats (the demo's
settings, fewer steps, one thread each) and the scoring of some validation prompts (four views), once
per ``lora_dropout``, on the shipped tiny base, in one run on one machine.

Dropout draws a random mask for every LoRA input on every step; on one thread at the tiny model's width
that draw costs more than the layers' matrix products (profiled in benchmarks/README.md).

    .venv/bin/python benchmarks/bench_lora_dropout.py --run-dir runs/demo --steps 150 --rows 128

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

from magseg_nb import training


def time_one(run_dir: Path, out: Path, dropout: float, steps: int, rows: int) -> tuple[float, dict]:
    """Seconds to train both formats side by side and score each as notebook 03 does, and the training
    seconds each format's run recorded."""
    runs = {
        name: dataclasses.replace(s, lora_dropout=dropout)
        for name, s in plans(run_dir, out, steps, rows).items()
    }
    return time_one_thread_each(runs)


def main() -> None:
    p = sft_bench_parser(__doc__, 150, 128)
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.05, 0.0])
    args = p.parse_args()
    default = training.SFTSettings().lora_dropout
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.dropouts:
            rows[d] = time_one(args.run_dir, Path(tmp) / f"dropout{d}", d, args.steps, args.rows)
            print(f"lora_dropout {d}: {rows[d][0]:.1f} s (training {rows[d][1]})", flush=True)
    first = rows[args.dropouts[0]][0]
    print(f"{args.steps} MAgSeg steps, {args.rows} prompts per format; the default lora_dropout is {default}")
    print(
        "| lora_dropout | seconds (train and score both formats) | relative | training seconds (magseg / text4seg) |"
    )
    print("| --- | --- | --- | --- |")
    for d, (secs, train) in rows.items():
        tr = " / ".join(f"{train[k]:.1f}" for k in sorted(train))
        print(f"| {d} | {secs:.1f} | {secs / first:.2f} | {tr} |")


if __name__ == "__main__":
    main()
