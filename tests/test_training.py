"""Training: scores and baselines, the proxy task, and a few real steps of SFT/GRPO on the tiny model."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from magseg_nb import files, pretraining, prompts, textgrid, training
from magseg_nb.labels import CLASS_COLORS, CLASSES, NODATA


def _tile(rng, i, split):
    sem = np.kron(rng.integers(0, 4, (4, 4)), np.ones((16, 16), int)).astype(np.uint8)
    img = np.array([CLASS_COLORS[CLASSES[c]] for c in sem.ravel()]).reshape(64, 64, 3)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return prompts.TileRecord(f"t{i}", "s0", split, img, sem)


@pytest.fixture(scope="module")
def convs(tmp_path_factory):
    """Conversations of 6 train and 2 val tiles in both formats, written the way notebook 02 does."""
    out = tmp_path_factory.mktemp("convs")
    rng = np.random.default_rng(0)
    tiles = [_tile(rng, i, "train") for i in range(6)] + [_tile(rng, 100 + i, "val") for i in range(2)]
    prompts.write_conversations(tiles, out, "magseg", 4, "rle", 2, "mark")
    prompts.write_conversations(tiles, out, "text4seg", 8, "rle", 1)
    return out


def _tiny_sft(convs, tmp_path, fmt: str, **over) -> dict:
    """SFT settings for a few steps of the random tiny model on the fixture's ``fmt`` rows, scoring off."""
    from magseg_nb import models

    base = models.resolve_model("tiny-gemma3", tmp_path / "models")
    cfg = dict(
        base_model=str(base), train_jsonl=str(convs / f"{fmt}_train.jsonl"), output_dir=str(tmp_path / "sft")
    )
    return {**cfg, "max_steps": 2, "batch_size": 4, "save_steps": 2, "eval_max_examples": 0, **over}


def test_score_masks_pools_cells_and_ignores_nodata():
    gt = np.array([[1, 1], [0, NODATA]])
    pred = np.array([[1, 0], [0, 3]])
    s = training.score_masks([gt], [pred], [True])
    assert s["cell_accuracy"] == pytest.approx(2 / 3)
    assert s["dice_field"] == pytest.approx(2 / 3)
    assert s["dice_others"] == pytest.approx(2 / 3)
    assert s["dice_tree"] is None and s["dice_water"] is None  # absent from both: no pooled value
    assert s["valid_fraction"] == 1.0 and s["n"] == 1


def test_baselines_all_field_and_majority():
    gts = [np.array([[1, 1], [0, 2]]), np.array([[2, 2], [2, 2]])]
    b = training.baselines(gts)
    assert b["all_field"]["class"] == "field"
    assert b["all_field"]["dice_field"] == pytest.approx(2 * 2 / (2 + 8))
    assert b["majority_class"]["class"] == "tree"
    assert b["majority_class"]["cell_accuracy"] == pytest.approx(5 / 8)
    # the majority may come from the training set instead
    assert training.baselines(gts, train_gts=[np.zeros((2, 2), int)])["majority_class"]["class"] == "others"


def test_colour_codes_and_encoding():
    rgb = np.array([[[128, 128, 128], [30, 120, 40]], [[40, 110, 220], [230, 200, 60]]])
    # grey bright, green dark, blue bright, warm bright; all smooth
    assert pretraining.colour_codes(rgb, np.zeros((2, 2))).tolist() == [[2, 4], [10, 14]]
    textured = pretraining.colour_codes(rgb, np.array([[0.0, 6.0], [5.9, 30.0]]))
    assert textured.tolist() == [[2, 5], [10, 15]]  # std >= TEXTURED_STD adds 1
    assert pretraining.PROXY_CODES[15] == "p" and len(pretraining.PROXY_CODES) == 16
    assert pretraining.encode_codes(np.array([[0, 0, 1], [2, 2, 2]]), "rle") == "a *2| b *1\nc *3"
    assert pretraining.encode_codes(np.array([[0, 1]]), "plain") == "a|b"


def test_cell_stds_are_the_grey_level_spread_of_each_cell():
    grey = np.zeros((8, 8), np.uint8)
    grey[:4, :4] = 100  # flat cell
    grey[:4, 4:] = np.array([[90, 110] * 2] * 4)  # +-10 checkerboard-like columns: std 10
    grey[4:, :] = np.arange(8, dtype=np.uint8)[None, :] * 20  # a ramp: cells of 0,20,40,60 and 80..140
    image = Image.fromarray(np.stack([grey] * 3, -1))
    std = pretraining.cell_stds(image, (0, 0, 8, 8), 2)
    assert std.shape == (2, 2)
    assert std[0, 0] == pytest.approx(0.0, abs=1e-3) and std[0, 1] == pytest.approx(10.0, abs=1e-3)
    assert std[1, 0] == pytest.approx(np.std([0, 20, 40, 60]), abs=1e-3)
    # a box selects part of the image, split the same way as cell_means
    assert pretraining.cell_stds(image, (4, 0, 8, 4), 1)[0, 0] == pytest.approx(10.0, abs=1e-3)
    assert pretraining.cell_means(image, (4, 0, 8, 4), 1)[0, 0].tolist() == [100, 100, 100]


def test_majority_codes_count_pixels_where_the_mean_blends_them():
    """A cell 10/16 blue, 6/16 green: its mean colour is blue but its grey levels spread (textured blue, 9);
    the commonest pixel code is smooth blue (8), as the cell's label would be the majority class."""
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :10] = (0, 0, 200)
    rgb[:, 10:] = (0, 150, 0)
    image = Image.fromarray(rgb)
    pixels = pretraining.pixel_codes(image)
    assert pixels.shape == (32, 32)
    # smooth blue, then textured within TEXTURE_WINDOW // 2 of the edge, then smooth green (dark: 4)
    assert pixels[0].tolist() == [8] * 6 + [9] * 4 + [5] * 4 + [4] * 18
    assert pretraining.cell_codes(image, (0, 0, 32, 32), 2, "majority").tolist() == [[8, 4], [8, 4]]
    assert pretraining.cell_codes(image, (0, 0, 32, 32), 2, "mean").tolist() == [[9, 4], [9, 4]]
    assert pretraining.cell_codes(image, (16, 0, 32, 16), 1, "majority").tolist() == [[4]]  # a box
    with pytest.raises(ValueError, match="proxy rule 'median' is not one of"):
        pretraining.cell_codes(image, (0, 0, 32, 32), 2, "median")


