"""The seed spread of the demo's SFT: the same run with other seeds, scored like notebook 03.

``python -m magseg_nb.seed_spread --run-dir runs/demo --seeds 1 2`` retrains the MAgSeg adapter of a
finished ``03_sft`` stage with each seed (LoRA initialisation and data order; everything else as the
stage ran it), scores it on the same validation cells with block intervals, and writes
``<run_dir>/seed_spread/seed_spread.csv`` with the stage's own seed as the first row. The range over
seeds is the noise floor that "within noise" refers to.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from magseg_nb import files, layout, training, validation
from magseg_nb.chain import read_state, resolve_run_dir

FOLDER = "seed_spread"


def stage_seed(run_dir) -> int | None:
    """The SFT seed notebook 03 trained with (None before it has finished)."""
    return ((read_state(Path(run_dir) / "03_sft") or {}).get("params") or {}).get("seed")


def seed_answers(run_dir, seed: int, fmt: str = "magseg") -> Path:
    """Where the validation answers of ``seed``'s adapter are: notebook 03's for the stage's own seed, the
    spread's folder for the others (whether or not it has been trained yet)."""
    run_dir = Path(run_dir)
    base = run_dir / "03_sft" if seed == stage_seed(run_dir) else run_dir / FOLDER / f"seed_{seed}"
    return base / fmt / layout.ANSWERS


def seed_scores(run01, run02, answers_jsonl, fmt: str, n_boot: int, seed: int) -> pd.DataFrame:
    frames = validation.answer_frames(Path(run02) / f"{fmt}_val.jsonl", answers_jsonl, run01)
    return validation.score_frames({validation.MODEL: frames[validation.MODEL]}, n_boot, seed=seed)


def run_seeds(run_dir, seeds: Sequence[int], fmt: str = "magseg", n_boot: int = 1000) -> pd.DataFrame:
    """Retrain ``fmt`` with each of ``seeds`` and return (and write) the per-seed validation scores."""
    run_dir = resolve_run_dir(run_dir)
    sft = read_state(run_dir / "03_sft")
    if sft is None:
        raise FileNotFoundError(f"{run_dir / '03_sft'} has not finished: run the chain to 03 first")
    params = sft["params"]
    run01, run02 = run_dir / "01_dataset_prep", run_dir / "02_instruction_format"
    out = run_dir / FOLDER
    parts = [
        seed_scores(
            run01, run02, seed_answers(run_dir, params["seed"], fmt), fmt, n_boot, params["seed"]
        ).assign(seed=params["seed"], steps=sft["summary"].get(f"{fmt}_steps"))
    ]
    for seed in seeds:
        if seed == params["seed"]:
            continue
        # the steps the stage trained this format for (Text4Seg's came from MAgSeg's tokens)
        steps = sft["summary"].get(f"{fmt}_steps_planned") or params["max_steps"]
        s = training.sft_settings(
            {**params, "seed": seed, "max_steps": steps},
            fmt,
            sft["summary"]["base_model"],
            run02,
            seed_answers(run_dir, seed, fmt).parent,
        )
        print(f"seed {seed}: training {fmt} for {s.max_steps} steps", flush=True)
        result = training.run_sft(s)
        parts.append(
            seed_scores(run01, run02, seed_answers(run_dir, seed, fmt), fmt, n_boot, seed).assign(
                seed=seed, steps=result.get("steps")
            )
        )
    table = pd.concat(parts, ignore_index=True)
    files.write_text(out / "seed_spread.csv", table.to_csv(index=False))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m magseg_nb.seed_spread", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--format", default="magseg")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args(argv)
    table = run_seeds(args.run_dir, args.seeds, args.format, args.n_boot)
    print(table.pivot_table(index="seed", columns="metric", values="value").round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
