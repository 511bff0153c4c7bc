"""The README's results section is generated from a run folder: round trip, idempotence, clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from magseg_nb import report

from .fixtures import write_state


def _long(rows):
    return pd.DataFrame(
        [
            {"metric": m, "value": v, "lo": v - 0.05, "hi": v + 0.04, "n_tiles": 40, "n_units": 9, **keys}
            for keys, values in rows
            for m, v in values.items()
        ]
    )


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "runs" / "demo"
    write_state(run / "01_dataset_prep", {})
    (run / "01_dataset_prep" / "results.json").write_text(
        json.dumps(  # the layout chain.Stage.finish writes
            {
                "git": {"commit": "abc1234", "dirty": False},
                "cpu": {"model": "AMD EPYC", "os_cpu_count": 2, "torch_threads": None},
                "profile": "demo",
                "seed": 0,
            }
        )
    )
    write_state(
        run / "03_sft",
        {
            "magseg_steps": 373,
            "magseg_steps_planned": 800,
            "magseg_stopped_early": True,
            "magseg_train_seconds": 300.0,
            "magseg_val_valid_fraction": 0.975,
            "conclusions": [
                "magseg beats the strongest simple baseline (pixel classifier baseline) on tree."
            ],
        },
        started=200.0,
        finished=700.0,
    )
    dice = {
        "dice_field": 0.912,
        "dice_tree": 0.871,
        "dice_water": 0.854,
        "dice_others": 0.866,
        "mdice": 0.876,
    }
    _long(
        [
            ({"format": "magseg", "scorer": "model", "answers": "all"}, dice),
            (
                {"format": "magseg", "scorer": "pixel classifier baseline", "answers": "all"},
                {"dice_tree": 0.801},
            ),
        ]
    ).to_csv(run / "03_sft" / "eval_table.csv", index=False)
    write_state(
        run / "06_metrics", {"n_tiles": 40, "n_blocks": 9, "reading": ["**GRPO after SFT**: not resolved."]}
    )
    _long(
        [({"method": "magseg-sft coarse", "group": "all"}, {"dice_field": 0.733, "inst_f1": 0.412})]
    ).to_csv(run / "06_metrics" / "metrics.csv", index=False)
    return run


def test_the_section_round_trips_the_run_folders_numbers(run_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n\n{report.BEGIN}\nold numbers 0.111\n{report.END}\n\n## after\n")
    report.update_readme(readme, report.results_section(run_dir))
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# x\n\nintro") and text.endswith("## after\n")
    section = text[text.index(report.BEGIN) : text.index(report.END)]
    assert (
        "commit `abc1234`" in section
        and "2 CPU cores (AMD EPYC); torch" in section
        and "torch 2.14.1" in section
    )
    assert "0.912 [0.862, 0.952]" in section and "0.871 [0.821, 0.911]" in section  # from eval_table.csv
    assert "373 of 800 steps (**stopped early by a time budget**), 300 s; well-formed" in section
    assert "well-formed answers 97.5 %" in section
    assert "- magseg beats the strongest simple baseline (pixel classifier baseline) on tree." in section
    assert "40 test tiles in 9 blocks" in section and "0.412 [0.362, 0.452]" in section
    assert "01 60 s, 03 500 s, 06 60 s (620 s in all)" in section
    # Regenerating from the same folder changes nothing.
    before = readme.read_text()
    report.update_readme(readme, report.results_section(run_dir))
    assert readme.read_text() == before


def test_the_steps_line_says_whether_sft_ran_compiled_and_in_bf16(run_dir):
    """Read from the training's own train_done.json; a run without one says nothing rather than guess."""
    (run_dir / "03_sft" / "magseg").mkdir()
    done = run_dir / "03_sft" / "magseg" / "train_done.json"
    done.write_text(json.dumps({"steps": 373, "torch_compile": True, "cpu_autocast": False}))
    assert "373 of 800 steps (**stopped early by a time budget**), 300 s, compiled, float32; well-formed" in (
        report.results_section(run_dir)
    )
    done.write_text(json.dumps({"steps": 373, "torch_compile": False, "cpu_autocast": True}))
    assert report.numerics(run_dir, "magseg") == "bf16 autocast"
    assert report.numerics(run_dir, "text4seg") is None


def test_the_section_says_how_the_scored_answers_were_made(run_dir):
    assert "conversation (greedy answers), beside" in report.results_section(run_dir)
    for stage, summary in [("03_sft", {}), ("05_inference", {})]:
        write_state(run_dir / stage, summary, params={"profile": "demo", "seed": 0, "test_views": 4})
    section = report.results_section(run_dir)
    assert "(greedy answers, each voted per cell over 4 views of its tile (`test_views`)), beside" in section
    assert "The well-formed share is the plain view's." in section
    assert "coarse masks from greedy answers, each voted per cell over 4 views of its tile" in section
    assert report.answers_phrase(1) == report.answers_phrase(None) == "greedy answers"