def test_proxy_example_describes_the_patch_without_labels():
    img = np.zeros((64, 64, 3), np.uint8)
    img[32:, 32:] = (40, 110, 220)  # the bottom-right patch is blue
    row = {
        "images": [Image.fromarray(img)],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Segment."}]}],
        "gt_mask": [[1, 1], [1, 1]],
        "patch_row": 1,
        "patch_col": 1,
        "patch_layout": 2,
        "encoding": "plain",
    }
    ex = pretraining.proxy_example(row)
    answer = ex["completion"][0]["content"][0]["text"]
    assert answer == "k|k\nk|k"  # blue, bright, smooth
    assert not any(name in answer for name in CLASSES)
    assert ex["prompt"][0]["content"][1]["text"].startswith(pretraining.PROXY_INSTRUCTION)
    assert row["prompt"][0]["content"][1]["text"] == "Segment."  # the original is not modified
    whole = pretraining.proxy_example({**row, "patch_row": None, "patch_col": None, "patch_layout": 1})
    assert whole["completion"][0]["content"][0]["text"] == "a|a\na|k"
    # the majority rule: one code per cell as well (flat cells: the same codes as the mean rule)
    assert pretraining.proxy_example(row, "majority")["completion"][0]["content"][0]["text"] == "k|k\nk|k"


def test_settings_reject_unknown_keys_and_bad_batches(tmp_path):
    with pytest.raises(ValueError, match="unknown SFTSettings keys"):
        training.run_sft({"base_model": "x", "train_jsonl": "y", "output_dir": "z", "lr": 1})
    with pytest.raises(ValueError, match="'base_model' is required"):
        training.run_sft({"train_jsonl": "y", "output_dir": "z"})
    with pytest.raises(FileNotFoundError, match="run notebook 03_sft first"):
        training.run_grpo(
            {"base_model": "x", "train_jsonl": "y", "output_dir": "z", "adapter_dir": str(tmp_path)}
        )
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="multiple of num_generations"):
        training.run_grpo(
            {
                "base_model": "x",
                "train_jsonl": "y",
                "output_dir": "z",
                "adapter_dir": str(tmp_path),
                "batch_size": 6,
            }
        )


def test_cli_reports_missing_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        training.main(["sft", "--config", str(tmp_path / "nope.yaml")])
    assert "does not exist" in capsys.readouterr().err


def test_eval_table_and_summary():
    ev = {
        "model": {"mean_dice": 0.8, "dice_field": 0.9, "cell_accuracy": 0.85, "valid_fraction": 1.0},
        "baselines": {
            "all_field": {"mean_dice": 0.3, "dice_field": 0.6, "cell_accuracy": 0.4, "class": "field"},
            "majority_class": {"mean_dice": 0.3, "dice_field": 0.6, "cell_accuracy": 0.4, "class": "field"},
        },
    }
    table = training.eval_table({"magseg": ev})
    assert list(table["scorer"]) == ["model", "all_field (field)", "majority_class (field)"]
    summary = training.stage_summary({"magseg": {"eval": ev, "steps": 3}}, "models/x")
    assert summary["base_model"] == "models/x" and summary["magseg_val_dice_field"] == 0.9
    assert summary["magseg_all_field_dice_field"] == 0.6
    diff = training.compare_evals(ev, {"model": {**ev["model"], "dice_field": 0.95}})
    assert diff.set_index("score").loc["dice_field", "change"] == pytest.approx(0.05)


@pytest.mark.slow
def test_pretrain_sft_resume_and_grpo_on_the_tiny_model(convs, tmp_path):
    from magseg_nb import models

    base = models.resolve_model("tiny-gemma3", tmp_path / "models")
    trains = [convs / "magseg_train.jsonl", convs / "text4seg_train.jsonl"]
    pre = pretraining.pretrain_proxy_base(
        base, trains, tmp_path / "models", max_steps=2, batch_size=4, max_examples=16
    )
    assert (pre / "config.json").exists() and (pre / "proxy_pretraining.json").exists()
    assert "proxy" in pre.name
    # cached: the second call reuses the folder
    assert (
        pretraining.pretrain_proxy_base(
            base, trains, tmp_path / "models", max_steps=2, batch_size=4, max_examples=16
        )
        == pre
    )

    out = tmp_path / "sft"
    cfg = dict(
        base_model=str(pre),
        train_jsonl=str(trains[0]),
        val_jsonl=str(convs / "magseg_val.jsonl"),
        output_dir=str(out),
        max_steps=2,
        batch_size=4,
        save_steps=2,
        logging_steps=1,
        eval_max_examples=4,
        eval_batch_size=4,
    )
    res = training.run_sft(cfg)
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    log = pd.read_csv(out / "log.csv")
    assert {"loss", "mean_token_accuracy", "step"} <= set(log.columns)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["model"]["n"] == 4 and set(ev["baselines"]) == {"all_field", "majority_class"}
    assert res["eval"]["baselines"]["all_field"]["dice_field"] == ev["baselines"]["all_field"]["dice_field"]
    assert len((out / "answers.jsonl").read_text().splitlines()) == 4

    # an interrupted longer run resumes from the last checkpoint (step 2) instead of starting over
    shutil.rmtree(out / "adapter")
    res2 = training.run_sft({**cfg, "max_steps": 3, "eval_max_examples": 0})
    assert res2["steps"] == 3
    assert pd.read_csv(out / "log.csv")["step"].max() == 3
    assert (out / "adapter" / "adapter_config.json").exists()
    # unchanged settings with a finished adapter: no training at all
    assert training.run_sft({**cfg, "max_steps": 3, "eval_max_examples": 0})["steps"] == 3
    # scoring settings changed: the finished adapter is scored again, not trained again
    weights = out / "adapter" / "adapter_model.safetensors"
    before = (weights.stat().st_mtime_ns, files.sha256_file(weights))
    rescored = training.run_sft({**cfg, "max_steps": 3, "eval_max_examples": 2, "test_views": 4})
    assert rescored["steps"] == 3 and (weights.stat().st_mtime_ns, files.sha256_file(weights)) == before
    assert rescored["eval"]["test_views"] == 4 and rescored["eval"]["model"]["n"] == 2
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2
    # the same scoring again: read from eval.json (it names what it scored), not computed again
    eval_file = out / "eval.json"
    stamp = eval_file.stat().st_mtime_ns
    assert rescored["eval"]["scoring_key"] == json.loads(eval_file.read_text())["scoring_key"]
    same = training.run_sft({**cfg, "max_steps": 3, "eval_max_examples": 2, "test_views": 4})
    assert same["eval"] == rescored["eval"] and eval_file.stat().st_mtime_ns == stamp
    # a scoring setting changed, or answers.jsonl gone: scored again
    one_view = training.run_sft({**cfg, "max_steps": 3, "eval_max_examples": 2, "test_views": 1})
    assert (
        one_view["eval"]["test_views"] == 1 and one_view["eval"]["scoring_key"] != same["eval"]["scoring_key"]
    )
    (out / "answers.jsonl").unlink()
    training.run_sft({**cfg, "max_steps": 3, "eval_max_examples": 2, "test_views": 1})
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2
    # as the chain reruns a stage: the finished folder moved away, the same path empty again; the
    # training is copied from the finished folder, not run again
    final = tmp_path / "sft_final"
    shutil.move(out, final)
    again = training.run_sft({**cfg, "max_steps": 3, "eval_max_examples": 2}, reuse=final)
    assert again["steps"] == 3 and files.sha256_file(weights) == before[1]
    assert (out / "log.csv").read_bytes() == (final / "log.csv").read_bytes() and not (
        out / "checkpoints"
    ).exists()
    assert json.loads((out / "eval.json").read_text())["model"]["n"] == 2
    other = training._settings(training.SFTSettings, {**cfg, "max_steps": 4, "output_dir": str(out)})
    assert training._adopt_finished(final, tmp_path / "elsewhere", "adapter", other) is None
    assert not (tmp_path / "elsewhere").exists()

    gout = tmp_path / "grpo"
    gres = training.run_grpo(
        dict(
            base_model=str(pre),
            adapter_dir=str(out / "adapter"),
            train_jsonl=str(trains[0]),
            val_jsonl=str(convs / "magseg_val.jsonl"),
            output_dir=str(gout),
            max_steps=1,
            batch_size=4,
            num_generations=4,
            max_completion_length=24,
            eval_max_examples=2,
        )
    )
    assert (gout / "adapter" / "adapter_config.json").exists()
    glog = pd.read_csv(gout / "log.csv")
    assert {
        "reward",
        "reward_std",
        "rewards/dice_reward/mean",
        "rewards/format_reward/mean",
        "completions/mean_length",
    } <= set(glog.columns)
    assert 0.0 <= glog["rewards/dice_reward/mean"].iloc[0] <= 1.0
    assert gres["eval"]["model"]["n"] == 2
    # the GRPO adapter loads onto the same base
    model, _ = models.load_model_and_processor(str(pre), adapter_dir=str(gout / "adapter"))
    assert model is not None
    assert textgrid.decode("", (2, 2)).report.valid is False


