"""Test-time views: the eight flips/turns, where a patch goes, the vote, and both users of it
(validation scoring in training.evaluate, tile prediction in inference.predict_tiles)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from magseg_nb import inference, prompts, textgrid, training, views
from magseg_nb.labels import NODATA
from tests.test_inference import COLORS, SPEC, blocky_semantic, oracle

MODEL = SimpleNamespace(eval=lambda: None)  # evaluate() puts the model in eval mode; the oracle needs none


def test_view_ids_and_a_bad_count():
    assert (
        views.view_ids(1) == [0] and views.view_ids(4) == [0, 1, 2, 3] and views.view_ids(8) == list(range(8))
    )
    with pytest.raises(ValueError, match=r"test_views=3: use one of \(1, 4, 8\)"):
        views.view_ids(3)


def test_every_view_is_distinct_and_undone():
    a = np.arange(12).reshape(3, 4)
    seen = [views.to_view(a, v) for v in range(8)]
    assert len({(s.shape, s.tobytes()) for s in seen}) == 8  # an asymmetric array: eight different views
    assert np.array_equal(seen[0], a) and np.array_equal(seen[4], a[:, ::-1])
    assert np.array_equal(seen[1], np.rot90(a)) and seen[1].shape == (4, 3)
    for v in range(8):
        assert np.array_equal(views.from_view(seen[v], v), a)
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3))
    assert all(np.array_equal(views.from_view(views.to_view(rgb, v), v), rgb) for v in range(8))


@pytest.mark.parametrize("v", range(8))
def test_a_patch_turns_as_a_block(v):
    """The block of the viewed tile at view_patch(p) is the viewed block of p: the grid maps back."""
    tile = np.arange(12 * 12).reshape(12, 12)
    for p in [(r, c) for r in range(3) for c in range(3)]:
        r, c = views.view_patch(p, 3, v)
        block = tile[4 * p[0] : 4 * p[0] + 4, 4 * p[1] : 4 * p[1] + 4]
        assert np.array_equal(
            views.to_view(tile, v)[4 * r : 4 * r + 4, 4 * c : 4 * c + 4], views.to_view(block, v)
        )
    assert views.view_patch(None, 1, v) is None
    assert views.view_patch((0, 0), 2, 1) == (
        1,
        0,
    )  # a quarter turn counter-clockwise: top left to bottom left


def test_vote_majority_and_ties():
    a = np.array([[0, 1], [2, 3]])
    b = np.array([[1, 1], [2, 2]])
    c = np.array([[1, 2], [3, 2]])
    assert views.vote([a, b, c]).tolist() == [[1, 1], [2, 2]]
    assert views.vote([a, b]).tolist() == [[0, 1], [2, 3]]  # every disagreement a tie: the first wins
    assert views.vote([a]).tolist() == a.tolist()
    assert views.vote([np.full((1, 1), NODATA), b[:1, :1], b[:1, :1]]).tolist() == [[1]]


def test_voted_answer_maps_each_view_back():
    truth = np.array([[0, 1, 1, 3], [2, 2, 1, 1], [0, 0, 0, 1], [3, 3, 2, 2]])
    texts = [textgrid.encode(views.to_view(truth, v), "rle") for v in range(8)]
    texts[0] = "no grid at all"  # the plain view breaks; seven views outvote it
    mask, text = views.voted_answer(texts, list(range(8)), (4, 4), "rle")
    assert (
        mask.tolist() == truth.tolist()
        and textgrid.decode(text, (4, 4), "rle").mask.tolist() == truth.tolist()
    )
    with pytest.raises(ValueError, match="3 answers for 2 views"):
        views.voted_answer(texts[:3], [0, 1], (4, 4), "rle")


@pytest.mark.parametrize("n", [4, 8])
def test_predict_tiles_votes_views(n):
    """The oracle answers whatever view it is shown exactly, so every view agrees after mapping back;
    a broken answer at one place of the prompt grid (patch (0, 0) as asked) hits another patch of the
    tile in each view and is outvoted, while the plain view alone keeps it."""
    sem = blocky_semantic(32, 32, seed=7)
    image = COLORS[sem]
    plain = inference.predict_tiles(None, None, [image], SPEC, generate=oracle(bad_patches={(0, 0)}))[0]
    assert (plain.mask[:16, :16] == 0).all() and not np.array_equal(plain.mask, sem)
    voted = inference.predict_tiles(
        None, None, [image, image[::-1]], SPEC, generate=oracle(bad_patches={(0, 0)}), test_views=n
    )
    assert np.array_equal(voted[0].mask, sem) and np.array_equal(voted[1].mask, sem[::-1])
    # answers, reports and confidence stay the plain view's: what the model wrote for the tile as it is
    assert voted[0].n_malformed == 1 and voted[0].answers == plain.answers
    assert (voted[0].confidence[:16, :16] == 0).all()


def test_evaluate_scores_the_vote_and_keeps_the_plain_answers(tmp_path, monkeypatch):
    sem = blocky_semantic(32, 32, seed=8)
    tile = prompts.TileRecord("t0", "s0", "val", COLORS[sem], sem)
    path = prompts.write_conversations([tile], tmp_path, "magseg", 4, "rle", patch_layout=2)["val"]
    ds = training.load_split(path)
    monkeypatch.setattr(training.models, "generate", oracle(bad_patches={(1, 1)}))
    rep1, ans1 = training.evaluate(MODEL, None, ds, max_new_tokens=8)
    rep8, ans8 = training.evaluate(MODEL, None, ds, max_new_tokens=8, test_views=8)
    assert rep1["test_views"] == 1 and rep8["test_views"] == 8
    assert rep1["model"]["valid_fraction"] == rep8["model"]["valid_fraction"] == 0.75
    assert rep1["model"]["cell_accuracy"] < 1.0 and rep8["model"]["cell_accuracy"] == 1.0
    assert "plain_answer" not in ans1[3] and ans8[3]["views"] == 8
    assert ans8[3]["plain_answer"] == ans1[3]["answer"] == "I cannot see any fields here, sorry."
    truth = prompts.patch_target(sem, (1, 1), 2, 4)
    assert textgrid.decode(ans8[3]["answer"], (4, 4), "rle").mask.tolist() == truth.tolist()
    assert not ans8[3]["valid"] and ans8[3]["mean_dice"] == 1.0
    assert json.loads(json.dumps(ans8))  # answers.jsonl rows stay JSON


def test_evaluate_views_of_text4seg_whole_tile_answers(tmp_path, monkeypatch):
    """Text4Seg rows (one answer per tile, variant "tile" in the row) are viewed as whole tiles."""
    sem = blocky_semantic(32, 32, seed=9)
    tile = prompts.TileRecord("t1", "s0", "val", COLORS[sem], sem)
    path = prompts.write_conversations([tile], tmp_path, "text4seg", 8, "rle")["val"]
    ds = training.load_split(path)
    truth = prompts.downsample_mask(sem, 8)
    asked = []

    def whole_tile_oracle(model, processor, examples, max_new_tokens, batch_size=8):
        out = []
        for ex in examples:
            img = np.asarray(ex["images"][0]).astype(int)
            asked.append(img.tobytes())
            seen = np.argmin(((img[:, :, None, :] - COLORS[None, None]) ** 2).sum(-1), axis=-1)
            out.append(textgrid.encode(prompts.downsample_mask(seen, 8), "rle"))
        return out

    monkeypatch.setattr(training.models, "generate", whole_tile_oracle)
    rep, ans = training.evaluate(MODEL, None, ds, max_new_tokens=8, test_views=8)
    assert len(set(asked)) == 8  # eight different images were asked about
    assert rep["model"]["cell_accuracy"] == 1.0 and ans[0]["views"] == 8
    assert textgrid.decode(ans[0]["answer"], (8, 8), "rle").mask.tolist() == truth.tolist()


@pytest.mark.parametrize("v", range(8))
def test_a_crop_only_row_is_viewed_from_its_patch(v):
    """A crop_only row holds only its patch: its view is the prompt the turned tile would give."""
    tile = np.random.default_rng(v).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for patch in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        crop = prompts.make_example(tile, "magseg", 4, "rle", patch, 2, "crop_only")["images"][0]
        got = views.row_view_example(crop, "magseg", 4, "rle", patch, 2, "crop_only", v)
        want = views.view_example(tile, "magseg", 4, "rle", patch, 2, "crop_only", v)
        assert got["prompt"] == want["prompt"] and len(got["images"]) == len(want["images"]) == 1
        assert np.array_equal(np.asarray(got["images"][0]), np.asarray(want["images"][0]))
    # every other variant's first image is the tile: the same as view_example
    same = views.row_view_example(tile, "magseg", 4, "rle", (1, 0), 2, "crop", v)
    want = views.view_example(tile, "magseg", 4, "rle", (1, 0), 2, "crop", v)
    assert same["prompt"] == want["prompt"] and len(same["images"]) == len(want["images"]) == 2
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(same["images"], want["images"], strict=True)
    )


def test_evaluate_views_of_crop_only_rows(tmp_path, monkeypatch):
    """Scoring crop_only rows in eight views asks about the turned patch, never a part of it."""
    sem = blocky_semantic(32, 32, seed=11)
    tile = prompts.TileRecord("t2", "s0", "val", COLORS[sem], sem)
    path = prompts.write_conversations([tile], tmp_path, "magseg", 4, "rle", 2, "crop_only")["val"]
    ds = training.load_split(path)
    shapes = set()

    def patch_oracle(model, processor, examples, max_new_tokens, batch_size=8):
        out = []
        for ex in examples:
            img = np.asarray(ex["images"][0]).astype(int)
            shapes.add(img.shape)
            seen = np.argmin(((img[:, :, None, :] - COLORS[None, None]) ** 2).sum(-1), axis=-1)
            out.append(textgrid.encode(prompts.downsample_mask(seen, 4), "rle"))
        return out

    monkeypatch.setattr(training.models, "generate", patch_oracle)
    rep, ans = training.evaluate(MODEL, None, ds, max_new_tokens=8, test_views=8)
    assert shapes == {(16, 16, 3)}  # each view shows a whole 16 x 16 patch (a quarter of it, before the fix)
    assert rep["model"]["cell_accuracy"] == 1.0 and len(ans) == 4 and ans[0]["views"] == 8


def augment_script():
    """``scripts/view_augmented_run.py`` as a module."""
    import importlib.util

    from tests.test_sft_experiment import ROOT

    spec = importlib.util.spec_from_file_location("aug", ROOT / "scripts" / "view_augmented_run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_view_augmented_run_turns_rows_targets_and_crops(tmp_path):
    script = augment_script()
    sem = blocky_semantic(32, 32, seed=10)
    run02 = tmp_path / "run" / "02_instruction_format"
    prompts.write_conversations(
        [prompts.TileRecord("t0", "s0", "train", COLORS[sem], sem)], run02, "magseg", 4, "rle", 2
    )
    (tmp_path / "run" / "01_dataset_prep").mkdir()
    out = script.main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "aug"), "--seed", "3"])
    before, after = prompts.read_jsonl(run02 / "magseg_train.jsonl"), prompts.read_jsonl(out)
    assert [r["id"] for r in after] == [r["id"] for r in before] and len({r["view"] for r in after}) > 1
    for b, a in zip(before, after, strict=True):
        assert a["gt_mask"] == views.to_view(np.asarray(b["gt_mask"]), a["view"]).tolist()
        tile = np.asarray(Image.open(out.parent / a["image_paths"][0]))
        assert np.array_equal(tile, views.to_view(COLORS[sem], a["view"]))
        crop_before = np.asarray(Image.open(run02 / b["image_paths"][1]))
        assert np.array_equal(
            np.asarray(Image.open(out.parent / a["image_paths"][1])), views.to_view(crop_before, a["view"])
        )
        assert (
            textgrid.decode(a["completion"][0]["content"][0]["text"], (4, 4), "rle").mask.tolist()
            == a["gt_mask"]
        )
    assert (tmp_path / "aug" / "01_dataset_prep").is_symlink() and (
        out.parent / "magseg_train.jsonl"
    ).is_file()


def test_view_augmented_run_turns_crop_only_rows_whole(tmp_path):
    """A crop_only row's one image is its patch: the augmented row holds that patch turned, whole."""
    script = augment_script()
    sem = blocky_semantic(32, 32, seed=12)
    run02 = tmp_path / "run" / "02_instruction_format"
    tile = prompts.TileRecord("t0", "s0", "train", COLORS[sem], sem)
    prompts.write_conversations([tile], run02, "magseg", 4, "rle", 2, "crop_only")
    (tmp_path / "run" / "01_dataset_prep").mkdir()
    out = script.main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "aug"), "--seed", "3"])
    before, after = prompts.read_jsonl(run02 / "magseg_train.jsonl"), prompts.read_jsonl(out)
    assert len(after) == 4 and len({r["view"] for r in after}) > 1
    for b, a in zip(before, after, strict=True):
        assert len(a["image_paths"]) == 1 and a["image_paths"][0].endswith("_crop_only.png")
        patch = np.asarray(Image.open(run02 / b["image_paths"][0]))
        turned = np.asarray(Image.open(out.parent / a["image_paths"][0]))
        assert turned.shape == (16, 16, 3) and np.array_equal(turned, views.to_view(patch, a["view"]))
        assert a["gt_mask"] == views.to_view(np.asarray(b["gt_mask"]), a["view"]).tolist()
