"""What batches of one tile's patches buy in SFT step time (``SFTSettings.tile_group``): the demo's MAgSeg
SFT for a few steps with rows drawn at random (``tile_group=1``) and in runs of ``--group`` patches of one
tile (each tile image encoded once per batch), interleaved and repeated, one process, scoring off.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tile_group.py --run-dir runs/demo --steps 60

Needs a run whose notebook 02 finished. Writes only to a temporary folder. Keep the machine idle. The
accuracy of the two orders is not measured here (docs/experiments.md, twenty-second session).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from magseg_nb import models, training


def train_seconds(run_dir: Path, group: int, steps: int, out: Path) -> float:
    """The trainer's own ``train_runtime`` for ``steps`` MAgSeg SFT steps with ``tile_group=group``."""
    base = models.resolve_model("tiny-gemma3-proxy", run_dir / "models")
    params = {"max_steps": steps, "eval_max_examples": 0, "tile_group": group, "save_steps": steps}
    s = training.sft_settings(params, "magseg", base, run_dir / "02_instruction_format", out)
    training.run_sft(s)
    return float(pd.read_csv(out / "log.csv")["train_runtime"].dropna().iloc[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--group", type=int, default=4, help="patches of one tile per run (the demo's batch: 8)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    times: dict[int, list[float]] = {1: [], args.group: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for group in times:
                times[group].append(
                    train_seconds(args.run_dir, group, args.steps, Path(tmp) / f"g{group}_{r}")
                )
    plain, grouped = min(times[1]), min(times[args.group])
    print(f"MAgSeg SFT, {args.steps} steps of batch 8, best of {args.repeats} (all: {times})")
    print("| rows of a batch | seconds | relative |")
    print("| --- | --- | --- |")
    print(f"| at random (tile_group=1) | {plain:.1f} | 1.00 |")
    print(
        f"| runs of {args.group} patches of one tile (tile_group={args.group}) | {grouped:.1f} | {grouped / plain:.2f} |"
    )


if __name__ == "__main__":
    main()
