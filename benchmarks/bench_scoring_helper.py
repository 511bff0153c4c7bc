"""What the scoring helper buys: a trained MAgSeg adapter scored on a run's validation rows as notebook 03's
side-by-side process scores it, once alone in this process with one thread, then with the second half of the
rows handed to a one-thread helper process (``training.helper_answers``, started here whatever the row count;
the chain starts it only from ``training.SCORING_HELPER_MIN_ANSWERS`` answers), in one run on one machine.
The answers of the two ways are compared byte for byte (the helper keeps every batch whole).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scoring_helper.py --run-dir runs/demo \
        --adapter runs/exp/bs4_1650/adapter --rows 256

Needs a run up to notebook 02 and a MAgSeg adapter trained on it (``scripts/sft_experiment.py`` writes one,
or notebook 03's ``03_sft/magseg/adapter``). Writes only under a temporary folder. Keep the machine idle: the
two ways are timed one after the other.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from magseg_nb import inference, training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--adapter", type=Path, required=True, help="a MAgSeg adapter trained on the run")
    p.add_argument("--rows", type=int, default=256, help="validation rows (0: all)")
    p.add_argument("--views", type=int, default=4, help="test-time views (the demo: 4)")
    args = p.parse_args()
    training._torch().set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, helper in (("one process", False), ("with a helper process", True)):
            s = training.SFTSettings(
                base_model=inference.adapter_base(args.adapter),
                train_jsonl=str(args.run_dir / "02_instruction_format" / "magseg_train.jsonl"),
                output_dir=str(Path(tmp) / key.replace(" ", "_")),
                val_jsonl=str(args.run_dir / "02_instruction_format" / "magseg_val.jsonl"),
                eval_max_examples=args.rows or None,
                test_views=args.views,
            )
            Path(s.output_dir).mkdir(parents=True)
            model, processor = training._load_trained(s.base_model, args.adapter)
            answers_of = training.helper_answers(s, args.adapter, False, 1, min_answers=1) if helper else None
            t0 = time.perf_counter()
            report = training.evaluate_split(model, processor, s, answers_of=answers_of)
            seconds = time.perf_counter() - t0
            rows[key] = (seconds, report["model"]["n"], (Path(s.output_dir) / "answers.jsonl").read_bytes())
    base = rows["one process"][0]
    print("| scoring | rows | seconds | relative |\n| --- | --- | --- | --- |")
    for key, (seconds, n, _) in rows.items():
        print(f"| {key} | {n} | {seconds:.1f} | {seconds / base:.2f} |")
    same = rows["one process"][2] == rows["with a helper process"][2]
    print(f"answers byte-identical: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
