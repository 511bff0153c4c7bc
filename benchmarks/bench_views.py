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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rows", type=int, default=256, help="validation conversations timed (the first N)")
    parser.add_argument("--batch-size", type=int, default=16, help="notebook 03's eval_batch_size")
    parser.add_argument(
        "--repeats", type=int, default=2, help="each count is timed this often; the best is kept"
    )
    args = parser.parse_args()
    adapter = args.run_dir / "03_sft" / "magseg" / "adapter"
    val = args.run_dir / "02_instruction_format" / "magseg_val.jsonl"
    for path in (adapter, val):
        if not path.exists():
            raise SystemExit(f"{path} not found: run magseg-nb run --profile demo --to 03 first")
    model, processor = models.load_model_and_processor(inference.adapter_base(adapter), adapter_dir=adapter)
    ds = training.load_split(val)
    ds = ds.select(range(min(args.rows, len(ds))))
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
