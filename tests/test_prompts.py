"""Instruction formats, targets, and the conversation datasets TRL trains on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from magseg_nb import prompts, textgrid
from magseg_nb.labels import NODATA


def _tile(tile_id="s0_r0_c0", split="train", size=64, seed=0):
    rng = np.random.default_rng(seed)
    semantic = np.kron(rng.integers(0, 4, (4, 4)), np.ones((size // 4, size // 4))).astype(np.uint8)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    return prompts.TileRecord(tile_id, "s0", split, image, semantic)


def test_downsample_majority_ignores_nodata():
    mask = np.array(
        [
            [1, 1, 2, 2],
            [1, 0, 2, NODATA],
            [NODATA, NODATA, 3, 3],
            [NODATA, 0, 3, 0],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(prompts.downsample_mask(mask, 2), [[1, 2], [0, 3]])
    np.testing.assert_array_equal(prompts.downsample_mask(np.full((4, 4), NODATA), 2), np.zeros((2, 2)))


def test_downsample_uneven_and_upsampling():
    mask = np.zeros((5, 7), np.uint8)
    mask[:, 4:] = 1
    out = prompts.downsample_mask(mask, 2)
    np.testing.assert_array_equal(out, [[0, 1], [0, 1]])
    np.testing.assert_array_equal(
        prompts.downsample_mask(np.array([[1, 2], [3, 0]]), 4), np.kron([[1, 2], [3, 0]], np.ones((2, 2)))
    )


@settings(max_examples=40, deadline=None)
@given(cells=st.integers(1, 8), scale=st.integers(1, 5), seed=st.integers(0, 99))
def test_downsample_of_blocks_is_exact(cells, scale, seed):
    grid = np.random.default_rng(seed).integers(0, 4, (cells, cells)).astype(np.uint8)
    full = np.kron(grid, np.ones((scale, scale), np.uint8))
    np.testing.assert_array_equal(prompts.downsample_mask(full, cells), grid)


def test_patch_targets_tile_the_whole_mask():
    """The P x P patch targets, put side by side, equal the tile at P * grid cells (same effective resolution)."""
    tile = _tile(size=64)
    layout, grid = 2, 8
    parts = [
        [prompts.patch_target(tile.semantic, (r, c), layout, grid) for c in range(layout)]
        for r in range(layout)
    ]
    np.testing.assert_array_equal(
        np.block(parts), prompts.patch_target(tile.semantic, None, 1, layout * grid)
    )


def test_row_bounds_of_patch_and_whole_tile_rows():
    patch_row = {"patch_row": 1, "patch_col": 2, "patch_layout": 4}
    assert prompts.row_bounds(patch_row, (128, 96)) == (32, 64, 48, 72)
    last = {"patch_row": 3, "patch_col": 3, "patch_layout": 4}
    assert prompts.row_bounds(last, (130, 130)) == (97, 130, 97, 130)  # ends at the edge, as the targets do
    assert prompts.row_bounds({"patch_row": None, "patch_layout": None}, (128, 96)) == (0, 128, 0, 96)


def test_make_example_variants():
    img = Image.fromarray(_tile(size=96).image)
    index = prompts.make_example(img, "magseg", 8, "plain", (1, 0), 2, "index")
    assert len(index["images"]) == 1 and len(index["prompt"]) == 1
    content = index["prompt"][0]["content"]
    assert content[0] == {"type": "image"} and "row 2, column 1" in content[-1]["text"]
    assert "2x2 patches" in content[-1]["text"] and "8x8 grid" in content[-1]["text"]
    crop = prompts.make_example(img, "magseg", 8, "rle", (1, 0), 2, "crop")
    assert crop["images"][1].size == (48, 48) and "close-up" in crop["prompt"][0]["content"][-1]["text"]
    assert "'label *count'" in crop["prompt"][0]["content"][-1]["text"]
    mark = prompts.make_example(img, "magseg", 8, "plain", (1, 0), 2, "mark")
    marked = np.asarray(mark["images"][1])
    assert (marked[48, 10] == prompts.MARK_COLOR).all() and not (
        np.asarray(img)[48, 10] == prompts.MARK_COLOR
    ).all()
    assert [c["type"] for c in mark["prompt"][0]["content"]] == ["image", "image", "text"]
    t4s = prompts.make_example(img, "text4seg", 16, "plain")
    assert (
        len(t4s["images"]) == 1 and "whole image into a 16x16 grid" in t4s["prompt"][0]["content"][-1]["text"]
    )


def test_make_example_rejects_bad_settings():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="needs patch"):
        prompts.make_example(img, "magseg", 8, "plain", None, 2)
    with pytest.raises(ValueError, match="outside a 2x2 layout"):
        prompts.make_example(img, "magseg", 8, "plain", (2, 0), 2)
    with pytest.raises(ValueError, match="unknown variant"):
        prompts.make_example(img, "magseg", 8, "plain", (0, 0), 2, "zoom")
    with pytest.raises(ValueError, match="unknown format"):
        prompts.make_example(img, "text5seg", 8, "plain")


def test_write_conversations_and_load(tmp_path):
    tiles = [_tile("a", "train", seed=1), _tile("b", "train", seed=2), _tile("c", "val", seed=3)]
    paths = prompts.write_conversations(tiles, tmp_path, "magseg", 8, "rle", 2, "crop")
    assert sorted(paths) == ["train", "val"] and paths["train"].name == "magseg_train.jsonl"
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(rows) == 2 * 4  # P*P conversations per tile
    row = rows[1]
    assert row["id"] == "a__p0_1" and (row["patch_row"], row["patch_col"], row["patch_layout"]) == (0, 1, 2)
    assert row["image_paths"] == ["images/a.png", "images/a__p0_1_crop.png"]
    assert all((tmp_path / p).exists() for p in row["image_paths"])
    gt = np.array(row["gt_mask"])
    np.testing.assert_array_equal(gt, prompts.patch_target(tiles[0].semantic, (0, 1), 2, 8))
    assert row["completion"][0]["content"][0]["text"] == textgrid.encode(gt, "rle")

    ds = prompts.load_conversations(paths["train"])
    assert len(ds) == 8 and {"images", "prompt", "completion", "gt_mask", "tile_id"} <= set(ds.column_names)
    first = ds[0]
    assert [im.size for im in first["images"]] == [(64, 64), (32, 32)]
    assert first["prompt"][0]["role"] == "user" and first["completion"][0]["role"] == "assistant"
    assert np.array(first["gt_mask"]).shape == (8, 8)


def test_text4seg_rows_one_per_tile(tmp_path):
    paths = prompts.write_conversations([_tile("a"), _tile("b", seed=5)], tmp_path, "text4seg", 16, "plain")
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and rows[0]["patch_row"] is None
    assert rows[0]["image_paths"] == ["images/a.png"] and np.array(rows[0]["gt_mask"]).shape == (16, 16)
    decoded = textgrid.decode(rows[0]["completion"][0]["content"][0]["text"], (16, 16))
    np.testing.assert_array_equal(decoded.mask, rows[0]["gt_mask"])


def test_load_conversations_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebook 02"):
        prompts.load_conversations(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        prompts.load_conversations(bad)
    paths = prompts.write_conversations([_tile("a")], tmp_path, "text4seg", 4, "plain")
    (tmp_path / "images" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="a.png"):
        prompts.load_conversations(paths["train"])


def test_conversation_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from magseg_nb.viz import formats as vf

    tile = _tile(size=64)
    paths = prompts.write_conversations([tile], tmp_path, "magseg", 4, "plain", 2, "mark")
    ds = prompts.load_conversations(paths["train"])
    fig = vf.show_conversation(ds[3], ds[3]["images"])
    assert len(fig.axes) == 4
    parts = [[prompts.patch_target(tile.semantic, (r, c), 2, 4) for c in range(2)] for r in range(2)]
    fig = vf.show_patch_mosaic(tile.image, parts, 2, prompts.patch_target(tile.semantic, None, 1, 8))
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), fig.axes[2].images[0].get_array())
    lengths = prompts.answer_lengths(_FakeTokenizer(), paths["train"])
    assert lengths.tolist() == [4 * 4 * 2 - 1 + 1] * 4


class _FakeTokenizer:
    """Splits on '|' and newlines, as the Gemma-like tokenizer does for plain grids."""

    def __call__(self, texts, add_special_tokens=False):
        import re

        return {"input_ids": [re.findall(r"[^|\n]+|[|\n]", t) for t in texts]}


def test_token_budget_says_which_tokenizer_counted_and_when_it_is_an_estimate(tmp_path):
    """The gpu profile without its weights here: the tiny tokenizer stands in; the table and the sentence say so."""
    from magseg_nb import models

    processor, counted_with = models.processor_for_counting("google/gemma-3-4b-it", tmp_path)
    assert counted_with == models.TINY_TOKENIZER_NOTE
    settings = prompts.budget_settings([16], [8], encodings=["plain"], variants=["crop"])
    tiles = [_tile(), _tile("s0_r0_c1", seed=1)]
    budget = prompts.token_budget(processor, tiles, settings, tokenizer=counted_with, estimate=True)
    assert len(budget) == 2 and budget["tokenizer"].tolist() == [counted_with] * 2
    assert budget["estimate"].tolist() == [True, True] and budget["gemma3_estimate"].tolist() == [True, True]
    note = prompts.budget_note(budget, "google/gemma-3-4b-it")
    assert note == (
        f"Token counts are an estimate: made with the {counted_with}, not with the tokenizer of "
        "google/gemma-3-4b-it, whose weights are not on this machine. The gemma3_* columns put in "
        "gemma-3-4b-it's image tokens but count answers with that same tokenizer: an estimate of the real Gemma 3."
    )
    # The same counts for a profile whose model is this tokenizer's own, with answers also counted by a
    # second tokenizer for the gemma3_* columns: neither flag is set, and the name defaults to the tokenizer's.
    exact = prompts.token_budget(processor, tiles, settings, real_tokenizer=processor.tokenizer)
    counts = ["prompt_tokens", "answer_tokens_mean", "gemma3_answer_tokens_mean", "tile_tokens"]
    assert exact[counts].equals(budget[counts])
    assert not exact["estimate"].any() and not exact["gemma3_estimate"].any()
    assert exact["tokenizer"].iloc[0] == processor.tokenizer.name_or_path != ""
    assert prompts.budget_note(exact, "tiny-gemma3") == (
        f"Token counts made with the {processor.tokenizer.name_or_path}, the tokenizer of tiny-gemma3. "
        "The gemma3_* columns count answers with the real Gemma 3 tokenizer."
    )
