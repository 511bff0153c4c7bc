"""What merging the LoRA adapter into the weights buys at generation: ``training.evaluate`` on the same
validation prompts with the PEFT model (LoRA layers beside the base) and with the merged one
(``models.merge_lora``), side by side in one process; the ratio and how many answers are identical.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_merge.py --run-dir runs/demo --rows 512

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
    parser.add_argument("--rows", type=int, default=512, help="validation conversations timed (the first N)")
    parser.add_argument("--batch-size", type=int, default=16, help="notebook 03's eval_batch_size")
    parser.add_argument(
        "--repeats", type=int, default=2, help="each model is timed this often; the best is kept"
    )
    args = parser.parse_args()
    adapter = args.run_dir / "03_sft" / "magseg" / "adapter"
    val = args.run_dir / "02_instruction_format" / "magseg_val.jsonl"
    for path in (adapter, val):
        if not path.exists():
            raise SystemExit(f"{path} not found: run magseg-nb run --profile demo --to 03 first")
    base = inference.adapter_base(adapter)
    peft, processor = models.load_model_and_processor(base, adapter_dir=adapter, trainable=True)
    peft.eval()  # loaded trainable so that it stays a PEFT model; eval() turns dropout off
    merged, _ = models.load_model_and_processor(base, adapter_dir=adapter)
    ds = training.load_split(val)
    ds = ds.select(range(min(args.rows, len(ds))))
    seconds, answers, dice = {}, {}, {}
    for _ in range(args.repeats):  # interleaved, so drift of a shared machine touches both alike
        for name, model in (("LoRA beside the base (PEFT)", peft), ("merged", merged)):
            t0 = time.perf_counter()
            report, rows = training.evaluate(model, processor, ds, batch_size=args.batch_size)
            seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - t0)
            answers[name] = [r["answer"] for r in rows]
            dice[name] = report["model"]["mean_dice"]
    first = next(iter(seconds))
    same = sum(a == b for a, b in zip(*answers.values(), strict=True))
    print(f"{len(ds)} validation prompts of {args.run_dir}, batch {args.batch_size}, best of {args.repeats}")
    print("| model | seconds | relative to PEFT | mean Dice (these prompts) |")
    print("| --- | --- | --- | --- |")
    for name in seconds:
        print(f"| {name} | {seconds[name]:.1f} | {seconds[name] / seconds[first]:.2f} | {dice[name]:.4f} |")
    print(f"identical answers: {same} of {len(ds)}")


if __name__ == "__main__":
    main()
