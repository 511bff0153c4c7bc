"""The whole notebook chain runs with papermill on the smoke profile (what CI proves end to end)."""

from __future__ import annotations

import json

import nbformat
import pytest

from magseg_nb import chain

from .conftest import stage_dir

pytestmark = pytest.mark.slow


def test_every_stage_ran_and_left_state_and_executed_notebook(smoke_run):
    for stage in chain.STAGES:
        folder = stage_dir(smoke_run, stage)
        state = json.loads((folder / "state.json").read_text())
        assert state["stage"] == stage
        assert state["outputs"], f"{stage} listed no outputs"
        assert chain.outputs_intact(folder, state)
        assert state["params"]["profile"] == "smoke"
        executed = nbformat.read(smoke_run / "notebooks" / f"{stage}.ipynb", as_version=4)
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and "smoke" in injected[0].source
    assert not list(smoke_run.glob("*.partial"))


def test_a_second_run_skips_everything(smoke_run):
    path = smoke_run.parent / "smoke.yaml"
    records = chain.run_chain(str(path), log=lambda *_: None)
    assert [r["status"] for r in records] == ["skipped"] * len(chain.STAGES)


def test_the_resolution_study_trained_and_scored_every_run(smoke_run):
    import pandas as pd

    folder = stage_dir(smoke_run, "07_resolution_study")
    runs = pd.read_csv(folder / "runs.csv")
    assert sorted(runs["run"]) == [
        "magseg_r4_crop",
        "magseg_r4_crop_only",
        "magseg_r8_crop",
        "text4seg_r4",
        "text4seg_r8",
    ]
    assert set(runs["steps"]) == {2} and not runs["stopped_early"].any()  # equal steps, none cut
    assert runs.set_index("run").loc["magseg_r8_crop", "conversations_per_tile"] == 16
    findings = json.loads((folder / "state.json").read_text())["summary"]["findings"]
    assert findings[0].startswith("REDUCED BUDGET: 2 optimizer steps per run")
    assert findings[1].startswith("mdice, MAgSeg - Text4Seg per effective resolution: 4 cells ")
    assert any(f.startswith("Without the tile (crop_only)") for f in findings)
    assert {p.name for p in (folder / "figures").iterdir()} == {"resolution.png", "context.png"}


def test_each_format_writes_its_own_encoding(smoke_run):
    """The profile's 02 encodings reach the conversations and formats.json (MAgSeg plain, Text4Seg R-RLE)."""
    from magseg_nb import prompts

    run02 = stage_dir(smoke_run, "02_instruction_format")
    formats = prompts.read_formats(run02)
    assert (formats["magseg"]["encoding"], formats["text4seg"]["encoding"]) == ("plain", "rle")
    summary = json.loads((run02 / "state.json").read_text())["summary"]
    assert summary["encoding"] == {"magseg": "plain", "text4seg": "rle"}
    for fmt, star in (("magseg", False), ("text4seg", True)):
        rows = prompts.read_jsonl(run02 / f"{fmt}_train.jsonl")
        answers = [r["completion"][0]["content"][0]["text"] for r in rows]
        assert answers and all((" *" in a) == star for a in answers), answers[:2]
        assert all(r["encoding"] == formats[fmt]["encoding"] for r in rows)


def test_test_time_views_reach_every_stage(smoke_run):
    """The smoke profile asks for 4 views in 03-05: each stage's answers or summary record them."""
    for stage, fmt in (("03_sft", "magseg"), ("03_sft", "text4seg"), ("04_grpo", "magseg")):
        folder = stage_dir(smoke_run, stage) / fmt
        assert json.loads((folder / "eval.json").read_text())["test_views"] == 4
        rows = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
        assert rows and all(r["views"] == 4 and isinstance(r["plain_answer"], str) for r in rows)
    summary = json.loads((stage_dir(smoke_run, "05_inference") / "state.json").read_text())["summary"]
    assert {k: v for k, v in summary.items() if k.endswith("_test_views")} == {
        "magseg-sft_test_views": 4,
        "magseg-grpo_test_views": 4,
        "text4seg-sft_test_views": 4,
    }
