"""Answers written on a finer grid, pooled to another run's cells and scored there (docs/experiments.md,
the finer-grid experiment): each coarse cell takes the majority of the fine cells inside it (ties to the
lower class id, as ``prompts.downsample_mask``), then the usual paired scoring against a reference.

    .venv/bin/python scripts/pool_answers.py --fine runs/exp/g8-s1200 --run-dir runs/demo \
        --out runs/exp/g8-pooled --against runs/exp/s1200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from magseg_nb import files, layout, prompts, rewards, textgrid, validation


def pooled_answers(fine_jsonl: Path, val_jsonl: Path, fine_grid: int) -> list[dict]:
    """One answers.jsonl row per row of ``val_jsonl``: its fine answer pooled to the row's grid."""
    fine = validation.read_answers(fine_jsonl)
    out = []
    for row in prompts.read_jsonl(val_jsonl):
        ans = fine.get(str(row["id"]))
        if ans is None:
            raise SystemExit(
                f"{fine_jsonl} has no answer for {row['id']}: the two runs must share their tiles"
            )
        gt = np.asarray(row["gt_mask"])
        pooled = prompts.downsample_mask(
            textgrid.decode(ans["answer"], shape=(fine_grid, fine_grid)).mask, gt.shape[0]
        )
        out.append(
            {"id": row["id"], "answer": textgrid.encode(pooled, "plain"), "valid": ans["valid"],
             "repairs": ans["repairs"], "mean_dice": rewards.mean_dice(gt, pooled)}
        )  # fmt: skip
    return out


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fine", type=Path, required=True, help="a folder with the fine answers.jsonl")
    p.add_argument("--fine-grid", type=int, default=8, help="cells per patch side of the fine answers")
    p.add_argument("--run-dir", type=Path, required=True, help="the run whose cells are scored")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--against", type=Path, required=True, help="a folder with answers.jsonl on those cells")
    args = p.parse_args(argv)
    val = args.run_dir / "02_instruction_format" / "magseg_val.jsonl"
    run01 = args.run_dir / "01_dataset_prep"
    files.write_jsonl(
        args.out / layout.ANSWERS, pooled_answers(args.fine / layout.ANSWERS, val, args.fine_grid)
    )
    frames = validation.answer_frames(val, args.out / layout.ANSWERS, run01)
    print(validation.wide(validation.score_frames(frames).query("answers == 'all'")).to_string())
    ref = validation.answer_frames(val, args.against / layout.ANSWERS, run01)
    lines = validation.model_changes(ref, frames, "pooled", str(args.against))
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
