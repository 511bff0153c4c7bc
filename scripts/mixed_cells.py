"""Where the model's validation errors are: error rates per true class and cell purity, beside the
pixel classifier's on the same cells (``validation.errors_by_purity``; docs/experiments.md).

    .venv/bin/python scripts/mixed_cells.py --run-dir runs/demo --answers runs/demo/03_sft/magseg

``--confusion field water`` prints instead, per spatial block, the field cells each scorer labelled
water (``validation.confusions_by_block``): whether a class's errors are spread or sit in a few blocks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from magseg_nb import layout, validation


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run with notebooks 01 and 02 finished")
    p.add_argument(
        "--answers", type=Path, required=True, help="a folder with MAgSeg validation answers.jsonl"
    )
    p.add_argument(
        "--confusion", nargs=2, metavar=("TRUE", "PRED"), help="per block: cells of class TRUE labelled PRED"
    )
    args = p.parse_args(argv)
    inputs = (
        args.run_dir / "02_instruction_format" / "magseg_val.jsonl",
        args.answers / layout.ANSWERS,
        args.run_dir / "01_dataset_prep",
    )
    if args.confusion:
        table = validation.confusions_by_block(validation.answer_frames(*inputs), *args.confusion)
        print(table.to_string(index=False))
        return table
    table = validation.errors_by_purity(*inputs)
    print(table.to_string(index=False, float_format="{:.2f}".format))
    return table


if __name__ == "__main__":
    main()
