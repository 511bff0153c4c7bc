"""Progress lines, throttling without a terminal, readable summaries, the quiet warning filters."""

from __future__ import annotations

import io
import json
import warnings

import pandas as pd

from magseg_nb import progress


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_status_file_round_trip_and_progress_line(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    monkeypatch.setattr(progress.time, "time", lambda: 1060.0)
    progress.write_status("training 03_sft/magseg", 10, 40, 1000.0, path=path, loss=0.51234, reward=None)
    status = progress.read_status(path)
    assert status["step"] == 10 and status["total"] == 40 and status["values"] == {"loss": 0.51234}
    line = progress.progress_line(status, now=1090.0)
    # 60 s for 10 steps -> 30 steps left take ~3 min
    assert line == "training 03_sft/magseg · step 10/40 · loss 0.512 · 1 min 30 s elapsed · ~3 min 00 s left"
    assert progress.read_status(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{half")
    assert progress.read_status(tmp_path / "bad.json") is None
    progress.write_status("x", 1, 2, 0.0, path=None)  # outside the runner: a no-op


def test_task_labels_name_the_work_not_the_scratch_folder(tmp_path, monkeypatch):
    """The training callback's task, as the progress line shows it: the proxy pretraining of the tiny
    model (trained in models/<base>-proxy-<hash>.partial/) and an SFT format (in 03_sft.partial/)."""
    from types import SimpleNamespace

    from magseg_nb import training

    status = tmp_path / "status.json"
    monkeypatch.setenv(progress.ENV, str(status))
    shown = {}
    for where in (
        "runs/demo/models/tiny-gemma3-proxy-0a1b2c3d4e.partial",
        "runs/demo/models/tiny-gemma3-5f6e7d-proxy-0a1b2c3d4e.partial",
        "runs/demo/03_sft.partial/magseg",
        "runs/demo/04_grpo.partial/text4seg",
    ):
        callback = training.log_callback(tmp_path / where / "log.csv")
        callback.on_train_begin(None, SimpleNamespace(global_step=0, max_steps=600), None)
        shown[where.split("/", 2)[2]] = progress.read_status(status)["task"]
    assert shown == {
        "models/tiny-gemma3-proxy-0a1b2c3d4e.partial": "proxy pretraining tiny-gemma3",
        "models/tiny-gemma3-5f6e7d-proxy-0a1b2c3d4e.partial": "proxy pretraining tiny-gemma3-5f6e7d",
        "03_sft.partial/magseg": "training 03_sft/magseg",
        "04_grpo.partial/text4seg": "training 04_grpo/text4seg",
    }
    assert progress.task_label("inference magseg-sft.partial/vn0") == "inference magseg-sft/vn0"
    assert progress.task_label("training models/x.partial") == "training models/x"


def test_plain_lines_at_most_every_30_s_without_a_terminal(tmp_path):
    path, clock, out = tmp_path / "s.json", Clock(), io.StringIO()
    rep = progress.Reporter("03_sft", path, stream=out, tty=False, clock=clock)
    assert rep.tick() is None  # no status yet
    for step in range(1, 8):
        path.write_text(
            json.dumps({"task": "t", "step": step, "total": 7, "started": 990, "updated": clock.t})
        )
        rep.tick()
        clock.t += 10
    lines = out.getvalue().splitlines()
    assert [line.split(" · ")[1] for line in lines] == [
        "step 1/7",
        "step 4/7",
        "step 7/7",
    ]  # t=1000, 1030, 1060
    rep.section("## not a heading change")
    rep.section("## not a heading change")
    assert out.getvalue().count("not a heading change") == 1


def test_a_terminal_redraws_one_line_and_clears_it_for_a_section(tmp_path):
    path, out = tmp_path / "s.json", io.StringIO()
    path.write_text(json.dumps({"task": "t", "step": 2, "total": 4, "started": 990, "updated": 1000}))
    rep = progress.Reporter("04_grpo", path, stream=out, tty=True, clock=Clock())
    rep.tick()
    rep.tick()
    rep.section("Evaluation")
    text = out.getvalue()
    assert text.count("\r\033[K[04_grpo] t · step 2/4") == 2 and "\n" not in text.split("Evaluation")[0]
    assert text.endswith("\r\033[K[04_grpo] Evaluation\n")


def test_inference_tile_counts_from_the_cells_output(tmp_path):
    out, clock = io.StringIO(), Clock()
    rep = progress.Reporter("05_inference", tmp_path / "none.json", stream=out, tty=False, clock=clock)
    rep.stdout("loading...\nin0: 8/24 tiles\n")
    clock.t += 12
    rep.stdout("in0: 16/24 tiles\n")
    line = rep.tick()
    assert "inference in0 · step 16/24" in line and "~6 s left" in line


def test_section_of_takes_the_last_heading():
    cells = [
        {"cell_type": "markdown", "source": "# 03 · SFT"},
        {"cell_type": "code", "source": "x = 1"},
        {"cell_type": "markdown", "source": "Some text\n## Train each format"},
        {"cell_type": "code", "source": "train()"},
    ]
    assert progress.section_of(cells, 1) == "03 · SFT"
    assert progress.section_of(cells, 3) == "Train each format"


def test_training_summary_lines_and_stopped_early_in_red():
    summary = {
        "magseg_steps": 12,
        "magseg_steps_planned": 40,
        "magseg_stopped_early": True,
        "magseg_train_seconds": 95.0,
        "magseg_val_valid_fraction": 0.875,
        "magseg_val_dice_others": 0.61,
        "magseg_val_dice_field": 0.7,
        "magseg_val_dice_tree": 0.0,
        "magseg_val_dice_water": float("nan"),
        "magseg_all_field_dice_field": 0.66,
        "magseg_pixel_dice_field": 0.95,
        "conclusions": ["**long interval line**", "magseg beats the all-field baseline on field."],
        "base_model": "/abs/path/model",
    }
    lines = progress.stage_lines("03_sft", summary, colour=True)
    assert lines[0] == "magseg: 12/40 steps in 1 min 35 s, well-formed answers 88%"
    assert lines[1] == f"{progress.RED}  magseg STOPPED EARLY (time budget): 12 of 40 steps{progress.RESET}"
    assert "    model            0.610 0.700 0.000 –" in lines
    assert "    all-field        – 0.660 – –" in lines and "    pixel classifier – 0.950 – –" in lines
    assert lines[-1] == "  magseg beats the all-field baseline on field."
    assert not any("/abs/path" in line or "long interval" in line for line in lines)
    assert progress.stopped_early(summary) == ["magseg"]


def test_generic_summary_leaves_out_paths_and_long_values():
    lines = progress.stage_lines(
        "02_instruction_format",
        {"model_path": "/work/x", "encoding": "rle", "n_conversations": {"magseg": 10}, "notes": ["a"] * 50},
    )
    assert lines == ["encoding rle, n_conversations magseg 10"]


def test_headline_rows_skip_wiring_checks(tmp_path):
    rows = [
        ("magseg-sft coarse", "mdice", 0.5),
        ("magseg-sft coarse", "iou_field", 0.4),
        ("magseg-sft refined (wiring check, random weights)", "mdice", 0.1),
        ("all-field", "mdice", 0.2),
    ]
    pd.DataFrame([{"method": m, "group": "all", "metric": k, "value": v} for m, k, v in rows]).to_csv(
        tmp_path / "metrics.csv", index=False
    )
    assert progress.headline_rows(tmp_path / "metrics.csv") == [
        ["magseg-sft coarse", "0.500", "0.400", "–"],
        ["all-field", "0.200", "–", "–"],
    ]


def test_known_noise_is_filtered_and_other_warnings_still_show():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        progress.quiet_known_noise()
        warnings.warn(
            "`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn("something real happened", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something real happened"]