def test_tokens_per_step_counts_what_the_trainer_counts(convs, tmp_path):
    cfg = _tiny_sft(convs, tmp_path, "text4seg", output_dir=str(tmp_path / "t4s"), logging_steps=1)
    s = training.SFTSettings(**cfg)
    per_step = training.tokens_per_step(s)
    # 6 training rows at batch 4: one epoch is 2 steps (4 rows, then 2), so 2 steps see every row once.
    res = training.run_sft(cfg)
    assert res["tokens_seen"] == pytest.approx(2 * per_step)
    assert training.equal_token_steps(s, 2 * res["tokens_seen"]) == 4
    assert training.planned_tokens(s) == round(2 * per_step) == res["tokens_seen"]  # known before training
    # Notebook 03's plans: MAgSeg first; Text4Seg's steps hold MAgSeg's planned tokens, before either trains.
    params = {"max_steps": 3, "batch_size": 4, "equal_tokens": True, "conversation_layout": "per_patch"}
    base = cfg["base_model"]
    plans = training.sft_plans(params, ["text4seg", "magseg"], base, convs, tmp_path / "stage")
    assert list(plans) == ["magseg", "text4seg"] and plans["magseg"].max_steps == 3
    assert plans["text4seg"].output_dir == str(tmp_path / "stage" / "text4seg")
    assert training.planned_tokens(plans["magseg"]) == 3336  # 3 steps of 4 MAgSeg rows of 278 tokens
    assert training.tokens_per_step(plans["text4seg"]) == 724  # 6 tiles' longer answers, 4 a step
    assert plans["text4seg"].max_steps == 5  # round(3336 / 724)
    unequal = training.sft_plans(
        {**params, "equal_tokens": False}, ["magseg", "text4seg"], base, convs, tmp_path
    )
    assert unequal["text4seg"].max_steps == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl holds no conversations"):
        training.tokens_per_step(training.SFTSettings(**{**cfg, "train_jsonl": str(empty)}))


def test_sft_settings_check_the_loss_settings_when_read(tmp_path):
    """Bad loss settings fail when the settings are read (before a model loads) and name what was set."""
    bad = [
        ({"loraplus_lr_ratio": 0.5}, "loraplus_lr_ratio must be >= 1"),
        ({"soft_labels": 1.5}, r"soft_labels must be in \[0, 1\], not 1.5"),
        ({"mixed_cell_weight": -1.0}, "mixed_cell_weight must be >= 0, not -1"),
        ({"photometric": 1.0}, r"photometric must be in \[0, 1\) \(a factor's spread around 1\), not 1.0"),
        (
            {"soft_labels": 0.5},
            "^soft_labels: the cells' pixel shares come from pixel_labels; set it to notebook 01's folder",
        ),
        ({"mixed_cell_weight": 2.0}, "^mixed_cell_weight: the cells' pixel shares come from pixel_labels"),
        (
            {"soft_labels": 0.5, "mixed_cell_weight": 0.0},
            "^soft_labels and mixed_cell_weight: the cells' pixel shares",
        ),
        (
            {"mixed_cell_weight": 2.0, "pixel_labels": "run01", "label_weights": {"tree": 2}},
            "^mixed_cell_weight and label_weights each define the loss of the class tokens",
        ),
    ]
    for over, message in bad:
        with pytest.raises(ValueError, match=message):
            training.run_sft(
                {"base_model": "x", "train_jsonl": "y", "output_dir": str(tmp_path / "z"), **over}
            )
        assert not (tmp_path / "z").exists()  # nothing written
    ok = training.SFTSettings(mixed_cell_weight=0.0, pixel_labels="run01")
    assert ok.by_cells and ok.cell_settings == "mixed_cell_weight"
    assert not training.SFTSettings().by_cells
    assert training.SFTSettings(label_weights={"tree": 2.0}).label_weights == {"tree": 2.0}


