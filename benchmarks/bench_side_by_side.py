"""What training the formats side by side buys on a small CPU: notebook 03's MAgSeg and Text4Seg SFT
(the demo's settings, fewer steps) and the scoring of some validation prompts (four views), as notebook
03 runs them: one after the other in one process with every core, then trained at once in two
processes with a core each and each scored as soon as it is trained (``side_by_side.train_sft``), in
one run on one machine. The answers of the two ways are compared too.

    .venv/bin/python benchmarks/bench_side_by_side.py --run-dir runs/demo --steps 300 --rows 256

Needs a run whose notebook 02 finished. Writes only under a temporary folder. Keep the machine idle: the
two ways are timed one after the other, and a busy machine slows whichever runs beside its load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from magseg_nb import models, side_by_side, training


def plans(run_dir: Path, out: Path, steps: int, rows: int, base=None) -> dict[str, training.SFTSettings]:
    """Notebook 03's SFT settings of both formats at ``steps`` (Text4Seg at equal tokens), scoring ``rows``
    prompts each, on ``base`` (default: the shipped tiny base)."""
    params = {"max_steps": steps, "eval_max_examples": rows, "equal_tokens": True}
    base = base or models.resolve_model("tiny-gemma3-proxy", out / "models")
    return training.sft_plans(params, ["magseg", "text4seg"], base, run_dir / "02_instruction_format", out)


def sft_bench_parser(doc: str, steps: int, rows: int) -> argparse.ArgumentParser:
    """The arguments every notebook-03 SFT benchmark takes: the run, MAgSeg's steps, prompts scored."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=steps, help="MAgSeg's steps (Text4Seg gets as many tokens)")
    p.add_argument("--rows", type=int, default=rows, help="validation prompts scored per format")
    return p


def time_one_thread_each(runs: dict[str, training.SFTSettings]) -> tuple[float, dict[str, float]]:
    """Seconds to train ``runs`` side by side (one thread each) and score each as notebook 03 does, and
    the training seconds each run recorded."""
    t0 = time.perf_counter()
    train = {name: training.run_sft(runs[name])["train_seconds"] for name in side_by_side.train_sft(runs, 1)}
    return time.perf_counter() - t0, train


def main() -> None:
    args = sft_bench_parser(__doc__, 300, 256).parse_args()
    torch = training._torch()
    cores = side_by_side.cpu_cores()
    with tempfile.TemporaryDirectory() as tmp:
        seq = plans(args.run_dir, Path(tmp) / "one_after_the_other", args.steps, args.rows)
        t0 = time.perf_counter()
        first = {name: training.run_sft(s)["eval"]["model"]["mean_dice"] for name, s in seq.items()}
        sequential = time.perf_counter() - t0
        sbs = plans(args.run_dir, Path(tmp) / "side_by_side", args.steps, args.rows)
        t0 = time.perf_counter()
        threads = max(1, cores // len(sbs))
        ready = side_by_side.train_sft(sbs, threads)
        second = {name: training.run_sft(sbs[name])["eval"]["model"]["mean_dice"] for name in ready}
        together = time.perf_counter() - t0
    steps = ", ".join(f"{k} {s.max_steps} steps" for k, s in seq.items())
    print(f"{steps}; {cores} cores; one process had {torch.get_num_threads()} threads")
    print("| way | seconds (train and score both formats) | relative | mean Dice (magseg / text4seg) |")
    print("| --- | --- | --- | --- |")
    for way, secs, dice in (
        (f"one after the other, {torch.get_num_threads()} threads", sequential, first),
        (f"side by side, {threads} thread(s) each", together, second),
    ):
        scores = " / ".join(f"{dice[k]:.4f}" for k in dice)
        print(f"| {way} | {secs:.1f} | {secs / sequential:.2f} | {scores} |")


if __name__ == "__main__":
    main()
