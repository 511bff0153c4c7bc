"""What running notebook 05's variants side by side would buy on a small CPU: each variant's greedy
generation over some test tiles (four views, as the demo), one variant after the other in one process
per variant with every core (what notebook 05 does now), then all at once, one process and one thread
each, in one run on one machine. The answers of the two ways are compared too (a thread count can
change the last digits of a sum, and so, rarely, a greedy token).

    .venv/bin/python benchmarks/bench_inference_side_by_side.py --run-dir runs/demo --tiles 12

Needs a run whose notebook 04 finished (the variants magseg-sft and magseg-grpo). Writes only under a
temporary folder. Keep the machine idle: the two ways are timed one after the other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from magseg_nb import side_by_side


def worker(run_dir: Path, variant: str, tiles: int, views: int, out: Path) -> None:
    """One variant over ``tiles`` test tiles, as notebook 05 runs it (no refinement); writes ``out``."""
    import torch

    from magseg_nb import geo, inference

    run01, run02 = run_dir / "01_dataset_prep", run_dir / "02_instruction_format"
    v = inference.select_variants(inference.find_variants(run_dir), [variant])[0]
    spec = inference.format_spec(run02, v.fmt)
    model, processor = inference.load_variant(v)
    budget = inference.answer_budget(processor, spec, run02)
    test = inference.limit_tiles(inference.select_test_tiles(geo.read_tiles_table(run01)), tiles)
    t0 = time.perf_counter()
    summary = inference.run_variant(
        model,
        processor,
        run01,
        test,
        spec,
        out,
        batch_size=16,
        max_new_tokens=budget,
        log=None,
        test_views=views,
    )
    summary.update(seconds=round(time.perf_counter() - t0, 1), threads=torch.get_num_threads())
    (out / "bench.json").write_text(json.dumps(summary))


def start(args, variant: str, out: Path, threads: int) -> subprocess.Popen:
    env = side_by_side.thread_env(threads)
    cmd = [sys.executable, __file__, "--run-dir", str(args.run_dir), "--tiles", str(args.tiles)]
    cmd += ["--views", str(args.views), "--worker", variant, "--out", str(out)]
    return subprocess.Popen(cmd, env=env)


def wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode}): {p.args}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--tiles", type=int, default=12, help="test tiles per variant")
    p.add_argument("--views", type=int, default=4, help="test-time views (the demo: 4)")
    p.add_argument("--variants", nargs="+", default=["magseg-sft", "magseg-grpo"])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.run_dir, args.worker, args.tiles, args.views, args.out)
    cores = side_by_side.cpu_cores()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for v in args.variants:
            wait([start(args, v, Path(tmp) / "seq" / v, cores)])
        rows["one after the other"] = (time.perf_counter() - t0, cores)
        t0 = time.perf_counter()
        threads = max(1, cores // len(args.variants))
        wait([start(args, v, Path(tmp) / "sbs" / v, threads) for v in args.variants])
        rows["side by side"] = (time.perf_counter() - t0, threads)
        same = {
            v: (Path(tmp) / "seq" / v / "answers.jsonl").read_bytes()
            == (Path(tmp) / "sbs" / v / "answers.jsonl").read_bytes()
            for v in args.variants
        }
        gen = {
            k: {
                v: json.loads((Path(tmp) / k / v / "bench.json").read_text())["infer_s"]
                for v in args.variants
            }
            for k in ("seq", "sbs")
        }
    base = rows["one after the other"][0]
    print(f"{', '.join(args.variants)}: {args.tiles} test tiles each, {args.views} views, {cores} cores")
    print(
        "| way | threads per process | seconds (all variants, loading included) | relative | generation seconds |"
    )
    print("| --- | --- | --- | --- | --- |")
    for (name, (sec, thr)), key in zip(rows.items(), ("seq", "sbs"), strict=True):
        g = " / ".join(f"{gen[key][v]:.1f}" for v in args.variants)
        print(f"| {name} | {thr} | {sec:.1f} | {sec / base:.2f} | {g} |")
    print("answers identical between the two ways: " + ", ".join(f"{v} {same[v]}" for v in args.variants))


if __name__ == "__main__":
    main()
