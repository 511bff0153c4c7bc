"""Work side by side on a CPU, each part in its own process with its share of the cores: notebook
03's SFT trainings (here) and notebook 05's variants (``variant_runs``).

The tiny model's matmuls are too small to keep two threads busy: on the demo's 2-core VM one MAgSeg
SFT step takes 0.28 s with two threads and 0.41 s with one, and two one-thread trainings side by side
run at almost their one-thread speed (``benchmarks/bench_side_by_side.py`` measures it). Notebook 03
therefore trains its formats side by side on a CPU. Each process also scores its training on the
validation split as soon as it has finished, so the scorings overlap too, and hands the second half of its
rows to a helper process of as many threads (``training.helper_answers``): the training that finishes last
would otherwise score alone, on one core of two. ``training.run_sft`` in the kernel then finds the finished
training and its scores (``training.scored_before``) and reads them.

Each process is ``python -m magseg_nb.training sft --config <out>/train_config.yaml`` with the run's
settings; its output goes, line by line and prefixed with its name, to this process's
stdout and to ``<out>/train.log``. A run that fails raises with its log's path; an interrupted one
resumes from its checkpoints when the stage runs again, as an in-process training does.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from magseg_nb import training

CONFIG_FILE = "train_config.yaml"
LOG_FILE = "train.log"


def cpu_cores() -> int:
    """The cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_each(setting: bool | str, n_runs: int, cores: int | None = None, gpu: bool | None = None) -> int:
    """Threads per process when ``n_runs`` trainings go side by side, or 0: one after the other.

    ``setting``: ``"auto"`` (side by side on a machine without a GPU that has a core for each run),
    ``True`` (side by side wherever there is a core for each run) or ``False``.
    """
    if setting not in (True, False, "auto"):
        raise ValueError(f"side_by_side must be true, false or 'auto', not {setting!r}")
    cores = cpu_cores() if cores is None else cores
    if gpu is None:
        gpu = training._torch().cuda.is_available()
    if not setting or n_runs < 2 or cores < n_runs or (setting == "auto" and gpu):
        return 0
    return cores // n_runs


def _relay(stream, name: str, log_path: Path) -> None:
    """Copy a child's output to ``log_path`` and, prefixed with ``name``, to stdout, line by line."""
    with open(log_path, "w", encoding="utf-8") as log:
        for line in stream:
            log.write(line)
            log.flush()
            print(f"[{name}] {line}", end="", flush=True)


def thread_env(threads: int) -> dict[str, str]:
    """This process's environment for a child that computes with ``threads`` threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


@dataclasses.dataclass
class Child:
    """A child process computing with its share of the cores; its output relayed line by line."""

    name: str
    proc: subprocess.Popen
    relay: threading.Thread
    log: Path

    def wait(self, what: str) -> None:
        """Wait for it; a failure raises with ``what`` (\"SFT of magseg\"), its log and its last line."""
        self.proc.wait()
        self.relay.join()
        if self.proc.returncode != 0:
            lines = [ln for ln in self.log.read_text(encoding="utf-8").splitlines() if ln.strip()]
            raise RuntimeError(
                f"{what} failed (exit {self.proc.returncode}); its log is {self.log}; "
                f"last line: {lines[-1] if lines else ''}"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def start_child(name: str, module_args: list[str], threads: int, log: Path, env: dict | None = None) -> Child:
    """``python -m <module_args>`` with ``threads`` threads (and ``env`` added to its environment); its
    output goes, prefixed with ``name``, to this process's stdout and to ``log``."""
    env = {**thread_env(threads), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", *module_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        encoding="utf-8",
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    relay = threading.Thread(target=_relay, args=(proc.stdout, name, log), daemon=True)
    relay.start()
    return Child(name, proc, relay, log)


def _start(name: str, s: training.SFTSettings, threads: int, helper_min_answers: int) -> Child:
    out = Path(s.output_dir)
    training.write_config(s, out / CONFIG_FILE)
    # Its scoring hands half the validation rows to a helper of as many threads (training.helper_answers):
    # the run that finishes last then scores on the cores the others have left.
    return start_child(
        name,
        ["magseg_nb.training", "sft", "--config", str(out / CONFIG_FILE)],
        threads,
        out / LOG_FILE,
        env={
            training.SCORING_HELPER_ENV: str(threads),
            training.SCORING_HELPER_MIN_ENV: str(helper_min_answers),
        },
    )


def train_sft(
    runs: dict[str, training.SFTSettings],
    threads: int,
    reuse: dict[str, Path] | None = None,
    helper_min_answers: int = training.SCORING_HELPER_MIN_ANSWERS,
) -> Iterator[str]:
    """Train and score the SFT ``runs`` (name -> settings) at once, each in its own process with
    ``threads`` threads, and yield each name, in the order given, once its process has finished; the
    caller's ``training.run_sft`` then reads the scores. Meanwhile this process computes with
    ``threads`` threads (restored at the end), so that what it scores itself (a run finished before
    but not scored) is scored with the same threads as the rest. A run already finished in its
    ``output_dir`` with these settings, or in ``reuse[name]`` (then copied, as ``training.run_sft``
    does), is not started. A run that fails raises, naming its log; the others are stopped and keep
    their checkpoints for a rerun. Each run scores with a helper process when it hands on at least
    ``helper_min_answers`` answers (``training.split_row``)."""
    torch = training._torch()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    procs: dict[str, Child] = {}
    try:
        for name, s in runs.items():
            Path(s.output_dir).mkdir(parents=True, exist_ok=True)
            if training.finished_training(s, training.weights_dir_name(s), (reuse or {}).get(name)) is None:
                procs[name] = _start(name, s, threads, helper_min_answers)
        if procs:
            print(f"training {', '.join(procs)} side by side, {threads} thread(s) each", flush=True)
        for name in runs:
            if name in procs:
                procs[name].wait(f"SFT of {name}")
            yield name
    finally:  # an error or an interrupted cell stops the children; their checkpoints stay for a rerun
        for child in procs.values():
            child.stop()
        torch.set_num_threads(before)