def test_missing_markers_and_missing_runs_give_one_clear_line(run_dir, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        report.update_readme(readme, "x")
    assert readme.read_text() == "# no markers\n"
    assert report.main(["--run-dir", str(tmp_path / "nowhere"), "--readme", str(readme)]) == 1
    assert "holds no finished stage: run the chain first" in capsys.readouterr().out


def test_the_command_copies_the_pictures_and_links_them(run_dir, tmp_path):
    figures = run_dir / "06_metrics" / "figures"
    figures.mkdir(parents=True)
    (figures / "headline.png").write_bytes(b"\x89PNG headline")
    (figures / "map.png").write_bytes(b"\x89PNG map")
    readme = tmp_path / "repo" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"{report.BEGIN}\n{report.END}\n")
    assert report.main(["--run-dir", str(run_dir), "--readme", str(readme)]) == 0
    assert (tmp_path / "repo" / "docs" / "figures" / "map.png").read_bytes() == b"\x89PNG map"
    text = readme.read_text()
    assert "![headline](docs/figures/headline.png)" in text and "![map](docs/figures/map.png)" in text


def test_robustness_runs_get_one_row_each(run_dir, tmp_path):
    import shutil

    other = tmp_path / "runs" / "check-seed1"
    shutil.copytree(run_dir, other)
    write_state(
        other / "03_sft", {"magseg_val_valid_fraction": 0.5}, params={"profile": "check-seed1", "seed": 1}
    )
    write_state(
        other / "04_grpo", {"magseg_grpo_change_mdice": 0.031, "magseg_grpo_change_mdice_ci": [0.012, 0.05]}
    )
    pd.DataFrame(
        [
            (
                "vs classical watershed",
                "watershed baseline",
                "magseg-sft refined",
                "inst_f1",
                0.104,
                0.026,
                0.187,
            ),
            ("vs classical watershed", "watershed baseline", "magseg-grpo refined", "inst_f1", 0.2, 0.1, 0.3),
            ("Refinement", "magseg-sft coarse", "magseg-sft refined", "iou_field", 0.015, 0.009, 0.023),
        ],
        columns=["question", "method_a", "method_b", "metric", "diff", "lo", "hi"],
    ).to_csv(other / "06_metrics" / "ablation.csv", index=False)
    pixel = {"dice_field": 0.95, "dice_tree": 0.9, "dice_water": 0.581, "dice_others": 0.93, "mdice": 0.84}
    model = pd.read_csv(other / "03_sft" / "eval_table.csv").query("scorer == 'model'")
    pd.concat(
        [
            model,
            _long([({"format": "magseg", "scorer": "pixel classifier baseline", "answers": "all"}, pixel)]),
        ]
    ).to_csv(other / "03_sft" / "eval_table.csv", index=False)
    lines = report.checks_section([other, tmp_path / "missing"], main_run=run_dir)
    table = "\n".join(lines)
    assert lines[0].startswith("### Every landscape side by side") and table.count("| check-seed1 | 1 |") == 1
    assert "0.871 [0.821, 0.911]" in table and "50.0 %" in table and "0.031 [0.012, 0.050]" in table
    rows = [line for line in table.splitlines() if line.startswith("| demo") or line.startswith("| check")]
    assert [r.split(" | ")[0] for r in rows] == ["| demo", "| check-seed1"]  # the main run first
    row = rows[1]
    assert "| water 0.854 | n/a |" in row  # its lowest class; no answers here to pair with the classifier
    assert row.endswith("| 0.104 [0.026, 0.187] | 0.015 [0.009, 0.023] |")  # the SFT row, not GRPO's
    assert "| 0.950 / 0.900 / 0.581 / 0.930 (0.840) |" in row  # the baseline per class, not only its mean
    # a run that stopped before notebook 06 says so instead of leaving the columns out
    assert report.changes_on_test_tiles(run_dir) == {
        "test field-instance F1 vs watershed": "n/a",
        "test field IoU, refined - coarse": "n/a",
    }


def test_the_study_section_shows_runs_and_generated_findings(run_dir):
    study = run_dir / "07_resolution_study"
    finding = (
        "mdice, MAgSeg - Text4Seg per effective resolution: 8 cells +0.014 [-0.078, +0.093] (not resolved)"
    )
    write_state(study, {"findings": ["REDUCED BUDGET: 40 steps", finding]})
    pd.DataFrame(
        {"run": ["magseg_r8_crop", "text4seg_r8"], "fmt": ["magseg", "text4seg"], "resolution": [8, 8],
         "steps": [40, 40], "well_formed": [0.5, 0.25], "answer_tokens_per_tile": [100.0, 72.5],
         "train_seconds": [49.2, 33.4], "generate_seconds_per_tile": [0.3, 0.212]}
    ).to_csv(study / "runs.csv", index=False)  # fmt: skip
    text = report.results_section(run_dir)
    block = text.split("### Resolution study and context ablation (notebook 07)")[1]
    assert "| magseg_r8_crop | 8 | 40 | 0.500 | 100.000 | 49.200 | 0.300 |" in block
    assert "| run | cells / tile side | steps | well-formed |" in block
    assert f"- {finding}" in block and "- REDUCED BUDGET: 40 steps" in block
    assert report.study_section(run_dir.parent / "none") == []