def test_colour_jitter_scales_contrast_and_shares_one_draw_between_a_rows_images():
    """Contrast 0.5 halves each pixel's distance from the grey mean; a row's tile and patch get one draw,
    rows get their own, and the seed fixes the draws."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(40, 216, (16, 16, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(training.jitter_colours([img], (1, 1, 1))[0]), np.asarray(img))
    half = np.asarray(training.jitter_colours([img], (1, 0.5, 1))[0], float)
    a = np.asarray(img, float)
    grey = np.asarray(img.convert("L"), float).mean()
    assert np.abs(half - (grey + 0.5 * (a - grey))).max() <= 1.0
    assert half.std() == pytest.approx(0.5 * a.std(), rel=0.02)

    seen = []

    def inner(rows):
        seen.append([[np.asarray(i, float) for i in r["images"]] for r in rows])
        return {"n": len(rows)}

    rows = [{"images": [img, img], "prompt": "p"} for _ in range(3)]
    assert training.JitteredColours(inner, 0.4, seed=1)(rows) == {"n": 3}
    assert training.JitteredColours(inner, 0.4, seed=1)(rows) == {"n": 3}
    first, again = seen
    for tile, patch in first:
        assert np.array_equal(tile, patch)  # one draw per row, for both its images
        assert not np.array_equal(tile, a)  # and jittered
    assert not np.array_equal(first[0][0], first[1][0])  # rows draw their own factors
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(first, again, strict=True))  # the seed fixes them
    assert np.array_equal(np.asarray(rows[0]["images"][0]), np.asarray(img))  # the rows are left as they were


def test_settings_hash_leaves_out_the_scoring_settings_only(tmp_path):
    """Scoring settings re-score a finished adapter; training settings make a new one."""
    s = training.SFTSettings(base_model="google/gemma-3-4b-it", train_jsonl="", output_dir=str(tmp_path))
    h = training.settings_hash(s)
    for name, value in [
        ("test_views", 8),
        ("eval_batch_size", 64),
        ("eval_max_examples", 0),
        ("max_new_tokens", 9),
    ]:
        assert training.settings_hash(dataclasses.replace(s, **{name: value})) == h, name
    for name, value in [
        ("max_steps", 401),
        ("seed", 1),
        ("learning_rate", 3e-4),
        ("lora_r", 8),
        ("tile_group", 4),
        ("label_weights", {"tree": 2.0}),
        ("loraplus_lr_ratio", 16.0),
        ("soft_labels", 0.5),
        ("mixed_cell_weight", 2.0),
        ("photometric", 0.4),
    ]:
        # the cell-share settings need pixel_labels: compared against the same settings with it alone
        base = (
            dataclasses.replace(s, pixel_labels="run01")
            if name in ("soft_labels", "mixed_cell_weight")
            else s
        )
        assert training.settings_hash(dataclasses.replace(base, **{name: value})) != training.settings_hash(
            base
        ), name
    # A setting added later is left out at its neutral value: runs finished before it keep their hash.
    old = {
        k: v
        for k, v in dataclasses.asdict(s).items()
        if k not in training.EVAL_ONLY
        and k
        not in (
            "tile_group",
            "label_weights",
            "loraplus_lr_ratio",
            "soft_labels",
            "pixel_labels",
            "mixed_cell_weight",
            "photometric",
        )
    }
    assert h == files.sha256_json({**old, "inputs": training.inputs_hash(s)})[:12]


def test_tile_grouped_order_draws_runs_of_one_tile_and_every_row_once_a_pass():
    tiles = ["a"] * 4 + ["b"] * 4 + ["c"] * 2
    order = training.tile_grouped_order(tiles, 2, 25, seed=3)
    assert order.shape == (25,)
    for start in (0, 10):  # each full pass draws every row once
        assert sorted(order[start : start + 10].tolist()) == list(range(10))
    pairs = order[:24].reshape(-1, 2)
    assert all(tiles[i] == tiles[j] for i, j in pairs)  # every aligned run of 2 is one tile
    assert not all(tiles[i] == tiles[j] for i, j in order[1:25].reshape(-1, 2))  # runs follow other tiles
    assert training.tile_grouped_order(tiles, 2, 25, seed=3).tolist() == order.tolist()
    assert training.tile_grouped_order(tiles, 2, 25, seed=4).tolist() != order.tolist()
    assert training.tile_grouped_order(tiles, 1, 10, seed=3).tolist() != list(range(10))  # shuffled rows
    with pytest.raises(ValueError, match="tile_group must be at least 1, got 0"):
        training.tile_grouped_order(tiles, 0, 5)


def test_length_grouped_epochs_batch_rows_of_similar_length_and_draw_every_row_once():
    lengths = np.random.default_rng(0).permutation(np.arange(100, 164))  # 64 rows of distinct lengths
    first, second = (training.length_grouped_epoch(lengths, 2, seed=3, epoch=e) for e in (0, 1))
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(64))  # every row once an epoch
    assert first.tolist() != second.tolist()  # each epoch drawn anew

    def padding(o):  # padded minus real tokens over the batches of 2
        pairs = lengths[np.asarray(o)].reshape(-1, 2)
        return int((pairs.max(1)[:, None] - pairs).sum())

    # sorted within megabatches of 16 rows (transformers: 64 // (2 x 4) batches): ~4 tokens a pair, ~21 at random
    assert padding(first) * 4 < padding(np.random.default_rng(0).permutation(64))
    assert training.length_grouped_epoch(lengths, 2, seed=3, epoch=0).tolist() == first.tolist()
    assert training.length_grouped_epoch(lengths, 2, seed=4, epoch=0).tolist() != first.tolist()
    with pytest.raises(ValueError, match="needs rows and a batch of at least 1, got 64, 0"):
        training.length_grouped_epoch(lengths, 0)


def test_length_groups_resolve_for_the_rows_and_the_other_orders(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert training.use_length_groups("auto", fixed_shape=False) is True  # Text4Seg-like rows
    assert training.use_length_groups("auto", fixed_shape=True) is False  # plain grids: nothing to save
    assert training.use_length_groups("auto", fixed_shape=False, tile_group=4) is False
    assert training.use_length_groups(True, fixed_shape=True) is True
    assert training.use_length_groups(False, fixed_shape=False) is False
    with pytest.raises(ValueError, match="group_by_length and tile_group > 1 each set the order"):
        training.use_length_groups(True, fixed_shape=False, tile_group=4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert training.use_length_groups("auto", fixed_shape=False) is False
    with pytest.raises(ValueError, match="group_by_length trains in one process only"):
        training.use_length_groups(True, fixed_shape=False)


def test_a_finished_training_is_adopted_by_every_process_and_copied_by_the_main_one(tmp_path, monkeypatch):
    """Under several processes all of them must skip training (or the others wait for rank 0 forever);
    only the main process writes."""
    s = training.SFTSettings(
        base_model="google/gemma-3-4b-it", train_jsonl="", output_dir=str(tmp_path / "p")
    )
    src = tmp_path / "final"
    (src / "adapter").mkdir(parents=True)
    (src / "adapter" / "adapter_model.safetensors").write_bytes(b"w")
    (src / "log.csv").write_text("step,loss\n1,0.5\n")
    done = {"settings_hash": training.settings_hash(s), "steps": 7}
    files.write_json(src / training.DONE_FILE, done)
    monkeypatch.setattr(training, "_is_main", lambda: False)
    assert training._adopt_finished(src, tmp_path / "p", "adapter", s) == done
    assert not (tmp_path / "p").exists()
    monkeypatch.setattr(training, "_is_main", lambda: True)
    (tmp_path / "p").mkdir()
    assert training._adopt_finished(src, tmp_path / "p", "adapter", s) == done
    assert (tmp_path / "p" / "adapter" / "adapter_model.safetensors").read_bytes() == b"w"
    assert (tmp_path / "p" / "log.csv").read_text() == "step,loss\n1,0.5\n"
    assert json.loads((tmp_path / "p" / training.DONE_FILE).read_text()) == done


def test_settings_hash_follows_what_the_paths_point_at(tmp_path):
    """A rebuilt base or rewritten conversations under the same path are new settings; a hub id counts
    as itself (measured bug: a seed study reused adapters of the previous base after a rebuild)."""
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"id": 1}\n')
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights-1")
    s = training.SFTSettings(base_model=str(base), train_jsonl=str(rows), output_dir=str(tmp_path / "o"))
    h0 = training.settings_hash(s)
    assert training.settings_hash(s) == h0  # stable
    rows.write_text('{"id": 2}\n')
    h1 = training.settings_hash(s)
    assert h1 != h0
    (base / "model.safetensors").write_bytes(b"weights-2")
    h2 = training.settings_hash(s)
    assert h2 not in (h0, h1)
    (base / "SHA256SUMS").write_text("abc  model.safetensors\n")  # a shipped base: its sums decide
    assert training.input_identity(str(base)) == files.sha256_file(base / "SHA256SUMS")
    assert training.input_identity("google/gemma-3-4b-it") == "google/gemma-3-4b-it"
    assert training.input_identity("") == ""


def test_checkpoints_of_other_inputs_are_removed_not_resumed(tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    (ck / "checkpoint-2").mkdir(parents=True)
    (ck / training.INPUTS_STAMP).write_text("aaa\n")
    training._drop_checkpoints_of_other_inputs(ck, "aaa")  # the same inputs: resume stays possible
    assert (ck / "checkpoint-2").is_dir() and capsys.readouterr().out == ""
    training._drop_checkpoints_of_other_inputs(ck, "bbb")
    assert not (ck / "checkpoint-2").exists() and (ck / training.INPUTS_STAMP).read_text() == "bbb\n"
    assert f"warning: removing {ck}: its checkpoints come from other inputs" in capsys.readouterr().out
    (ck / "checkpoint-4").mkdir()
    (ck / training.INPUTS_STAMP).unlink()  # unstamped checkpoints (another version): not trusted
    training._drop_checkpoints_of_other_inputs(ck, "bbb")
    assert not (ck / "checkpoint-4").exists()


@pytest.mark.slow
def test_sft_with_photometric_jitters_every_training_row_within_its_spread(convs, tmp_path, monkeypatch):
    """photometric=0.3: each row of each training batch is jittered once, all its images together, with
    factors in [0.7, 1.3]; the trained adapter is saved as usual."""
    cfg = _tiny_sft(convs, tmp_path, "magseg", photometric=0.3)
    calls, real = [], training.jitter_colours

    def recording(images, factors):
        calls.append((len(images), np.asarray(factors)))
        return real(images, factors)

    monkeypatch.setattr(training, "jitter_colours", recording)
    assert training.run_sft(cfg)["steps"] == 2
    n_images = len(prompts.load_conversations(convs / "magseg_train.jsonl")[0]["images"])
    assert len(calls) >= 2 * 4  # two steps of four rows (the trainer may batch once more to measure)
    assert {n for n, _ in calls} == {n_images}
    factors = np.stack([f for _, f in calls])
    assert factors.shape[1] == 3 and factors.min() >= 0.7 and factors.max() <= 1.3
    assert len(np.unique(factors.round(6), axis=0)) == len(calls)  # a draw of its own per row
    assert (tmp_path / "sft" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_sft_with_tile_groups_encodes_each_batch_tile_image_once(convs, tmp_path, monkeypatch):
    """tile_group=4 with batches of 4 on 4-patch tiles: every batch is one tile, so the vision tower sees
    the tile image once and each patch's marked image (5 images, not 8), for every training step."""
    cfg = _tiny_sft(convs, tmp_path, "magseg", max_steps=3, save_steps=3, tile_group=4)
    seen = []
    real_fit = training.fit

    def counting_fit(trainer, out, share_images=False):
        tower = next(m for n, m in trainer.model.named_modules() if n.endswith("vision_tower"))
        tower.register_forward_pre_hook(
            lambda mod, args, kw: seen.append(len((args or [kw["pixel_values"]])[0])), with_kwargs=True
        )
        return real_fit(trainer, out, share_images)

    monkeypatch.setattr(training, "fit", counting_fit)
    assert training.run_sft(cfg)["steps"] == 3
    assert seen == [5, 5, 5]
    no_tile = prompts.load_conversations(convs / "magseg_train.jsonl").remove_columns("tile_id")
    with pytest.raises(ValueError, match="tile_group=4 needs a 'tile_id' column in the training rows"):
        training.run_sft({**cfg, "output_dir": str(tmp_path / "b")}, train_ds=no_tile)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="tile_group > 1 trains in one process only"):
        training.run_sft({**cfg, "output_dir": str(tmp_path / "c")})


