"""Notebook 07's logic (magseg_nb.study) on tiny inputs: settings, tile choice, stitching, scores, sentences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from magseg_nb import profile_schema, prompts, study, training, validation
from magseg_nb.labels import NODATA


def test_resolution_settings_keep_the_patch_grid_and_grow_the_layout():
    got = study.resolution_settings([16, 8], magseg_grid=4)
    assert [(s.name, s.patch_layout, s.grid, s.conversations_per_tile) for s in got] == [
        ("magseg_r8_crop", 2, 4, 4),
        ("text4seg_r8", 1, 8, 1),
        ("magseg_r16_crop", 4, 4, 16),
        ("text4seg_r16", 1, 16, 1),
    ]
    with pytest.raises(ValueError, match="multiple of magseg_grid"):
        study.resolution_settings([6], 4)
    with pytest.raises(ValueError, match="at least 2 patches"):
        study.resolution_settings([4], 4)
    with pytest.raises(ValueError, match="distinct"):
        study.resolution_settings([8, 8], 4)


def test_the_resolution_runs_crop_arm_is_shared_with_the_ablation():
    res = study.resolution_settings([8, 16], 4, "crop")
    ctx = study.context_settings(["index", "crop", "crop_only"], 16, 4)
    names = [s.name for s in study.unique_settings(res, ctx)]
    assert names == [
        "magseg_r8_crop",
        "text4seg_r8",
        "magseg_r16_crop",
        "text4seg_r16",
        "magseg_r16_index",
        "magseg_r16_crop_only",
    ]
    with pytest.raises(ValueError, match="unknown variant 'tile'"):
        study.context_settings(["tile"], 16, 4)


def _table():
    rows = [("t0", "a"), ("t1", "a"), ("t2", "a"), ("t3", "b"), ("t4", "c"), ("t5", "c")]
    return pd.DataFrame(
        [{"tile_id": t, "block_id": b, "split": "val", "scene_id": "s0"} for t, b in rows]
        + [{"tile_id": "x0", "block_id": "a", "split": "train", "scene_id": "s0"}]
    )


def test_select_tiles_spreads_a_subset_over_blocks():
    table = _table()
    three = study.select_tiles(table, "val", 3, seed=0)
    blocks = dict(zip(table["tile_id"], table["block_id"], strict=True))
    assert len(three) == 3 and sorted(blocks[t] for t in three) == ["a", "b", "c"]
    assert study.select_tiles(table, "val", 3, seed=0) == three  # seeded
    assert study.select_tiles(table, "val", 0) == ["t0", "t1", "t2", "t3", "t4", "t5"]
    assert study.select_tiles(table, "val", 99) == ["t0", "t1", "t2", "t3", "t4", "t5"]
    assert sorted(study.select_tiles(table, "val", 5, seed=1)) != sorted(table["tile_id"][:5])  # not head()
    assert study.select_tiles(table, "train", 1) == ["x0"]


def test_budget_note_says_a_reduced_budget_plainly(tmp_path):
    _table().to_csv(tmp_path / "tiles.csv", index=False)
    recipe = training.SFTSettings.max_steps  # the demo's notebook 03
    more = recipe + 50
    tiles = [prompts.TileRecord(t, "s0", "val", None, None) for t in ("t0", "t3")]
    note = study.budget_note(40, 8, tiles, tmp_path, {"magseg": more, "text4seg": 937})
    assert note.startswith(f"REDUCED BUDGET: 40 optimizer steps per run (batch 8; notebook 03 trains {more})")
    assert "0 of 1 training tiles, 2 of 6 validation tiles." in note
    tiles = [
        prompts.TileRecord(t, "s0", s, None, None)
        for t, s in zip(_table()["tile_id"], _table()["split"], strict=True)
    ]
    assert study.budget_note(more, 8, tiles, tmp_path, more) == (
        f"Budget: {more} optimizer steps per run (batch 8; notebook 03 trains {more}), "
        "1 of 1 training tiles, 6 of 6 validation tiles."
    )
    # the study profile runs 03 for one step only: the note compares with the demo's recipe instead
    assert study.budget_note(300, 8, tiles, tmp_path, 1) == (
        "REDUCED BUDGET: 300 optimizer steps per run (batch 8; this run's notebook 03 trained 1, the demo's "
        f"{recipe}), 1 of 1 training tiles, 6 of 6 validation tiles. Short runs measure the machinery and early "
        "learning, not what the formats reach."
    )


def test_sft_params_are_03s_with_equal_steps_and_no_time_budget():
    p = study.sft_params(
        {"learning_rate": 0.002, "max_steps": {"magseg": 600}, "time_budget_s": 30, "warmup_steps": 20}, 40, 3
    )
    assert p == {
        "learning_rate": 0.002,
        "warmup_steps": 4,
        "max_steps": 40,
        "seed": 3,
        "save_steps": 40,
        "time_budget_s": None,
        "max_train_examples": None,
        "eval_max_examples": None,
    }
    assert study.sft_params({"warmup_steps": 20}, 300, 0)["warmup_steps"] == 20
    assert study.sft_params({"warmup_steps": 20}, 5, 0)["warmup_steps"] == 1


def test_paint_uses_the_cells_of_downsample_mask():
    grid = np.array([[1, 2], [3, 0]])
    assert study.paint(grid, (4, 4)).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 0, 0], [3, 3, 0, 0]]
    rng = np.random.default_rng(0)
    for shape, cells in (((10, 7), 3), ((13, 16), 5), ((2, 3), 4)):
        g = rng.integers(0, 4, size=(cells, cells))
        painted = study.paint(g, shape)
        assert painted.shape == shape
        if min(shape) >= cells:  # every cell has pixels: downsampling gives the grid back
            assert np.array_equal(prompts.downsample_mask(painted, cells), g)


def _rows(layout=2, grid=2):
    return [
        {
            "id": f"t0__p{r}_{c}",
            "tile_id": "t0",
            "patch_row": r,
            "patch_col": c,
            "patch_layout": layout,
            "grid": grid,
            "gt_mask": [[0] * grid] * grid,
        }  # fmt: skip
        for r in range(layout)
        for c in range(layout)
    ]


def test_pixel_predictions_stitch_each_answer_into_its_patch():
    rows = _rows()
    answers = {
        "t0__p0_0": {"answer": "field|field\nfield|field"},
        "t0__p0_1": {"answer": "tree|water\ntree|water"},
        "t0__p1_0": {"answer": "others *2\nothers *2"},
    }  # p1_1 unanswered
    pred = study.pixel_predictions(rows, answers, {"t0": (8, 8)})["t0"]
    assert pred.shape == (8, 8)
    assert (pred[:4, :4] == 1).all() and (pred[:4, 4:6] == 2).all() and (pred[:4, 6:] == 3).all()
    assert (pred[4:, :4] == 0).all() and (pred[4:, 4:] == NODATA).all()
    t4s = [{"id": "t0", "tile_id": "t0", "patch_row": None, "patch_col": None, "patch_layout": 1, "grid": 2,
            "gt_mask": [[0, 0], [0, 0]]}]  # fmt: skip
    whole = study.pixel_predictions(t4s, {"t0": {"answer": "field|tree\nwater|others"}}, {"t0": (4, 6)})["t0"]
    assert whole.tolist() == [[1, 1, 1, 2, 2, 2]] * 2 + [[3, 3, 3, 0, 0, 0]] * 2


def test_boundary_frame_and_scores_of_a_perfect_and_a_blank_answer():
    gt = np.zeros((8, 8), np.uint8)
    gt[:, 4:] = 1
    perfect = study.boundary_frame({"t0": gt.copy()}, {"t0": gt}, 1.0)
    assert perfect.loc[0, "b_pred"] == perfect.loc[0, "b_pred_hit"] == perfect.loc[0, "b_gt_hit"] > 0
    blank = study.boundary_frame({"t0": np.ones_like(gt)}, {"t0": gt}, 1.0)
    assert blank.loc[0, "b_pred"] == 0 and blank.loc[0, "b_gt_hit"] == 0
    cm = {f"cm_{i}_{j}": 0 for i in range(4) for j in range(4)} | {"cm_0_0": 32, "cm_1_1": 32}
    model = pd.concat([perfect.assign(block_id="A", **cm), perfect.assign(tile_id="t1", block_id="B", **cm)])
    frames = {validation.MODEL: model, validation.ALL_FIELD: model.drop(columns=perfect.columns[1:])}
    s = study.Setting("magseg", 8, 2, 4, "crop")
    table = study.score_table(frames, s, n_boot=20).set_index(["scorer", "metric"])
    assert table.loc[(validation.MODEL, "boundary_px_f1"), "value"] == 1.0
    assert table.loc[(validation.MODEL, "mdice"), "value"] == 1.0  # two classes present, both exact
    assert (validation.ALL_FIELD, "boundary_px_f1") not in table.index  # cells only for baselines
    assert set(table["run"]) == {"magseg_r8_crop"} and set(table["n_units"]) == {2}


def _diff(diff, lo, hi, metric="mdice"):
    return pd.DataFrame(
        [
            {
                "metric": metric,
                "a": 0.5,
                "b": 0.5 + diff,
                "diff": diff,
                "lo": lo,
                "hi": hi,
                "n_tiles": 8,
                "n_units": 4,
                "resampled": "block_id",
                "row_unit": "tiles",
            }
        ]  # fmt: skip
    )


def test_crossing_sentence_claims_a_crossing_only_between_resolved_opposite_intervals():
    crossing = study.crossing_sentence(
        {8: _diff(-0.2, -0.3, -0.1), 16: _diff(0.01, -0.1, 0.1), 32: _diff(0.2, 0.1, 0.3)}
    )
    assert crossing.startswith(
        "mdice, MAgSeg - Text4Seg per effective resolution: 8 cells -0.200 [-0.300, -0.100] (lower); "
        "16 cells +0.010 [-0.100, +0.100] (not resolved); 32 cells +0.200 [+0.100, +0.300] (higher). "
    )
    assert crossing.endswith(
        "The formats cross between 8 and 32 cells per tile side: Text4Seg is ahead at 8, MAgSeg at 32 "
        "(both intervals exclude zero)."
    )
    ahead = study.crossing_sentence({8: _diff(0.1, -0.1, 0.2), 16: _diff(0.2, 0.1, 0.3)})
    assert ahead.endswith(
        "MAgSeg is ahead wherever the interval excludes zero (16 cells); the formats do not cross between "
        "8 and 16 cells per tile side."
    )
    flat = study.crossing_sentence({8: _diff(-0.1, -0.2, 0.1), 16: _diff(0.1, -0.1, 0.2)})
    assert flat.endswith("so no crossing is claimed (the point estimates change sign).")


def test_context_sentence_reads_the_interval():
    assert "the whole-tile context helps" in study.context_sentence(_diff(-0.1, -0.2, -0.05))
    assert "did not help at this budget" in study.context_sentence(_diff(0.1, 0.05, 0.2))
    unresolved = study.context_sentence(_diff(0.0, -0.1, 0.1))
    assert unresolved == (
        "Without the tile (crop_only) mean Dice changes +0.000 [-0.100, +0.100] against crop "
        "(8 tiles in 4 blocks), not a difference this data can resolve: this run does not show that "
        "the whole-tile context helps."
    )


def test_crop_only_shows_the_crop_alone(tmp_path):
    assert profile_schema.MAGSEG_VARIANTS == prompts.ALL_VARIANTS
    image = np.zeros((8, 8, 3), np.uint8)
    image[:4, 4:] = 200
    ex = prompts.make_example(Image.fromarray(image), "magseg", 2, "rle", (0, 1), 2, "crop_only")
    assert len(ex["images"]) == 1 and ex["images"][0].size == (4, 4)
    assert np.asarray(ex["images"][0]).min() == 200  # the patch, not the tile
    text = ex["prompt"][0]["content"][-1]["text"]
    assert "row 1, column 2" in text and "the rest of the tile is not shown" in text
    tile = prompts.TileRecord("t0", "s0", "val", image, np.zeros((8, 8), np.uint8))
    rows = prompts.conversation_rows(tile, tmp_path, "magseg", 2, "rle", 2, "crop_only")
    assert [r["image_paths"] for r in rows[:2]] == [
        ["images/t0__p0_0_crop_only.png"],
        ["images/t0__p0_1_crop_only.png"],
    ]
    assert (tmp_path / "images" / "t0__p0_1_crop_only.png").exists()
    assert [r["variant"] for r in rows] == ["crop_only"] * 4
