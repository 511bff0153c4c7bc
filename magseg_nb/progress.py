"""What a person sees while the chain runs: live progress, readable stage summaries, a final table.

The kernel side writes a small JSON status file (:func:`write_status`, called by the training callback
at every step); the runner (``magseg_nb.chain``) polls it while papermill executes the notebook and
draws one line: redrawn in place in a terminal, a plain line at most every ``PLAIN_EVERY_S`` seconds
without one (``CI=true``, a log file). The runner also hears which section of the notebook starts
and the cells' streamed output (inference prints ``<scene>: n/N tiles``).
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from magseg_nb import files

ENV = "MAGSEG_PROGRESS_FILE"  # set by the runner for its kernels: where the status file goes
PLAIN_EVERY_S = 30.0
RED, BOLD, RESET = "\033[31m", "\033[1m", "\033[0m"
CLASSES = ("others", "field", "tree", "water")
_TILES = re.compile(r"^(?P<task>[\w.-]+): (?P<step>\d+)/(?P<total>\d+) tiles\s*$", re.M)


# --- the kernel side ------------------------------------------------------------------------------


def status_path() -> Path | None:
    """The status file the runner reads (None outside the runner, e.g. in JupyterLab)."""
    value = os.environ.get(ENV, "")
    return Path(value) if value else None


_PROXY_TASK = re.compile(r"^training models/(?P<base>.+?)-proxy-[0-9a-f]+(?:\.partial)?$")


def task_label(task: str) -> str:
    """The name a person reads for a task: no ``.partial`` scratch suffix, and the tiny model's proxy
    pretraining (``training models/<base>-proxy-<hash>.partial``) as ``proxy pretraining <base>``."""
    m = _PROXY_TASK.match(task)
    if m:
        return f"proxy pretraining {m['base']}"
    return re.sub(r"\.partial(?=/|$|\s)", "", task)


def write_status(task: str, step: int, total: int | None, started: float, path: Path | None = None, **values):
    """Write ``{task, step, total, started, updated, values}`` atomically (no-op without a path);
    ``task`` is stored as :func:`task_label` shows it."""
    path = path or status_path()
    if path is None:
        return
    record = {
        "task": task_label(str(task)),
        "step": int(step),
        "total": int(total) if total else None,
        "started": float(started),
        "updated": time.time(),
        "values": {k: v for k, v in values.items() if isinstance(v, int | float | str) and v is not None},
    }
    try:
        files.write_text(path, json.dumps(record, default=str))
    except OSError:  # progress is a courtesy: never fail a training run over it
        pass


def read_status(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "step" in data else None


# Third-party messages that say nothing about this project's run (matched at the start of the message).
KNOWN_NOISE = (
    ("FutureWarning", r"`(gradient_checkpointing|is_gradient_checkpointing)` is deprecated"),
    ("UserWarning", r"The given NumPy array is not writable"),
)
_NOISY_LOG_LINES = ("mtime may not be reliable on this filesystem",)


class _DropNoise:
    def filter(self, record) -> bool:
        return not any(text in record.getMessage() for text in _NOISY_LOG_LINES)


def quiet_known_noise() -> None:
    """Targeted filters for known harmless third-party messages (every other warning still shows)."""

    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=getattr(builtins, category))
    for name in ("transformers.trainer_utils", "transformers"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


# --- formatting -----------------------------------------------------------------------------------


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _num(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def progress_line(status: dict, now: float | None = None) -> str:
    """``sft magseg · step 12/40 · loss 1.234 · 1 min 02 s elapsed · ~3 min 10 s left``."""
    now = time.time() if now is None else now
    step, total = status.get("step", 0), status.get("total")
    elapsed = now - float(status.get("started", now))
    parts = [str(status.get("task", "working")), f"step {step}/{total}" if total else f"step {step}"]
    for key, value in (status.get("values") or {}).items():
        parts.append(f"{key} {_num(value)}")
    parts.append(f"{format_seconds(elapsed)} elapsed")
    if total and step:
        done_at = float(status.get("updated", now)) - float(status.get("started", now))
        parts.append(f"~{format_seconds(done_at / step * (total - step))} left")
    return " · ".join(parts)


def section_of(cells, index: int) -> str | None:
    """The heading of the notebook section that holds cell ``index`` (its last markdown heading)."""
    for cell in reversed(list(cells)[: index + 1]):
        if cell.get("cell_type") == "markdown":
            for line in str(cell.get("source", "")).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return None


def interactive(stream=None) -> bool:
    """A terminal a person watches (not CI, not a file or pipe)."""
    stream = stream or sys.stdout
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def red(text: str, colour: bool) -> str:
    return f"{RED}{text}{RESET}" if colour else text


# --- the runner side ------------------------------------------------------------------------------


class Reporter:
    """Shows one stage's progress: section changes as lines, and a live progress line (redrawn in a
    terminal every ``tick_s``; a plain line at most every ``plain_every_s`` otherwise)."""

    def __init__(
        self,
        stage: str,
        status_file: Path | None,
        stream=None,
        tty: bool | None = None,
        tick_s: float = 1.0,
        plain_every_s: float = PLAIN_EVERY_S,
        clock=time.time,
    ):
        self.stage, self.status_file = stage, status_file
        self.stream = stream or sys.stdout
        self.tty = interactive(self.stream) if tty is None else tty
        self.tick_s, self.plain_every_s, self.clock = tick_s, plain_every_s, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False
        self._last_plain = -math.inf
        self._last_line = ""
        self._streamed: dict | None = None  # progress parsed from the cells' output
        self._section: str | None = None

    # events
    def section(self, name: str | None) -> None:
        if name and name != self._section:
            self._section = name
            self._streamed = None
            self._print(f"[{self.stage}] {name}")

    def cell_started(self, cells, index: int) -> None:
        self.section(section_of(cells, index))

    def stdout(self, text: str) -> None:
        """A cell's streamed stdout: picks up ``<task>: n/N tiles`` lines (inference)."""
        for m in _TILES.finditer(text):
            now = self.clock()
            task = f"inference {m['task']}"
            if self._streamed is None or self._streamed["task"] != task:
                self._streamed = {"task": task, "started": now}
            self._streamed.update(step=int(m["step"]), total=int(m["total"]), updated=now, values={})

    def warning(self, text: str) -> None:
        """A cell's stderr: shown as it comes (known noise is filtered in the kernel, not here)."""
        text = text.rstrip()
        if text and "\r" not in text:  # carriage returns: a progress bar redrawing itself
            self._print("\n".join(f"[{self.stage}] {line}" for line in text.splitlines()))

    def current(self) -> dict | None:
        status = read_status(self.status_file)
        if self._streamed and (status is None or self._streamed["updated"] >= status.get("updated", 0)):
            return self._streamed
        return status

    def tick(self) -> str | None:
        """Draw the progress line now if there is news; returns what was drawn."""
        status = self.current()
        if status is None:
            return None
        now = self.clock()
        line = f"[{self.stage}] {progress_line(status, now)}"
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K" + line[: self._width()])
                self.stream.flush()
                self._drawn = True
                return line
            key = (status.get("task"), status.get("step"))
            if now - self._last_plain < self.plain_every_s or key == self._last_line:
                return None
            self._last_plain, self._last_line = now, key
            self.stream.write(line + "\n")
            self.stream.flush()
            return line

    def _width(self) -> int:
        try:
            return max(20, os.get_terminal_size(self.stream.fileno()).columns - 1)
        except (OSError, AttributeError, ValueError):
            return 200

    def _print(self, text: str) -> None:
        with self._lock:
            if self._drawn:
                self.stream.write("\r\033[K")
                self._drawn = False
            self.stream.write(text + "\n")
            self.stream.flush()

    # the polling thread
    def __enter__(self) -> Reporter:
        def loop():
            while not self._stop.wait(self.tick_s):
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - drawing progress must never stop the run
                    pass

        self._thread = threading.Thread(target=loop, name=f"progress-{self.stage}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._drawn:
                self.stream.write("\r\033[K")
                self.stream.flush()
                self._drawn = False


class StreamSink:
    """A file-like object for papermill's ``stdout_file`` / ``stderr_file`` that feeds a Reporter."""

    def __init__(self, handler):
        self.handler = handler

    def write(self, text: str) -> int:
        self.handler(text)
        return len(text)

    def flush(self) -> None:
        pass


# --- summaries --------------------------------------------------------------------------------------


def _formats(summary: dict) -> list[str]:
    return sorted(k.removesuffix("_steps_planned") for k in summary if k.endswith("_steps_planned"))


def _dice_row(summary: dict, prefix: str) -> str | None:
    values = [summary.get(f"{prefix}_dice_{c}") for c in CLASSES]
    if all(v is None for v in values):
        return None
    return " ".join(_num(v if v is None else float(v)) for v in values)


def training_lines(summary: dict, colour: bool = False) -> list[str]:
    """03/04: per format steps done/planned, time, validation Dice per class beside the baselines,
    the well-formed share; a run cut short (``<fmt>_stopped_early``) in red."""
    lines = []
    for fmt in _formats(summary):
        steps, planned = summary.get(f"{fmt}_steps"), summary.get(f"{fmt}_steps_planned")
        head = f"{fmt}: {steps}/{planned} steps"
        if summary.get(f"{fmt}_train_seconds") is not None:
            head += f" in {format_seconds(float(summary[f'{fmt}_train_seconds']))}"
        if summary.get(f"{fmt}_val_valid_fraction") is not None:
            head += f", well-formed answers {float(summary[f'{fmt}_val_valid_fraction']):.0%}"
        if summary.get(f"{fmt}_train_reward_mean") is not None:
            head += f", mean reward {float(summary[f'{fmt}_train_reward_mean']):.3f}"
        lines.append(head)
        if summary.get(f"{fmt}_stopped_early"):
            lines.append(red(f"  {fmt} STOPPED EARLY (time budget): {steps} of {planned} steps", colour))
        rows = [
            ("model", _dice_row(summary, f"{fmt}_val")),
            ("after SFT", _dice_row(summary, f"{fmt}_sft_val")),
            ("all-field", _dice_row(summary, f"{fmt}_all_field")),
            ("pixel classifier", _dice_row(summary, f"{fmt}_pixel")),
        ]
        rows = [(name, row) for name, row in rows if row]
        if rows:
            lines.append(f"  validation Dice ({' / '.join(CLASSES)}):")
            lines += [f"    {name:<17s}{row}" for name, row in rows]
    short = [t for t in summary.get("conclusions") or [] if not str(t).startswith("**")]
    lines += [f"  {str(text)[:200]}" for text in short[:3]]  # the rest stays in the notebook
    return lines


def inference_lines(summary: dict) -> list[str]:
    lines = []
    for variant in summary.get("variants") or []:
        get = lambda k, v=variant: summary.get(f"{v}_{k}")  # noqa: E731
        if get("tiles_inferred") is None:
            continue
        line = (
            f"{variant}: {get('tiles_inferred')} tiles, {get('malformed')}/{get('answers')} answers malformed, "
            f"{get('fields')} fields, mean Dice coarse {_num(get('mean_dice_coarse'))} "
            f"refined {_num(get('mean_dice_refined'))}, {format_seconds(get('infer_s'))} generating"
        )
        lines.append(line)
        if get("map_tiles"):
            lines.append(
                f"  + {get('map_tiles')} map-only tiles (not scored) in {format_seconds(get('map_s'))}"
            )
    return lines


def metrics_lines(summary: dict) -> list[str]:
    lines = []
    if "n_tiles" in summary:
        lines.append(
            f"{summary['n_tiles']} test tiles in {summary.get('n_blocks', '?')} blocks, "
            f"{summary.get('n_methods', '?')} methods"
        )
    if "best_inst_f1_method" in summary:
        lines.append(
            f"best field-instance F1: {summary['best_inst_f1_method']} {_num(summary.get('best_inst_f1'))}"
        )
    for text in [t for t in summary.get("reading") or [] if "wiring check" not in str(t)][:3]:
        lines.append(f"  {str(text)[:200]}")
    return lines


def generic_lines(summary: dict, limit: int = 8) -> list[str]:
    """Short scalar entries (no paths, no long lists) of any other stage."""
    parts = []
    for key, value in summary.items():
        if isinstance(value, bool) or isinstance(value, int | float):
            parts.append(f"{key} {_num(value)}")
        elif isinstance(value, str) and len(value) < 40 and "/" not in value:
            parts.append(f"{key} {value}")
        elif (
            isinstance(value, dict)
            and all(isinstance(v, int | float) for v in value.values())
            and len(value) <= 6
        ):
            parts.append(f"{key} " + ", ".join(f"{k} {_num(v)}" for k, v in value.items()))
        if len(parts) >= limit:
            break
    return [", ".join(parts[i : i + 3]) for i in range(0, len(parts), 3)]


def stage_lines(stage: str, summary: dict, colour: bool = False) -> list[str]:
    """A few lines a person reads at a glance (the full record stays in state.json)."""
    summary = summary or {}
    if stage.startswith(("03", "04")):
        return training_lines(summary, colour)
    if stage.startswith("05"):
        return inference_lines(summary) or generic_lines(summary)
    if stage.startswith("06"):
        return metrics_lines(summary)
    return generic_lines(summary)


def stopped_early(summary: dict | None) -> list[str]:
    return sorted(
        k.removesuffix("_stopped_early")
        for k, v in (summary or {}).items()
        if k.endswith("_stopped_early") and v
    )


def table(rows: list[list[Any]], header: list[str]) -> list[str]:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return [fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]]