def test_label_weights_weigh_the_class_tokens_of_the_answer(convs, tmp_path):
    """A class's label token weighs more in the loss; weight 1 is TRL's own loss, to the last digit."""
    import types

    import torch
    from transformers import AutoProcessor

    class Base:
        pass

    fake = training.label_weighted(Base, {7: 3.0})
    model = lambda **kw: types.SimpleNamespace(  # noqa: E731 - the fused head's outputs
        log_probs=torch.tensor([[-1.0, -2.0, -3.0, 0.0]]), label_mask=torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    )
    labels = torch.tensor([[-100, 5, 7, 900, -100]])  # 900: past the weighted ids, weighs 1
    loss = fake().compute_loss(model, {"labels": labels})
    assert float(loss) == pytest.approx((1 * 1 + 3 * 2 + 1 * 3) / (1 + 3 + 1))
    assert training.label_weighted(Base, None) is Base

    cfg = _tiny_sft(convs, tmp_path, "magseg", logging_steps=1)
    tok = AutoProcessor.from_pretrained(cfg["base_model"]).tokenizer
    weights = training.label_token_weights(tok, {"tree": 2.0})
    assert weights == {tok("tree", add_special_tokens=False)["input_ids"][0]: 2.0}
    with pytest.raises(ValueError, match=r"label_weights: unknown classes \['trees'\]; the classes are"):
        training.label_token_weights(tok, {"trees": 2.0})

    def first_loss(name, **over):
        training.run_sft({**cfg, "output_dir": str(tmp_path / name), **over})
        return pd.read_csv(tmp_path / name / "log.csv")["loss"].dropna().iloc[0]

    plain = first_loss("plain")
    assert first_loss("one", label_weights={"tree": 1.0}) == pytest.approx(plain, abs=1e-4)
    assert abs(first_loss("five", label_weights={"tree": 5.0, "water": 5.0}) - plain) > 1e-3


