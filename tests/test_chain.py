"""The chain runner on two throwaway notebooks in a temporary repo (real papermill, real kernel)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
import yaml

from magseg_nb import chain

STAGE_CODE = """
from pathlib import Path
from magseg_nb.chain import Stage, collect_params
PARAMS = collect_params(globals())
stage = Stage.start("{name}", PARAMS, needs={needs})
{body}
stage.finish(summary={{"value": value}})
"""


def _notebook(path: Path, name: str, needs: list[str], body: str, params: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# {name}"),
        nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(STAGE_CODE.format(name=name, needs=needs, body=body)),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "profiles").mkdir()
    params = 'run_dir = "runs/t"\nprofile = "t"\nseed = 0\nscale = 2\nfail = False\n'
    _notebook(
        tmp_path / "notebooks" / "01_dataset_prep.ipynb",
        "01_dataset_prep",
        [],
        'value = seed * scale\n(stage.dir / "data.txt").write_text(str(value))',
        params,
    )
    _notebook(
        tmp_path / "notebooks" / "02_instruction_format.ipynb",
        "02_instruction_format",
        ["01_dataset_prep"],
        'value = int((stage.input("01_dataset_prep") / "data.txt").read_text()) + 1\n'
        '(stage.dir / "half.txt").write_text("x")\n'
        'assert not fail, "asked to fail"\n'
        '(stage.dir / "out.txt").write_text(str(value))',
        params,
    )
    profile = {
        "description": "test",
        "common": {"profile": "t", "run_dir": "runs/t", "seed": 3},
        "stages": {},
    }
    (tmp_path / "profiles" / "t.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _set_profile(repo: Path, **stages) -> None:
    path = repo / "profiles" / "t.yaml"
    data = yaml.safe_load(path.read_text())
    data["stages"] = stages
    path.write_text(yaml.safe_dump(data))


def test_runs_in_order_then_skips_and_reruns_on_change(repo):
    records = chain.run_chain("t", log=lambda *_: None)
    assert [r["status"] for r in records] == ["ran", "ran"]
    run = repo / "runs" / "t"
    assert (run / "01_dataset_prep" / "data.txt").read_text() == "6"  # seed 3 from common * scale 2
    assert (run / "02_instruction_format" / "out.txt").read_text() == "7"
    state = json.loads((run / "02_instruction_format" / "state.json").read_text())
    assert state["summary"] == {"value": 7}
    assert state["inputs"]["01_dataset_prep"] == chain.read_state(run / "01_dataset_prep")["fingerprint"]
    assert set(state["outputs"]) == {"half.txt", "out.txt"}
    assert (run / "notebooks" / "02_instruction_format.ipynb").exists()
    assert not list(run.glob("*.partial"))

    assert [r["status"] for r in chain.run_chain("t", log=lambda *_: None)] == ["skipped", "skipped"]

    # A parameter change in stage 01 reruns it, and 02 because its input changed.
    _set_profile(repo, **{"01": {"scale": 5}})
    assert [r["status"] for r in chain.run_chain("t", log=lambda *_: None)] == ["ran", "ran"]
    assert (run / "02_instruction_format" / "out.txt").read_text() == "16"


def test_failed_stage_keeps_the_last_good_output(repo):
    chain.run_chain("t", log=lambda *_: None)
    run = repo / "runs" / "t"
    _set_profile(repo, **{"02": {"fail": True}})
    with pytest.raises(chain.StageError, match=r"\[02_instruction_format\] failed .*asked to fail"):
        chain.run_chain("t", start="02", log=lambda *_: None)
    assert (run / "02_instruction_format" / "out.txt").read_text() == "7"  # untouched
    partial = run / "02_instruction_format.partial"
    assert (partial / "half.txt").exists() and not (partial / "out.txt").exists()


def test_missing_previous_stage_names_the_notebook_to_run(repo):
    with pytest.raises(chain.StageError, match=r"run notebook 01_dataset_prep.ipynb first"):
        chain.run_chain("t", start="02", log=lambda *_: None)


def test_changed_output_of_previous_stage_is_detected(repo):
    chain.run_chain("t", log=lambda *_: None)
    (repo / "runs" / "t" / "01_dataset_prep" / "data.txt").write_text("123456")
    fresh, why = chain.is_up_to_date(repo / "runs" / "t", "01_dataset_prep", "any")
    assert not fresh
    with pytest.raises(chain.StageError, match="incomplete or was changed"):
        chain.run_chain("t", start="02", force=True, log=lambda *_: None)


def test_profile_key_unknown_to_the_notebook_is_an_error(repo):
    _set_profile(repo, **{"01": {"tile_size": 3}})
    with pytest.raises(chain.StageError, match=r"stages.01_dataset_prep sets \['tile_size'\]"):
        chain.run_chain("t", log=lambda *_: None)


def test_unknown_profile_lists_the_known_ones(repo):
    with pytest.raises(chain.StageError, match=r"no profile 'nope'.*known profiles: t"):
        chain.load_profile("nope")


def test_stage_names_and_params():
    assert chain.stage_name("3") == "03_sft"
    assert chain.stage_name("05_inference") == "05_inference"
    with pytest.raises(chain.StageError, match="unknown stage"):
        chain.stage_name("09")
    ns = {"a": 1, "b": (1, 2), "_x": 2, "In": [], "f": print, "os": os}
    assert chain.collect_params(ns) == {"a": 1, "b": [1, 2]}


def test_partial_folder_is_kept_only_for_the_same_parameters(tmp_path):
    params = {"run_dir": str(tmp_path), "lr": 1}
    first = chain.Stage.start("03_sft", params)
    (first.dir / "checkpoint.bin").write_text("x")
    assert (chain.Stage.start("03_sft", params).dir / "checkpoint.bin").exists()
    assert not (chain.Stage.start("03_sft", {**params, "lr": 2}).dir / "checkpoint.bin").exists()
