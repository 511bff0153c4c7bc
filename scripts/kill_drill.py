"""Kill drill: SIGKILL the chain runner inside every stage in turn, rerun, and check the run finishes
with the same results as an uninterrupted run.

    .venv/bin/python scripts/kill_drill.py --profile smoke            # a few minutes
    .venv/bin/python scripts/kill_drill.py --profile demo --after 60 --stages 03 05 07 --reference-dir runs/demo

For each stage: start ``magseg-nb run``, wait until the stage's ``.partial`` folder exists (plus
``--after`` seconds, or its first checkpoint for 03/04), SIGKILL the runner (no clean-up of any kind)
and start the next attempt, which must resume. A last run finishes the chain. With ``--reference``
(default: on) the same profile also runs once without kills into another folder and the drill
compares every stage's ``results.json`` summary (key by key, timings and paths aside) and every
model's validation and test answers file by file.
Writes ``<drill run folder>/kill_drill.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from magseg_nb import chain, files

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("answers.jsonl",)  # every model's validation and test answers


def drill_profile(profile: str, run_dir: Path, out: Path) -> Path:
    """A copy of ``profile`` writing into ``run_dir`` (so the drill never touches the user's run)."""
    src = Path(profile) if profile.endswith((".yaml", ".yml")) else ROOT / "profiles" / f"{profile}.yaml"
    data = yaml.safe_load(src.read_text())
    data["common"]["run_dir"] = str(run_dir)
    return files.write_text(out, yaml.safe_dump(data, sort_keys=False))


def runner(profile: Path, log) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "magseg_nb.cli", "run", "--profile", str(profile)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_inside(run_dir: Path, stage: str, after: float, proc: subprocess.Popen) -> str:
    """Block until ``stage`` is running (and ``after`` s more, or its first checkpoint); say where."""
    partial = run_dir / f"{stage}{chain.PARTIAL_SUFFIX}"
    while not partial.exists():
        if proc.poll() is not None:
            return f"runner exited (rc {proc.returncode}) before {stage} started"
        time.sleep(0.05)
    t0 = time.time()
    while time.time() - t0 < after:
        if proc.poll() is not None:
            return f"runner exited (rc {proc.returncode}) inside {stage}"
        if not partial.exists():
            return f"just after {stage} finished (it took under {after:.0f} s)"
        if any(partial.rglob("checkpoints/checkpoint-*")):
            return f"inside {stage}, after its first checkpoint ({time.time() - t0:.0f} s in)"
        time.sleep(0.05)
    return f"inside {stage}, {after:.0f} s in"


def run_to_end(profile: Path, log) -> int:
    proc = runner(profile, log)
    return proc.wait()


def summaries(run_dir: Path) -> dict[str, object]:
    out = {}
    for stage in chain.STAGES:
        res = run_dir / stage / chain.RESULTS_FILE
        if res.exists():
            out[stage] = json.loads(res.read_text()).get("summary")
    return out


def differing(a: dict, b: dict) -> list[str]:
    """Summary keys whose values differ, leaving out timings and paths (they differ by nature)."""
    skip = ("_s", "_seconds", "model_path", "base_model")
    same = lambda x, y: x == y or (x != x and y != y)  # noqa: E731 - NaN equals NaN here
    return sorted(k for k in set(a) | set(b) if not k.endswith(skip) and not same(a.get(k), b.get(k)))


def answer_files(run_dir: Path) -> dict[str, str]:
    return {
        p.relative_to(run_dir).as_posix(): files.sha256_file(p)
        for p in sorted(run_dir.rglob("*.jsonl"))
        if p.name in COMPARED and ".partial" not in p.as_posix()
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--after", type=float, default=5.0, help="seconds inside a stage before the kill")
    ap.add_argument("--stages", nargs="*", default=list(chain.STAGES), help="stages to kill inside")
    ap.add_argument("--no-reference", action="store_true", help="skip the uninterrupted comparison run")
    ap.add_argument("--reference-dir", help="compare with this finished run folder instead of running one")
    ap.add_argument("--out", default="runs/kill-drill")
    a = ap.parse_args(argv)
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "killed"
    profile = drill_profile(a.profile, run_dir, out / "killed.yaml")
    rows = []
    with open(out / "runner.log", "a") as log:
        for key in a.stages:
            stage = chain.stage_name(key)
            proc = runner(profile, log)
            where = wait_inside(run_dir, stage, a.after, proc)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                time.sleep(2.0)  # the kernel notices its runner is gone and stops
            rows.append({"stage": stage, "killed": where})
            print(f"{stage}: killed {where}", flush=True)
        t0 = time.time()
        rc = run_to_end(profile, log)
        rows.append({"stage": "final rerun", "killed": f"none; rc {rc}, {time.time() - t0:.0f} s"})
        print(f"final rerun: rc {rc}", flush=True)
        report = {"profile": a.profile, "after_s": a.after, "kills": rows, "final_rc": rc}
        report["all_stages_done"] = all((run_dir / s / chain.STATE_FILE).exists() for s in chain.STAGES)
        report["leftover_partials"] = sorted(p.name for p in run_dir.glob(f"*{chain.PARTIAL_SUFFIX}"))
        if a.reference_dir or not a.no_reference:
            ref_dir = Path(a.reference_dir) if a.reference_dir else out / "reference"
            ref_rc = (
                0
                if a.reference_dir
                else run_to_end(drill_profile(a.profile, ref_dir, out / "reference.yaml"), log)
            )
            s_k, s_r = summaries(run_dir), summaries(ref_dir)
            a_k, a_r = answer_files(run_dir), answer_files(ref_dir)
            report["reference_rc"] = ref_rc
            report["different_summary_values"] = {
                st: diff for st in s_r if (diff := differing(s_k.get(st) or {}, s_r[st] or {}))
            }
            report["answers_compared"] = len(a_r)
            report["different_answer_files"] = sorted(k for k in a_r if a_k.get(k) != a_r[k])
    files.write_json(out / "kill_drill.json", report)
    print(json.dumps(report, indent=2))
    ok = rc == 0 and report["all_stages_done"] and not report["leftover_partials"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
