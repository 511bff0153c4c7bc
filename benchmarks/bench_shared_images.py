"""What encoding a batch's identical images once buys (``models.shared_image_features``): notebook 03's
validation scoring (``training.evaluate``, batch 16, the demo's views) of a run's MAgSeg adapter, with and
without the sharing, interleaved and repeated, in one process; the answers of the two ways are compared.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shared_images.py --run-dir runs/demo --rows 496

Needs a run whose notebook 03 finished. Writes nothing. Keep the machine idle.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path
from unittest import mock

from magseg_nb import inference, models, training


def score(model, processor, ds, views: int, share: bool) -> tuple[float, list[dict]]:
    """Seconds and answers of ``training.evaluate`` with ``share_images=share``."""
    generate = functools.partial(models.generate, share_images=share)
    t0 = time.perf_counter()
    with mock.patch.object(models, "generate", generate):
        _, answers = training.evaluate(model, processor, ds, batch_size=16, test_views=views)
    return time.perf_counter() - t0, answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--rows", type=int, default=496, help="validation prompts (a tile has 16)")
    p.add_argument("--views", type=int, default=4, help="test-time views (the demo: 4)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    v = inference.select_variants(inference.find_variants(args.run_dir), ["magseg-sft"])[0]
    model, processor = inference.load_variant(v)
    val = args.run_dir / "02_instruction_format" / "magseg_val.jsonl"
    ds = training.load_split(val).select(range(args.rows))
    times: dict[bool, list[float]] = {True: [], False: []}
    answers = {}
    for _ in range(args.repeats):
        for share in (False, True):
            sec, answers[share] = score(model, processor, ds, args.views, share)
            times[share].append(sec)
    plain, shared = min(times[False]), min(times[True])
    print(f"{v.name}: {args.rows} validation prompts, {args.views} views, batch 16, best of {args.repeats}")
    print("| images | seconds | relative |")
    print("| --- | --- | --- |")
    print(f"| every image encoded | {plain:.1f} | 1.00 |")
    print(f"| identical images encoded once | {shared:.1f} | {shared / plain:.2f} |")
    print(f"answers identical: {answers[True] == answers[False]}")


if __name__ == "__main__":
    main()