def test_loraplus_trains_the_b_matrices_faster(convs, tmp_path):
    """LoRA+: every B matrix (and 1-d weight) in a group at ratio x the learning rate, every other
    trainable weight at the learning rate; ratio 1 trains as the Trainer's own AdamW does."""
    import types

    from peft import get_peft_model

    from magseg_nb import models

    class Base:
        optimizer = None

    cfg = _tiny_sft(convs, tmp_path, "magseg", logging_steps=1, max_steps=3, save_steps=3)
    model, _ = models.load_model_and_processor(
        cfg["base_model"], dtype="float32", device="cpu", trainable=True
    )
    peft_model = get_peft_model(model, models.lora_config(target_modules="all", train_embeddings=True))
    fake = training.loraplus(Base, 4.0)()
    fake.model = peft_model
    fake.args = types.SimpleNamespace(
        learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0
    )
    opt = fake.create_optimizer()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(lr_of) == {id(p) for p in trainable.values()}
    fast = {n for n, p in trainable.items() if lr_of[id(p)] == pytest.approx(4e-3)}
    assert fast == {n for n, p in trainable.items() if "lora_B" in n or p.ndim == 1}
    assert any("lora_B" in n for n in fast) and all(
        lr_of[id(trainable[n])] == 1e-3 for n in set(trainable) - fast
    )
    assert fake.create_optimizer() is opt  # made once
    assert training.loraplus(Base, None) is Base
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be >= 1"):
        training.loraplus(Base, 0.5)

    def losses(name, **over):
        training.run_sft({**cfg, "output_dir": str(tmp_path / name), **over})
        return pd.read_csv(tmp_path / name / "log.csv")["loss"].dropna().tolist()

    plain = losses("plain")
    assert losses("one", loraplus_lr_ratio=1.0) == pytest.approx(plain, abs=1e-4)
    sixteen = losses("sixteen", loraplus_lr_ratio=16.0)
    assert sixteen[0] == pytest.approx(plain[0], abs=1e-6) and abs(sixteen[-1] - plain[-1]) > 1e-3


def test_cell_shares_count_each_cells_pixels_row_major():
    mask = np.array([[0, 0, 1, 1], [0, 2, 1, 1], [3, 3, 3, 3], [3, 3, 1, NODATA]])
    shares = prompts.cell_shares(mask, None, 1, 2)
    expected = [[0.75, 0, 0.25, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 1 / 3, 0, 2 / 3]]
    np.testing.assert_allclose(shares, expected)
    assert prompts.cell_shares(np.full((4, 4), NODATA), None, 1, 2).sum() == 0  # no valid pixel: zeros
    np.testing.assert_allclose(prompts.cell_shares(mask, (1, 1), 2, 1), [[0, 1 / 3, 0, 2 / 3]])  # one patch


