"""What test-time views cost: ``training.evaluate`` on the same validation prompts with 1, 4 and 8 views,
side by side in one process, as ratios to 1 view.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_views.py --run-dir runs/demo --rows 256

Needs a run whose notebook 03 finished (its MAgSeg adapter and validation conversations).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from magseg_nb import inference, models, training


def demo_args(doc: str, rows: int) -> argparse.Namespace:
    """The options both generation benchmarks take (this one and ``bench_merge.py``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rows", type=int, default=rows, help="validation conversations timed (the first N)")
    parser.add_argument("--batch-size", type=int, default=16, help="notebook 03's eval_batch_size")
    parser.add_argument(
        "--repeats", type=int, default=2, help="each case is timed this often; the best is kept"
    )
    return parser.parse_args()


def adapter_and_rows(args: argparse.Namespace):
    """(MAgSeg adapter folder, its base, the first ``args.rows`` validation conversations) of a run."""
    adapter = args.run_dir / "03_sft" / "magseg" / "adapter"
    val = args.run_dir / "02_instruction_format" / "magseg_val.jsonl"
    for path in (adapter, val):
        if not path.exists():
            raise SystemExit(f"{path} not found: run magseg-nb run --profile demo --to 03 first")
    ds = training.load_split(val)
    return adapter, inference.adapter_base(adapter), ds.select(range(min(args.rows, len(ds))))


def main() -> None:
    args = demo_args(__doc__, 256)
    adapter, base, ds = adapter_and_rows(args)
    model, processor = models.load_model_and_processor(base, adapter_dir=adapter)
    seconds, dice = {}, {}
    for _ in range(args.repeats):  # interleaved, so drift of a shared machine touches every count alike
        for views in (1, 4, 8):
            t0 = time.perf_counter()
            report, _ = training.evaluate(model, processor, ds, batch_size=args.batch_size, test_views=views)
            seconds[views] = min(seconds.get(views, float("inf")), time.perf_counter() - t0)
            dice[views] = report["model"]["mean_dice"]
    print(f"{len(ds)} validation prompts of {args.run_dir}, batch {args.batch_size}, best of {args.repeats}")
    print("| views | seconds | relative to 1 view | mean Dice (these prompts) |")
    print("| --- | --- | --- | --- |")
    for views in (1, 4, 8):
        print(f"| {views} | {seconds[views]:.1f} | {seconds[views] / seconds[1]:.2f} | {dice[views]:.3f} |")


if __name__ == "__main__":
    main()
