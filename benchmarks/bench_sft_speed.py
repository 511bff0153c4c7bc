"""What torch.compile and bf16 autocast buy notebook 03's SFT on this CPU: both formats side by side (the
demo's settings, fewer steps, one thread each), once per setting, in one run on one machine.

The tiny model's steps are mostly matrix products (about 7 GFLOP a MAgSeg step at batch 4), so a CPU with
native bf16 (AVX512-BF16 or AMX) computes them faster in bf16; compiling fuses the many small operations
around them and costs a one-off start (seen in the first row's difference from the steady rate).

    .venv/bin/python benchmarks/bench_sft_speed.py --run-dir runs/demo --steps 800 --rows 16

Needs a run whose notebook 02 finished. Writes only under a temporary folder. Keep the machine idle.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from bench_side_by_side import plans, sft_bench_parser, time_one_thread_each  # this folder is on sys.path

from magseg_nb import training

SETTINGS = {  # name: (torch_compile, cpu_autocast)
    "eager, float32": (False, False),
    "compiled, float32": (True, False),
    "eager, bf16 autocast": (False, True),
    "compiled, bf16 autocast": (True, True),
}


def main() -> None:
    args = sft_bench_parser(__doc__, 800, 16).parse_args()
    cpu = training.use_cpu_autocast("auto"), training.cxx_compiler()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (comp, auto)) in enumerate(SETTINGS.items()):
            runs = {
                fmt: dataclasses.replace(s, torch_compile=comp, cpu_autocast=auto)
                for fmt, s in plans(args.run_dir, Path(tmp) / f"s{i}", args.steps, args.rows).items()
            }
            rows[name] = time_one_thread_each(runs)
            print(f"{name}: {rows[name][0]:.1f} s (training {rows[name][1]})", flush=True)
    print(
        f"{args.steps} MAgSeg steps, {args.rows} prompts per format; native bf16 / C++ compiler here: {cpu}"
    )
    first = rows["eager, float32"][1]
    print(
        "| setting | seconds (train and score both formats) | training seconds (magseg / text4seg) | relative |"
    )
    print("| --- | --- | --- | --- |")
    for name, (secs, train) in rows.items():
        rel = " / ".join(f"{train[k] / first[k]:.2f}" for k in sorted(train))
        print(f"| {name} | {secs:.1f} | {' / '.join(f'{train[k]:.1f}' for k in sorted(train))} | {rel} |")


if __name__ == "__main__":
    main()