HEADLINE_METRICS = ("mdice", "iou_field", "inst_f1")


def headline_rows(metrics_csv: Path, limit: int = 8) -> list[list[str]]:
    """Overall headline scores per method from 06's metrics.csv (wiring checks left out)."""
    import pandas as pd

    if not Path(metrics_csv).exists():
        return []
    df = pd.read_csv(metrics_csv)
    df = df[(df["group"] == "all") & df["metric"].isin(HEADLINE_METRICS)]
    df = df[~df["method"].str.contains("wiring check", regex=False)]
    wide = df.pivot_table(index="method", columns="metric", values="value", sort=False)
    rows = []
    for method, row in wide.iterrows():
        rows.append(
            [method]
            + [_num(float(row[m])) if m in row and row[m] == row[m] else "–" for m in HEADLINE_METRICS]
        )
    return rows[:limit]


def final_report(records: list[dict], run_dir: Path, root: Path, colour: bool = False) -> list[str]:
    """The end of a run: headline numbers, time per stage, where the outputs are (relative paths)."""
    run_dir = Path(run_dir)

    def rel(path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            return str(path)

    lines = []
    heads = headline_rows(run_dir / "06_metrics" / "metrics.csv")
    if heads:
        lines += ["", "Headline numbers (test tiles, 06_metrics/metrics.csv):"]
        lines += ["  " + line for line in table(heads, ["method", *HEADLINE_METRICS])]
    rows = []
    for r in records:
        late = stopped_early(r.get("summary"))
        note = red(f"stopped early: {', '.join(late)}", colour) if late else ""
        rows.append(
            [r["stage"], r["status"], format_seconds(r.get("seconds")) if r["status"] == "ran" else "-", note]
        )
    lines += ["", "Stages:"] + ["  " + line for line in table(rows, ["stage", "status", "time", ""])]
    total = sum(r.get("seconds") or 0 for r in records)
    lines.append(f"  total {format_seconds(total)}")
    where = [("executed notebooks", run_dir / "notebooks")]
    for label, path in (
        ("report", run_dir / "06_metrics" / "report.md"),
        ("figures", run_dir / "06_metrics" / "figures"),
        ("map", run_dir / "06_metrics" / "map.html"),
    ):
        if path.exists():
            where.append((label, path))
    lines += ["", "Outputs:"] + [f"  {label:<19s}{rel(path)}" for label, path in where]
    return lines
