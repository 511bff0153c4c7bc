"""What running notebook 05's variants side by side buys on a small CPU: notebook 05's own runner
(``magseg_nb.variant_runs``) over some test tiles, first one variant after the other in this process with
every core (``variants_side_by_side: false``), then side by side, one process and one thread per core
(``true``), in one run on one machine. The answers of the two ways are compared too (a thread count can
change the last digits of a sum, and so, rarely, a greedy token).

    .venv/bin/python benchmarks/bench_inference_side_by_side.py --run-dir runs/demo --tiles 12

Needs a run whose notebook 05 finished: its parameters are read from the stage's record
(``05_inference/state.json``); the map scene is left out. Writes only under a temporary
folder. Keep the machine idle: the two ways are timed one after the other.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from magseg_nb import chain, geo, inference, side_by_side, variant_runs


def notebook05_params(run_dir: Path) -> dict:
    """Notebook 05's parameters as that run used them (its stage record)."""
    state = chain.read_state(run_dir / "05_inference")
    if state is None:
        raise SystemExit(
            f"{run_dir / '05_inference'} holds no finished stage: run notebook 05 first (magseg-nb run --to 05)"
        )
    return state["params"]


def plan_for(run_dir: Path, names: list[str], tiles: int, views: int, out: Path) -> variant_runs.Plan:
    """Notebook 05's plan for ``names`` over the first ``tiles`` test tiles, ``views`` views, no map."""
    run01, run02 = run_dir / "01_dataset_prep", run_dir / "02_instruction_format"
    params = {**notebook05_params(run_dir), "map_scenes": "none", "test_views": views}
    test = inference.limit_tiles(inference.select_test_tiles(geo.read_tiles_table(run01)), tiles)
    chosen = inference.select_variants(inference.find_variants(run_dir), names)
    return variant_runs.make_plan(params, run_dir, run01, run02, out, test, chosen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--tiles", type=int, default=12, help="test tiles per variant")
    p.add_argument("--views", type=int, default=4, help="test-time views (the demo: 4)")
    p.add_argument("--variants", nargs="+", default=["magseg-sft", "magseg-grpo"])
    args = p.parse_args()
    cores = side_by_side.cpu_cores()
    rows, gen, answers = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, setting in (("one after the other", False), ("side by side", True)):
            plan = plan_for(args.run_dir, args.variants, args.tiles, args.views, Path(tmp) / str(setting))
            t0 = time.perf_counter()
            summaries = variant_runs.run(plan, args.variants, setting=setting)
            threads = side_by_side.threads_each(setting, len(args.variants), cores) or cores
            rows[key] = (time.perf_counter() - t0, threads)
            gen[key] = [summaries[v]["infer_s"] for v in args.variants]
            answers[key] = [(Path(plan.out_dir) / v / "answers.jsonl").read_bytes() for v in args.variants]
    same = [a == b for a, b in zip(*answers.values(), strict=True)]
    base = rows["one after the other"][0]
    print(f"{', '.join(args.variants)}: {args.tiles} test tiles each, {args.views} views, {cores} cores")
    print(
        "| way | threads per process | seconds (all variants, loading included) | relative | generation seconds |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, (sec, thr) in rows.items():
        g = " / ".join(f"{s:.1f}" for s in gen[name])
        print(f"| {name} | {thr} | {sec:.1f} | {sec / base:.2f} | {g} |")
    print(
        "answers identical between the two ways: "
        + ", ".join(f"{v} {s}" for v, s in zip(args.variants, same, strict=True))
    )


if __name__ == "__main__":
    main()