def test_soft_labels_train_class_tokens_towards_the_cells_pixel_shares(tmp_path, monkeypatch):
    """The k-th class token's target mixes its label with cell k's shares; alpha ~0 is TRL's own loss."""
    import types

    import torch

    from magseg_nb import geo

    class Base:
        pass

    logits = torch.log_softmax(torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0)), -1)
    model = lambda **kw: types.SimpleNamespace(logits=logits)  # noqa: E731
    labels = torch.tensor([[-100, 2, 1, 4]])  # class tokens 2..5 (others, field, tree, water); 1 a separator
    shares = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.4, 0.6, 0.0]]])  # cell 0 holds no valid pixel
    fake = training.soft_labelled(Base, [2, 3, 4, 5], 0.5)()
    loss = fake.compute_loss(model, {"labels": labels, "cell_shares": shares})
    lp = logits[0]
    cell1 = 0.5 * lp[2, 4] + 0.5 * (
        0.4 * lp[2, 3] + 0.6 * lp[2, 4]
    )  # written tree, shares field 0.4, tree 0.6
    assert float(loss) == pytest.approx(float(-(lp[0, 2] + lp[1, 1] + cell1) / 3), abs=1e-6)
    # Mixed cells (purity under 0.8) weigh mixed_weight: cell 1 (0.6 tree) counts three times, with written labels.
    heavy = training.soft_labelled(Base, [2, 3, 4, 5], 0.0, 3.0)()
    loss = heavy.compute_loss(model, {"labels": labels, "cell_shares": shares})
    assert float(loss) == pytest.approx(float(-(lp[0, 2] + lp[1, 1] + 3 * lp[2, 4]) / 5), abs=1e-6)
    with pytest.raises(ValueError, match=r"soft_labels: answers hold \[2\] class tokens, their cells 3"):
        fake.compute_loss(model, {"labels": labels, "cell_shares": torch.zeros(1, 3, 4)})

    # A real run on plain answers over mixed cells; the tile masks stand in for notebook 01's.
    rng = np.random.default_rng(1)
    tiles = []
    for i in range(4):
        sem = np.kron(rng.integers(0, 4, (4, 4)), np.ones((16, 16), int)).astype(np.uint8)
        flip = rng.random(sem.shape) < 0.3
        sem[flip] = rng.integers(0, 4, int(flip.sum()))
        img = np.array([CLASS_COLORS[CLASSES[c]] for c in sem.ravel()]).reshape(64, 64, 3).astype(np.uint8)
        tiles.append(prompts.TileRecord(f"m{i}", "s0", "train", img, sem))
    prompts.write_conversations(tiles, tmp_path / "plain", "magseg", 4, "plain", 2, "crop")
    masks = {t.tile_id: t.semantic for t in tiles}
    monkeypatch.setattr(geo, "read_tile", lambda run01, tid: types.SimpleNamespace(semantic=masks[tid]))
    cfg = _tiny_sft(tmp_path / "plain", tmp_path, "magseg", logging_steps=1, pixel_labels="run01")

    def losses(name, **over):
        training.run_sft({**cfg, "output_dir": str(tmp_path / name), **over})
        return pd.read_csv(tmp_path / name / "log.csv")["loss"].dropna().tolist()

    plain = losses("plain_run")
    assert losses("tiny", soft_labels=1e-9) == pytest.approx(plain, abs=1e-4)
    assert abs(losses("soft", soft_labels=1.0)[0] - plain[0]) > 1e-3  # mixed cells change the first loss
    assert losses("mixed_one", mixed_cell_weight=1.0 + 1e-9) == pytest.approx(plain, abs=1e-4)
    assert abs(losses("mixed_zero", mixed_cell_weight=0.0)[0] - plain[0]) > 1e-3
    # Each row carries its own cells' shares, so batches of one tile's patches (reordered rows) keep them.
    ds = prompts.load_conversations(tmp_path / "plain" / "magseg_train.jsonl")
    s = training.SFTSettings(**{**cfg, "soft_labels": 1.0})
    rows = training.with_cell_shares(training.sft_dataset(ds), ds, s)
    row = ds[5]
    expected = prompts.cell_shares(masks[row["tile_id"]], prompts.row_patch(row), 2, 4)
    np.testing.assert_allclose(rows[5]["cell_shares"], expected)
    np.testing.assert_allclose(rows.select([5, 0])[0]["cell_shares"], expected)
    assert 0 < expected.max(axis=1).min() < 1  # a mixed cell: the shares differ from the label
    grouped = losses("grouped", soft_labels=1.0, tile_group=4)
    assert np.isfinite(grouped).all() and len(grouped) == 2


def test_split_row_keeps_batches_whole():
    assert training.split_row(992, 16) == 496  # the demo's validation rows: 31 batches each
    assert training.split_row(10, 4) == 8 and training.split_row(9, 2) == 6
    assert training.split_row(3, 16) == 3 and training.split_row(1, 1) == 1  # nothing left for a helper
    # too few answers to pay for the helper's start: every row stays with the scoring process
    least = training.SCORING_HELPER_MIN_ANSWERS
    assert least == 256
    assert training.split_row(992, 16, 4, least) == 496  # the demo: 496 rows x 4 views handed on
    assert training.split_row(64, 16, 1, least) == 64  # 32 answers: not worth a process
    assert training.split_row(120, 16, 4, least) == 120 and training.split_row(160, 16, 4, least) == 80


def test_a_scoring_helper_gives_the_same_answers(convs, tmp_path, monkeypatch):
    """With side_by_side's variable set, the training's scoring hands the second half of the rows to a helper
    process (the saved adapter, the same batches): answers and scores equal those of one process."""
    cfg = _tiny_sft(
        convs,
        tmp_path,
        "magseg",
        val_jsonl=str(convs / "magseg_val.jsonl"),
        eval_max_examples=6,
        eval_batch_size=2,
        test_views=4,
        max_new_tokens=12,
    )
    alone = training.run_sft({**cfg, "output_dir": str(tmp_path / "alone")})
    monkeypatch.setenv(training.SCORING_HELPER_ENV, "1")
    few = training.run_sft({**cfg, "output_dir": str(tmp_path / "few")})  # 12 answers: under the least
    assert not (tmp_path / "few" / "scoring_helper.log").exists()
    assert few["eval"]["model"] == alone["eval"]["model"]
    monkeypatch.setenv(training.SCORING_HELPER_MIN_ENV, "1")
    helped = training.run_sft({**cfg, "output_dir": str(tmp_path / "helped")})
    log = (tmp_path / "helped" / "scoring_helper.log").read_text()
    assert "Traceback" not in log
    assert not (tmp_path / "alone" / "scoring_helper.log").exists()
    assert not list((tmp_path / "helped").glob("scoring_helper.json")) + list(
        (tmp_path / "helped").glob("scoring_config.yaml")
    )  # the hand-over files are gone
    assert (tmp_path / "helped" / "answers.jsonl").read_bytes() == (
        tmp_path / "alone" / "answers.jsonl"
    ).read_bytes()
    assert helped["eval"]["model"] == alone["eval"]["model"] and helped["eval"]["model"]["n"] == 6


