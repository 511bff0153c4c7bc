"""JupyterLab's Run All on a fresh clone: every notebook, in order, executed by nbclient (no papermill,
no injected parameters) from the notebooks/ folder, after the command line ran the first stages.

A fresh clone's defaults are the demo profile (minutes of training); to keep this test short, the
copied notebooks' parameters cells are edited to the smoke profile's values, as a student would edit
them, and nothing else changes.
"""

from __future__ import annotations

import ast
import os
import shutil
import time
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _set_defaults(source: str, values: dict) -> str:
    """The parameters cell with ``values`` written in place of the defaults (comments kept)."""
    lines = source.splitlines()
    for node in ast.parse(source).body:
        name = node.targets[0].id
        if name in values:
            line = lines[node.lineno - 1]
            comment = line[line.index("#") :] if "#" in line[node.end_col_offset :] else ""
            lines[node.lineno - 1] = f"{name} = {values[name]!r}" + (f"  {comment}" if comment else "")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    repo = tmp_path_factory.mktemp("clone")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    shutil.copytree(ROOT / "profiles", repo / "profiles")
    (repo / "notebooks").mkdir()
    smoke = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    for src in sorted((ROOT / "notebooks").glob("0[1-6]_*.ipynb")):
        nb = nbformat.read(src, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        values = {**smoke["common"], "run_dir": "runs/demo", "profile": "demo"}
        values.update(smoke["stages"].get(src.stem) or {})
        cell.source = _set_defaults(cell.source, values)
        nbformat.write(nb, repo / "notebooks" / src.name)
    (repo / "profiles" / "demo.yaml").write_text(
        yaml.safe_dump({**smoke, "common": {**smoke["common"], "profile": "demo", "run_dir": "runs/demo"}})
    )
    return repo


@pytest.mark.slow
def test_run_all_in_each_notebook_after_the_command_line(clone, monkeypatch):
    from nbclient import NotebookClient

    from magseg_nb import chain

    monkeypatch.chdir(clone)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The run key hashes the package's source: in a working tree edited while this test runs, the
    # command line's rerun would see "package code changed". Hash it once, as in a finished clone.
    fingerprints = {}
    original = chain._code_fingerprint
    monkeypatch.setattr(chain, "_code_fingerprint", lambda nb: fingerprints.setdefault(nb, original(nb)))
    t0 = time.time()
    records = chain.run_chain("demo", stop="02", log=lambda *_: None, stream=open(os.devnull, "w"))
    print(f"command line 01-02: {time.time() - t0:.0f} s")
    assert [r["status"] for r in records] == ["ran", "ran"]
    run = clone / "runs" / "demo"
    before = {
        s: chain.read_state(run / s)["fingerprint"] for s in ("01_dataset_prep", "02_instruction_format")
    }

    monkeypatch.chdir(clone / "notebooks")  # where JupyterLab starts a notebook's kernel
    for name in ("03_sft", "04_grpo", "05_inference", "06_metrics"):
        path = clone / "notebooks" / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        t0 = time.time()
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        ).execute()
        print(f"Run All {name}: {time.time() - t0:.0f} s")
        assert chain.read_state(run / name) is not None, name
        assert not (run / f"{name}.partial").exists()
    # The stages run by the command line were reused as they were, not redone.
    assert {s: chain.read_state(run / s)["fingerprint"] for s in before} == before
    assert (
        chain.read_state(run / "03_sft")["inputs"]["02_instruction_format"] == before["02_instruction_format"]
    )
    assert (run / "06_metrics" / "map.html").exists()
    # And the command line now finds the notebooks' stages finished: a rerun of 01-02 skips.
    monkeypatch.chdir(clone)
    logs = []
    again = chain.run_chain("demo", stop="02", log=logs.append, stream=open(os.devnull, "w"))
    assert [r["status"] for r in again] == ["skipped", "skipped"], logs
    assert "[01_dataset_prep] skipped: up to date" in logs
