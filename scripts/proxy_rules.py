"""How much each proxy pretraining rule's cell codes say about the labels, per cell purity
(``validation.proxy_code_accuracy``; docs/experiments.md): each code's commonest label on training cells,
scored on validation cells.

    .venv/bin/python scripts/proxy_rules.py --run-dir runs/demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from magseg_nb import pretraining, validation


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run with notebooks 01 and 02 finished")
    p.add_argument("--train-rows", type=int, default=3000, help="training conversations for the lookup")
    args = p.parse_args(argv)
    run02, run01 = args.run_dir / "02_instruction_format", args.run_dir / "01_dataset_prep"
    tables = {}
    for rule in pretraining.PROXY_RULES:
        train = validation.proxy_code_cells(run02 / "magseg_train.jsonl", run01, rule, args.train_rows)
        val = validation.proxy_code_cells(run02 / "magseg_val.jsonl", run01, rule)
        tables[rule] = validation.proxy_code_accuracy(train, val).set_index("bin")
    table = pd.concat(tables, axis=1)
    print(table.to_string(float_format="{:.3f}".format))
    return table


if __name__ == "__main__":
    main()
