"""Validation scoring of notebooks 03/04: the model and the baselines on the same cells, block intervals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from rasterio.crs import CRS
from rasterio.transform import from_origin

from magseg_nb import geo, textgrid, training, validation

F, T, W = 1, 2, 3  # field, tree, water


def _fake_run(tmp_path, n_blocks: int = 6):
    """Two tiles per block; each tile 8x8 px, one Text4Seg-style row per tile on a 4x4 grid.

    Truth: left half field, right half tree. The model answers perfectly; the pixel classifier
    (a GeoTIFF per tile, as notebook 01 writes it) calls everything field.
    """
    run01, run02 = tmp_path / "01_dataset_prep", tmp_path / "02_instruction_format"
    run02.mkdir(parents=True)
    tiles, rows, answers = [], [], []
    gt = np.full((4, 4), F)
    gt[:, 2:] = T
    for b in range(n_blocks):
        for k in range(2):
            tid = f"t{b}_{k}"
            tiles.append({"tile_id": tid, "block_id": f"b{b}"})
            rows.append({"id": tid, "tile_id": tid, "grid": 4, "patch_row": None, "gt_mask": gt.tolist()})
            answers.append({"id": tid, "answer": textgrid.encode(gt, "rle"), "valid": True})
            geo.write_geotiff(
                run01 / "pixel_baseline" / "tiles" / f"{tid}.tif",
                np.full((8, 8), F, np.uint8),
                CRS.from_epsg(32648),
                from_origin(500000, 1000, 1, 1),
                nodata=255,
            )
    pd.DataFrame(tiles).to_csv(run01 / "tiles.csv", index=False)
    (run02 / "x_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return run01, run02 / "x_val.jsonl", tmp_path / "answers.jsonl"


def test_model_and_baselines_are_scored_on_the_same_cells(tmp_path):
    run01, val, answers = _fake_run(tmp_path)
    frames = validation.answer_frames(val, answers, run01)
    assert set(frames) == {validation.MODEL, validation.ALL_FIELD, validation.PIXEL}
    for df in frames.values():
        assert list(df["id"]) == [f"t{b}_{k}" for b in range(6) for k in range(2)]
        assert df["block_id"].nunique() == 6 and df.filter(like="cm_").to_numpy().sum(1).tolist() == [16] * 12
    model = frames[validation.MODEL].iloc[0]
    assert model["cm_1_1"] == 8 and model["cm_2_2"] == 8 and model["cm_2_1"] == 0
    pixel = frames[validation.PIXEL].iloc[0]
    assert pixel["cm_1_1"] == 8 and pixel["cm_2_1"] == 8  # tree cells called field
    table = validation.score_frames(frames, n_boot=100).set_index(["scorer", "metric"])["value"]
    assert table[validation.MODEL, "dice_tree"] == 1.0 and table[validation.PIXEL, "dice_tree"] == 0.0
    assert table[validation.PIXEL, "dice_field"] == pytest.approx(2 * 8 / (8 + 16))
    assert np.isnan(table[validation.MODEL, "dice_water"])  # absent on both sides


def test_conclusions_claim_only_what_the_block_interval_shows(tmp_path):
    run01, val, answers = _fake_run(tmp_path)
    frames = validation.answer_frames(val, answers, run01)
    versus = {
        ("magseg", validation.PIXEL): validation.compare(
            frames[validation.PIXEL], frames[validation.MODEL], 200
        )
    }
    lines = validation.conclusions(versus, ["magseg stopped early: 3 of 8 steps (a time budget fired)."])
    assert lines[0].startswith("magseg stopped early")
    assert (
        "ahead on field" in lines[1] and "tree +1.000 [+1.000, +1.000]" in lines[1] and "6 blocks" in lines[1]
    )
    assert lines[-1].startswith(
        "magseg beats the strongest simple baseline (pixel classifier baseline) on field, tree"
    )
    # Without the pixel classifier no "learned the landscape" claim is made at all.
    only_all_field = {("magseg", validation.ALL_FIELD): versus["magseg", validation.PIXEL]}
    assert "no claim" in validation.conclusions(only_all_field)[-1]
    same = validation.compare(frames[validation.MODEL], frames[validation.MODEL], 50)
    assert set(validation.change_sentences(same, "b", "a")[0].split(": ")[-1:]) == {
        "no change this data can resolve."
    }


def test_model_changes_pair_two_answer_files_on_the_same_cells(tmp_path):
    run01, val, answers = _fake_run(tmp_path)
    all_field = tmp_path / "all_field.jsonl"
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    all_field.write_text(
        "".join(json.dumps(r | {"answer": textgrid.encode(np.full((4, 4), F), "rle")}) + "\n" for r in rows)
    )
    ref = validation.answer_frames(val, answers, run01)
    lines = validation.model_changes(ref, validation.answer_frames(val, all_field, run01), "B", "A", 200)
    tree = next(line for line in lines if line.startswith("dice_tree"))
    assert tree.startswith("dice_tree: B 0.000 vs A 1.000, change -1.000 [-1.000, -1.000]")
    assert tree.endswith("worsened.")
    assert all(
        line.endswith("no change this data can resolve.")
        for line in validation.model_changes(ref, ref, "B", "A", 50)
    )


def test_well_formed_subset_selects_the_same_rows_for_every_scorer(tmp_path):
    run01, val, answers = _fake_run(tmp_path)
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    rows[0]["valid"] = False
    rows[0]["answer"] = "tree *4\ntree *4\ntree *4\ntree *4"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    frames = validation.answer_frames(val, answers, run01)
    assert validation.valid_share(frames) == pytest.approx(11 / 12)
    wf = validation.score_frames(frames, n_boot=20, well_formed_only=True)
    assert (wf["n_tiles"] == 11).all() and (wf["answers"] == "well-formed").all()
    everything = validation.score_frames(frames, n_boot=20).set_index(["scorer", "metric"])["value"]
    assert everything[validation.MODEL, "dice_tree"] < 1.0  # the repaired answer is scored as decoded


def test_steps_planned_and_done_are_flagged():
    results = {
        "magseg": {"steps": 373, "steps_planned": 800, "stopped_early": True, "train_seconds": 300.0},
        "text4seg": {"steps": 600, "steps_planned": 600, "stopped_early": False, "train_seconds": 380.0},
    }
    table = training.runs_table(results)
    assert table.loc[0, ["steps_planned", "steps_done"]].tolist() == [800, 373]
    notes = training.steps_warnings(table)
    assert notes[0] == "magseg stopped early: 373 of 800 steps (a time budget fired)."
    assert "did not train for the same number of steps (magseg 373, text4seg 600)" in notes[1]
    even = {k: {**v, "steps": 600, "steps_planned": 600, "stopped_early": False} for k, v in results.items()}
    assert training.steps_warnings(training.runs_table(even)) == []
    # runs meant to differ in steps (equal tokens) are only flagged when cut short
    assert training.steps_warnings(table, equal_steps=False) == [notes[0]]
    # ... or when they saw more than 2 % unequal tokens (a cut run saw fewer than planned)
    tokens = {
        "magseg": {**results["magseg"], "tokens_seen": 1000},
        "text4seg": {**results["text4seg"], "tokens_seen": 1021},
    }
    table = training.runs_table(tokens)
    assert training.steps_warnings(table, equal_steps=False, equal_tokens=True) == [
        notes[0],
        "The runs did not see equal training tokens (magseg 1000, text4seg 1021): compare them with that in mind.",
    ]
    tokens["text4seg"]["tokens_seen"] = 1019
    table = training.runs_table(tokens)
    assert training.steps_warnings(table, equal_steps=False, equal_tokens=True) == [notes[0]]


def test_grpo_steps_table_says_when_kl_was_not_computed():
    log = pd.DataFrame(
        {
            "step": [1, 2],
            "reward": [0.5, 0.6],
            "reward_std": [0.1, 0.0],
            "frac_reward_zero_std": [0.25, 1.0],
            "rewards/format_reward/mean": [0.9, 1.0],
        }
    )
    t = training.grpo_steps(log, beta=0.0)
    assert t["groups with all-equal rewards"].tolist() == [0.25, 1.0]
    assert t["KL to the reference"].iloc[0].startswith("not computed (beta = 0")
    assert list(training.grpo_steps(log.assign(kl=[0.01, 0.02]), beta=0.04)["KL to the reference"]) == [
        0.01,
        0.02,
    ]


def test_repair_kinds_say_why_answers_were_not_well_formed(tmp_path):
    rows = [
        {
            "id": "a",
            "answer": "",
            "valid": False,
            "repairs": ["found 15 rows, expected 16", "row 3: 7 cells, expected 8"],
        },
        {"id": "b", "answer": "", "valid": False, "repairs": ["found 17 rows, expected 16"]},
        {"id": "c", "answer": "", "valid": True, "repairs": []},
        {"id": "d", "answer": "", "valid": False, "repairs": ["unknown labels ['cow'] set to 'others'"]},
    ]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kinds = validation.repair_kinds(path)
    assert kinds.to_dict() == {
        "found N rows, expected N": 0.5,
        "row N: N cells, expected N": 0.25,
        "unknown labels N set to N": 0.25,
    }


def test_class_balanced_rows_draw_rare_classes_more_often():
    from datasets import Dataset

    field, water = np.full((4, 4), F), np.full((4, 4), F)
    water[0, 0] = 3
    ds = Dataset.from_dict({"gt_mask": [field.tolist()] * 9 + [water.tolist()], "i": list(range(10))})
    w = training.row_weights(ds["gt_mask"])
    # 159 field cells and 1 water cell: weights 1/freq of each row's rarest class, scaled to max 1.
    assert w[-1] == 1.0 and w[0] == pytest.approx((160 / 159) / 160)
    assert training.balanced_rows(ds, 0.0) is ds
    drawn = training.balanced_rows(ds, 1.0, seed=0)
    assert len(drawn) == 10 and drawn["i"].count(9) >= 8  # the one water row dominates the redraw
    assert training.balanced_rows(ds, 1.0, seed=0)["i"] == drawn["i"]  # seeded


def test_answer_diversity_exposes_a_collapsed_model(tmp_path):
    path = tmp_path / "answers.jsonl"
    rows = [{"id": str(i), "answer": "field *4" if i < 6 else f"tree *{i}", "valid": True} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert validation.answer_diversity(path) == {
        "answers": 8,
        "distinct answers": 3,
        "most common answer share": 0.75,
    }


def test_equal_token_budget():
    # MAgSeg saw 2,649,600 tokens; a Text4Seg step holds 2,826.8 (419 rows of 357.6 tokens in 53 steps).
    assert training.steps_for_tokens(2_649_600, 2826.8) == 937
    assert training.steps_for_tokens(10, 1_000.0) == 1
    with pytest.raises(ValueError, match="reference run's tokens_seen \\(got None\\)"):
        training.steps_for_tokens(None, 3.0)
    with pytest.raises(ValueError, match="positive tokens per step"):
        training.steps_for_tokens(10, 0.0)


def test_format_steps_that_contradict_equal_tokens_are_refused():
    training.check_format_steps(1200, ["magseg", "text4seg"], True)
    training.check_format_steps({"magseg": 1200, "text4seg": 600}, ["magseg", "text4seg"], False)
    training.check_format_steps({"magseg": 1200, "text4seg": 600}, ["magseg"], True)  # no Text4Seg run
    with pytest.raises(ValueError, match=r"max_steps names steps for \['text4seg'\].*equal_tokens: false"):
        training.check_format_steps({"magseg": 1200, "text4seg": 600}, ["magseg", "text4seg"], True)
    assert training.training_order(["text4seg", "magseg"]) == ["magseg", "text4seg"]
    assert training.training_order(["text4seg"]) == ["text4seg"]


def test_budget_line_says_how_the_formats_trained():
    results = {
        "magseg": {"steps": 1200, "tokens_seen": 2_649_600},
        "text4seg": {"steps": 937, "tokens_seen": 2_650_076},
    }
    assert training.budget_line(results, True) == (
        "At equal training tokens (magseg 1200 steps, 2649600 tokens, text4seg 937 steps, 2650076 tokens):"
    )
    assert training.budget_line(results, False).startswith("At unequal steps (magseg 1200 steps")
    even = {k: {**v, "steps": 600} for k, v in results.items()}
    assert training.budget_line(even, False).startswith("At equal steps (")


def test_errors_by_purity_split_mixed_from_pure_cells(tmp_path):
    run01, val, answers = _fake_run(tmp_path, n_blocks=3)
    sem = np.full((8, 8), F)
    sem[:, 4:] = T
    sem[0, 4] = F  # cell (0, 2) of the 4x4 grid: 3 tree pixels of 4, still labelled tree
    table = validation.errors_by_purity(val, answers, run01, read_semantic=lambda tid: sem)
    rows = {(r["bin"], r["class"]): r for _, r in table.iterrows()}
    assert set(rows) == {("pure", "field"), ("pure", "tree"), ("0.6-0.8", "tree")}
    mixed = rows["0.6-0.8", "tree"]
    assert (mixed["cells"], mixed["model_error"], mixed["pixel_error"]) == (6, 0.0, 1.0)  # 6 tiles
    assert rows["pure", "tree"]["cells"] == 6 * 7 and rows["pure", "tree"]["pixel_error"] == 1.0
    assert rows["pure", "field"]["cells"] == 6 * 8 and rows["pure", "field"]["pixel_error"] == 0.0


def test_proxy_codes_per_rule_and_how_much_they_say_about_labels(tmp_path):
    """A tile whose left 10 of 16 columns per cell are water (blue), the rest field (dark green): the
    majority rule codes the mixed cell as smooth blue (8), the mean rule as textured blue (9)."""
    from PIL import Image

    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :10], rgb[:, 10:] = (0, 0, 200), (0, 150, 0)
    (tmp_path / "images").mkdir()
    Image.fromarray(rgb).save(tmp_path / "images" / "t0.png")
    sem = np.full((32, 32), F)
    sem[:, :10] = W
    row = {"id": "t0", "tile_id": "t0", "grid": 2, "patch_row": None, "gt_mask": [[W, F], [W, F]],
           "image_paths": ["images/t0.png"], "prompt": [], "completion": []}  # fmt: skip
    (tmp_path / "x_val.jsonl").write_text(json.dumps(row) + "\n")
    cells = {
        rule: validation.proxy_code_cells(tmp_path / "x_val.jsonl", None, rule, read_semantic=lambda t: sem)
        for rule in ("majority", "mean")
    }
    assert cells["majority"]["code"].tolist() == [8, 4, 8, 4] and cells["mean"]["code"].tolist() == [
        9,
        4,
        9,
        4,
    ]
    assert cells["mean"]["cls"].tolist() == [W, F, W, F]
    assert cells["mean"]["purity"].tolist() == pytest.approx([10 / 16, 1, 10 / 16, 1])
    # training cells say: smooth blue is water, textured blue is field (a blurred edge), dark green field
    train = pd.DataFrame({"cls": [W, F, F, F], "code": [8, 9, 9, 4], "purity": [1.0] * 4})
    acc = {rule: validation.proxy_code_accuracy(train, c).set_index("bin") for rule, c in cells.items()}
    assert acc["majority"]["accuracy"].to_dict() == {"0.6-0.8": 1.0, "pure": 1.0, "all": 1.0}
    assert acc["mean"]["accuracy"].to_dict() == {"0.6-0.8": 0.0, "pure": 1.0, "all": 0.5}
    assert acc["mean"]["cells"].to_dict() == {"0.6-0.8": 2, "pure": 2, "all": 4}


def test_confusions_by_block_count_one_error_per_scorer_and_block(tmp_path):
    run01, val, answers = _fake_run(tmp_path, n_blocks=3)
    table = validation.confusions_by_block(validation.answer_frames(val, answers, run01), "tree", "field")
    assert list(table["block_id"]) == ["b0", "b1", "b2"]
    assert table[validation.MODEL].tolist() == [0, 0, 0]  # the model answers perfectly
    assert table[validation.PIXEL].tolist() == [16, 16, 16]  # 2 tiles x 8 tree cells called field
    assert table[validation.ALL_FIELD].tolist() == [16, 16, 16] and table["tree cells"].tolist() == [16] * 3
    with pytest.raises(ValueError, match="unknown class 'forest': use one of others, field, tree, water"):
        validation.confusions_by_block(validation.answer_frames(val, answers, run01), "forest", "field")


def test_patch_purity_by_hand():
    from magseg_nb import prompts
    from magseg_nb.labels import NODATA

    mask = np.array([[1, 1, 2, 2], [1, 2, 2, 2], [0, 0, NODATA, NODATA], [0, 3, NODATA, NODATA]])
    purity = prompts.patch_purity(mask, None, 1, 2)
    assert purity[0, 0] == 0.75 and purity[0, 1] == 1.0 and purity[1, 0] == 0.75 and np.isnan(purity[1, 1])
    assert prompts.patch_purity(mask, (0, 1), 2, 1).tolist() == [[1.0]]  # the top right patch: all tree


def test_fine_answers_pool_to_the_coarse_cells(tmp_path):
    """scripts/pool_answers.py: 8x8 answers that repeat each true cell 2x2 pool back to the truth."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "pool_answers.py"
    spec = importlib.util.spec_from_file_location("pool_answers", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run01, val, answers = _fake_run(tmp_path, n_blocks=2)
    gt = np.asarray(json.loads(val.read_text().splitlines()[0])["gt_mask"])
    fine = np.kron(gt, np.ones((2, 2), int))
    fine[0, 0] = T  # one fine cell of four disagrees: the majority keeps field
    rows = [{"id": f"t{b}_{k}", "answer": textgrid.encode(fine, "plain"), "valid": True, "repairs": []}
            for b in range(2) for k in range(2)]  # fmt: skip
    (tmp_path / "fine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pooled = script.pooled_answers(tmp_path / "fine.jsonl", val, 8)
    assert [textgrid.decode(p["answer"], (4, 4)).mask.tolist() for p in pooled] == [gt.tolist()] * 4
    assert all(p["mean_dice"] == 1.0 for p in pooled)
    (tmp_path / "short.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(SystemExit, match="has no answer for t0_1: the two runs must share their tiles"):
        script.pooled_answers(tmp_path / "short.jsonl", val, 8)