def test_cpu_speed_settings_resolve_per_machine_and_run_length(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert training.cxx_compiler() is None and training.use_compile("auto", 10**6) is False
    monkeypatch.setenv("CXX", shutil.which("python3") or shutil.which("python"))  # any executable
    assert training.use_compile("auto", training.COMPILE_MIN_STEPS) is True
    assert (
        training.use_compile("auto", training.COMPILE_MIN_STEPS - 1) is False
    )  # the start would not pay back
    assert training.use_compile(True, 2) is True and training.use_compile(False, 10**6) is False

    native = {"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}
    for name in native:
        monkeypatch.setattr(torch.cpu, name, lambda name=name: native[name])
    assert training.use_cpu_autocast("auto") is False and training.use_cpu_autocast(True) is True
    native["_is_amx_tile_supported"] = True
    assert training.use_cpu_autocast("auto") is True and training.use_cpu_autocast(False) is False

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU: bf16 is the `bf16` setting's
    assert training.use_cpu_autocast(True) is False and training.use_compile("auto", 10**6) is False


def test_sft_compiled_in_bf16_autocast_resumes_and_saves_float32_weights(convs, tmp_path):
    from safetensors.torch import load_file

    logged = dict(logging_steps=1)
    eager = training.run_sft(
        _tiny_sft(convs, tmp_path / "eager", "magseg", torch_compile=False, cpu_autocast=False, **logged)
    )
    cfg = _tiny_sft(convs, tmp_path, "magseg", torch_compile=True, cpu_autocast=True, **logged)
    training.run_sft(cfg)
    out = tmp_path / "sft"
    shutil.rmtree(out / "adapter")  # interrupted: resume the compiled run from its step-2 checkpoint
    assert training.run_sft({**cfg, "max_steps": 3})["steps"] == 3
    done = json.loads((out / training.DONE_FILE).read_text())
    assert done["torch_compile"] is True and done["cpu_autocast"] is True and done["steps"] == 3
    plain = json.loads((tmp_path / "eager" / "sft" / training.DONE_FILE).read_text())
    assert plain["torch_compile"] is False and plain["cpu_autocast"] is False and eager["steps"] == 2
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert weights and {t.dtype for t in weights.values()} == {__import__("torch").float32}
    # the same first step as the eager run, up to bf16 rounding
    first = [pd.read_csv(d / "log.csv")["loss"].dropna().iloc[0] for d in (tmp_path / "eager" / "sft", out)]
    assert first[1] == pytest.approx(first[0], rel=0.05)


def test_text4seg_rows_train_in_batches_of_similar_length_and_say_so(convs, tmp_path):
    cfg = _tiny_sft(convs, tmp_path, "text4seg", torch_compile=False, cpu_autocast=False, max_steps=3)
    assert training.run_sft(cfg)["steps"] == 3
    done = json.loads((tmp_path / "sft" / training.DONE_FILE).read_text())
    assert done["length_groups"] is True and done["torch_compile"] is False and done["steps"] == 3
    with pytest.raises(ValueError, match="group_by_length and tile_group > 1 each set the order"):
        training.run_sft(
            {**cfg, "output_dir": str(tmp_path / "both"), "group_by_length": True, "tile_group": 4}
        )


def test_a_length_grouped_run_resumed_mid_epoch_ends_where_the_whole_run_does(convs, tmp_path):
    """Each epoch's batches are drawn from the seed and the epoch: a run resumed from a checkpoint in the
    middle of an epoch sees the same rows as the run that never stopped, and ends with the same weights."""
    import torch
    from safetensors.torch import load_file

    speed = dict(torch_compile=False, cpu_autocast=False, group_by_length=True)
    whole = _tiny_sft(convs, tmp_path / "whole", "text4seg", max_steps=4, save_steps=1, **speed)
    training.run_sft(whole)  # 6 rows at batch 4: epochs of 2 steps; step 3 is the first of the second
    part = _tiny_sft(convs, tmp_path / "part", "text4seg", max_steps=4, save_steps=1, **speed)
    ckpts = Path(part["output_dir"]) / "checkpoints"
    shutil.copytree(Path(whole["output_dir"]) / "checkpoints", ckpts)
    shutil.rmtree(ckpts / "checkpoint-4")  # as if stopped after step 3
    assert training.run_sft(part)["steps"] == 4
    weights = [
        load_file(Path(c["output_dir"]) / "adapter" / "adapter_model.safetensors") for c in (whole, part)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # another seed draws other batches (and other LoRA weights)
    other = _tiny_sft(convs, tmp_path / "other", "text4seg", max_steps=4, save_steps=4, seed=1, **speed)
    training.run_sft(other)
    w = load_file(Path(other["output_dir"]) / "adapter" / "adapter_model.safetensors")
    assert not all(torch.equal(w[k], weights[0][k]) for k in w)


def test_one_shape_tells_fixed_grids_from_run_length_answers(tmp_path):
    from datasets import Dataset

    from magseg_nb import models

    _, processor = models.load_model_and_processor(
        models.resolve_model("tiny-gemma3", tmp_path / "models"), device="cpu"
    )

    def rows(answers, questions=("row 1, column 2",)):
        def msg(role, text):
            return [{"role": role, "content": [{"type": "image"}, {"type": "text", "text": text}]}]

        return Dataset.from_list(
            [
                {
                    "images": ["a.png", "b.png"],
                    "prompt": msg("user", f"Segment {q}."),
                    "completion": msg("assistant", a),
                }
                for a in answers
                for q in questions
            ]
        )

    grids = ["field|tree\nwater|others", "field|field\nfield|field", "tree|tree\nwater|water"]
    assert training.one_shape(rows(grids, ("row 1, column 2", "row 4, column 3")), processor)
    assert not training.one_shape(
        rows(["field *4", "field *1, tree *2, water *1"]), processor
    )  # Text4Seg-like
    assert not training.one_shape(
        rows(grids[:1], ("row 1, column 2", "the patch in the top left corner")), processor
    )

    # multi-turn rows (one conversation per tile): each turn's tokens count
    def tile_rows(answers):
        turns = [m for a in answers for m in msg_pair(a)]
        return Dataset.from_list(
            [{"images": ["a.png"], "messages": turns}, {"images": ["b.png"], "messages": turns}]
        )

    def msg_pair(answer):
        return [
            {"role": "user", "content": [{"type": "text", "text": "Segment row 1, column 2."}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]

    assert training.one_shape(tile_rows(grids[:2]), processor)
    uneven = tile_rows(grids[:2]).to_list()
    uneven[1]["messages"] = [m for a in ["field *4", grids[0]] for m in msg_pair(a)]
    assert not training.one_shape(Dataset.from_list(uneven), processor)
    # rows of many lengths drawn at random: compile "auto" stays off, an explicit setting wins
    assert training.use_compile("auto", 10**6, steady_shapes=False) is False
    assert training.use_compile(True, 10, steady_shapes=False) is True
