"""Shared fixtures. `smoke_run` executes the whole notebook chain once per test session;
`synthetic_run` and `small_scene` are built once per session by tests/fixtures.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests import fixtures

ROOT = Path(__file__).resolve().parents[1]

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """Run `magseg-nb run` on the smoke profile into a fresh folder; returns that run folder.

    Stages whose notebook does not exist yet are simply not run; tests that need one check for it.
    """
    from magseg_nb import chain

    run_dir = tmp_path_factory.mktemp("smoke") / "runs" / "smoke"
    profile = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    profile["common"]["run_dir"] = str(run_dir)
    path = run_dir.parent / "smoke.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(profile))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        chain.run_chain(str(path), log=print)
    finally:
        os.chdir(cwd)
    return run_dir


def stage_dir(run_dir: Path, stage: str) -> Path:
    path = run_dir / stage
    if not (path / "state.json").exists():
        pytest.fail(f"the smoke chain did not produce {stage}")
    return path


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> Path:
    """A tiny run folder (01 scenes + baselines, 05 variants); shared, so tests must not modify it."""
    return fixtures.make_synthetic_run(tmp_path_factory.mktemp("synthetic") / "runs" / "syn")


@pytest.fixture(scope="session")
def small_scene():
    """One generated 256 px landscape (tests/fixtures.small_scene)."""
    return fixtures.small_scene()
