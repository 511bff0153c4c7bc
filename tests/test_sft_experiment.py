"""scripts/sft_experiment.py: its overrides and its refusal of a run folder that is not ready (the
training and scoring it calls are tested in test_training / test_validation)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("sft_experiment", ROOT / "scripts" / "sft_experiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overrides_are_read_as_yaml_values():
    script = _script()
    got = script.parse_overrides(["max_steps=2400", "learning_rate=1e-3", "bf16=false", "formats=[a, b]"])
    assert got == {"max_steps": 2400, "learning_rate": 0.001, "bf16": False, "formats": ["a", "b"]}
    with pytest.raises(SystemExit, match=r"--set 'max_steps': expected key=value"):
        script.parse_overrides(["max_steps"])


def test_a_run_without_stage_02_is_refused_before_any_training(tmp_path):
    script = _script()
    (tmp_path / "run" / "01_dataset_prep").mkdir(parents=True)
    (tmp_path / "run" / "01_dataset_prep" / "state.json").write_text("{}")
    with pytest.raises(
        SystemExit, match=r"02_instruction_format is not a finished stage: run `magseg-nb run"
    ):
        script.main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
