"""How much of a cached rerun goes to verifying the stages' outputs (issue: the cache must check
hashes, at under 5 % of a cached rerun).

Side by side on one finished run folder: checking every output by SHA-256, and the check a state
written by this version does (size, then mtime and ctime as recorded at finish; a file whose times
moved is hashed). Time a cached rerun (``time magseg-nb run --profile demo``, every stage skipped)
beside it for scale.

    .venv/bin/python benchmarks/bench_cache_check.py --run-dir runs/demo
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from magseg_nb import chain

STAGES = ("01_dataset_prep", "02_instruction_format", "03_sft", "04_grpo", "05_inference", "06_metrics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo")
    args = parser.parse_args()
    run = chain.resolve_run_dir(args.run_dir)
    states = {s: chain.read_state(run / s) for s in STAGES if chain.read_state(run / s)}
    hashed = {s: {**st, "outputs": {r: {k: e[k] for k in ("size", "sha256")} for r, e in st["outputs"].items()}}
              for s, st in states.items()}  # fmt: skip
    timed = copy.deepcopy(states)
    for s, st in timed.items():
        for rel, e in st["outputs"].items():
            info = (run / s / rel).stat()
            e["mtime_ns"], e["ctime_ns"] = info.st_mtime_ns, info.st_ctime_ns
    seconds = {}
    for name, table in (("sha256 of every output", hashed), ("size + mtime + ctime", timed)):
        t0 = time.perf_counter()
        problems = [chain.output_problem(run / s, st) for s, st in table.items()]
        seconds[name] = time.perf_counter() - t0
        assert not any(problems), problems
    n = sum(len(st["outputs"]) for st in states.values())
    mb = sum(e["size"] for st in states.values() for e in st["outputs"].values()) / 1e6
    print(f"{n} output files, {mb:.0f} MB in {Path(args.run_dir)}")
    for name, s in seconds.items():
        print(f"  {name:24s} {s:6.2f} s")
    first, second = seconds.values()
    print(f"  ratio {second / first:.2f}")


if __name__ == "__main__":
    main()
