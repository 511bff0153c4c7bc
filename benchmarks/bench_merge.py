"""What merging the LoRA adapter into the weights buys at generation: ``training.evaluate`` on the same
validation prompts with the PEFT model (LoRA layers beside the base) and with the merged one
(``models.merge_lora``), side by side in one process; the ratio and how many answers are identical.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_merge.py --run-dir runs/demo --rows 512

Needs a run whose notebook 03 finished (its MAgSeg adapter and validation conversations).
"""

from __future__ import annotations

import time

from bench_views import adapter_and_rows, demo_args  # the same options and inputs

from magseg_nb import models, training


def main() -> None:
    args = demo_args(__doc__, 512)
    adapter, base, ds = adapter_and_rows(args)
    peft, processor = models.load_model_and_processor(base, adapter_dir=adapter, trainable=True)
    peft.eval()  # loaded trainable so that it stays a PEFT model; eval() turns dropout off
    merged, _ = models.load_model_and_processor(base, adapter_dir=adapter)
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