def test_the_standing_against_the_classifier_comes_from_the_paired_block_intervals(tmp_path):
    """The model answers perfectly, the classifier calls every pixel field: ahead on field and tree only."""
    import shutil

    from .test_validation import _fake_run

    run01, val, answers = _fake_run(tmp_path / "run")
    run = run01.parent
    shutil.move(val, run / "02_instruction_format" / "magseg_val.jsonl")
    (run / "03_sft" / "magseg").mkdir(parents=True)
    shutil.copy(answers, run / "03_sft" / "magseg" / "answers.jsonl")
    write_state(run / "03_sft", {}, params={"n_boot": 200, "ci": 0.95, "seed": 3})
    assert report.classifier_standing(run) == (
        "ahead on field +0.333 [+0.333, +0.333], tree +1.000 [+1.000, +1.000]; level on the rest"
    )
    all_field = [json.loads(line) for line in answers.read_text().splitlines()]
    for row in all_field:
        row["answer"] = "\n".join(["field|field|field|field"] * 4)
    (run / "03_sft" / "magseg" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_field))
    assert report.classifier_standing(run) == "level on every class"  # the same answers as the classifier
    assert report.classifier_standing(run, "text4seg") == "n/a"


def test_a_landscapes_other_sft_seeds_get_a_row_each_and_a_sentence_over_them(tmp_path):
    """Notebook 03's seed 3 answers perfectly; the spread's seed 5 calls every cell field, as the
    classifier does, with 3 of 12 answers malformed: a row per seed, each with its own standing."""
    import json as _json
    import shutil

    from magseg_nb import seed_spread

    from .test_validation import _fake_run

    run01, val, answers = _fake_run(tmp_path / "check-seed1")
    run, run02 = run01.parent, run01.parent / "02_instruction_format"
    shutil.move(val, run02 / "magseg_val.jsonl")
    write_state(
        run / "03_sft", {"magseg_val_valid_fraction": 1.0}, params={"n_boot": 200, "ci": 0.95, "seed": 3}
    )
    assert seed_spread.seed_answers(run, 3) == run / "03_sft" / "magseg" / "answers.jsonl"
    assert seed_spread.seed_answers(run, 5) == run / "seed_spread" / "seed_5" / "magseg" / "answers.jsonl"
    seed_spread.seed_answers(run, 3).parent.mkdir(parents=True)
    shutil.copy(answers, seed_spread.seed_answers(run, 3))
    rows = [_json.loads(line) for line in answers.read_text().splitlines()]
    for k, row in enumerate(rows):
        row["answer"], row["valid"] = "\n".join(["field|field|field|field"] * 4), k % 4 != 0
    seed_spread.seed_answers(run, 5).parent.mkdir(parents=True)
    seed_spread.seed_answers(run, 5).write_text("".join(_json.dumps(r) + "\n" for r in rows))
    spread = pd.concat(
        seed_spread.seed_scores(run01, run02, seed_spread.seed_answers(run, s), "magseg", 200, s).assign(
            seed=s, steps=50
        )
        for s in (3, 5)
    )
    spread.to_csv(run / "seed_spread" / "seed_spread.csv", index=False)
    scores = spread.query("seed == 3").assign(format="magseg")
    scores.to_csv(run / "03_sft" / "eval_table.csv", index=False)

    lines = report.checks_section([run])
    table = [line for line in "\n".join(lines).splitlines() if line.startswith("| check-seed1")]
    assert [r.split(" | ")[1] for r in table] == ["3", "5"]  # notebook 03's seed first
    assert "| 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |" in table[0]
    assert (
        "ahead on field +0.333 [+0.333, +0.333], tree +1.000 [+1.000, +1.000]; level on the rest" in table[0]
    )
    assert "| 0.667 [0.667, 0.667] | 0.000 [0.000, 0.000] |" in table[1]
    assert "| tree 0.000 | level on every class | 75.0 % | n/a | n/a | n/a |" in table[1]
    assert lines[-2] == (
        "- check-seed1, SFT seeds 3, 5: mean Dice 0.333 to 1.000; "
        "ahead of the pixel classifier on field at 1 of 2 seeds, tree at 1 of 2 seeds."
    )
    seeds = [line for line in "\n".join(report.seeds_section(run)).splitlines() if line.startswith("| ")]
    assert seeds[0].endswith("| vs the pixel classifier (paired) |") and len(seeds) == 4
    assert seeds[2].startswith("| 3 |") and "| ahead on field +0.333 [+0.333, +0.333], tree" in seeds[2]
    assert seeds[3].startswith("| 5 |") and seeds[3].endswith(
        "| 0.333 [0.333, 0.333] | 0.500 [0.500, 0.500] | level on every class |"
    )
