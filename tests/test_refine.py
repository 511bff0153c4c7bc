"""SAM and superpixel refinement on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest

from magseg_nb import metrics, prompts, refine
from magseg_nb.labels import CLASS_IDS, NODATA

from .fixtures import two_fields


@pytest.fixture(scope="module")
def tiny_predictor():
    return refine.load_sam("tiny", seed=0)


# --- SAM -----------------------------------------------------------------------------------------


def test_load_sam_none_and_unknown():
    assert refine.load_sam("none") is None
    with pytest.raises(
        ValueError, match="unknown SAM backend 'vit_l'.*none, superpixels, selftrained, tiny, vit_b, vit_h"
    ):
        refine.load_sam("vit_l")


def test_load_sam_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth does not exist.*'tiny' / 'none'"):
        refine.load_sam("vit_b", checkpoint=tmp_path / "nothing.pth")


def test_tiny_sam_is_deterministic_by_seed():
    a, b, c = (refine.build_tiny_sam(s).state_dict() for s in (0, 0, 1))
    key = "image_encoder.patch_embed.proj.weight"
    assert np.array_equal(a[key].numpy(), b[key].numpy())
    assert not np.array_equal(a[key].numpy(), c[key].numpy())
    assert sum(v.numel() for v in a.values()) < 300_000


def test_tiny_sam_checkpoint_round_trip(tmp_path):
    import torch

    path = tmp_path / "tiny.pt"
    torch.save(refine.build_tiny_sam(3).state_dict(), path)
    pred = refine.load_sam("tiny", checkpoint=path, seed=0, device="cpu")
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert torch.equal(pred.model.state_dict()[key], refine.build_tiny_sam(3).state_dict()[key])


def test_mask_prompt_is_aligned_with_the_padded_frame(tiny_predictor):
    binary = np.zeros((40, 80), bool)  # wide: SAM pads the bottom half of its square input
    binary[:, :40] = True
    prompt = refine.mask_prompt(binary, tiny_predictor)
    m = tiny_predictor.model.prompt_encoder.mask_input_size[0]
    assert prompt.shape == (1, m, m) == (1, 64, 64)
    assert prompt[0, :32, :32].min() == refine.LOGIT  # the left half, top 32 rows
    assert prompt[0, :32, 32:].max() == -refine.LOGIT
    assert prompt[0, 32:].max() == -refine.LOGIT  # padding is "outside"


def test_prompt_points_inside_and_outside():
    sem = two_fields()
    binary = sem == CLASS_IDS["field"]
    pts, labels = refine.prompt_points(binary, 2, 4, np.random.default_rng(0))
    assert labels.tolist() == [1, 1, 0, 0, 0, 0]
    for (x, y), lab in zip(pts.astype(int), labels, strict=True):
        assert binary[y, x] == bool(lab)


def test_sam_refine_none_backend_returns_coarse():
    sem = two_fields()
    image = np.zeros(sem.shape + (3,), np.uint8)
    out, prob = refine.sam_refine(image, sem, None, return_prob=True)
    assert np.array_equal(out, sem) and out.dtype == np.uint8 and (prob == 1).all()


@pytest.mark.parametrize("use_boxes", [False, True])
def test_sam_refine_tiny_runs_and_keeps_nodata(tiny_predictor, use_boxes):
    sem = two_fields()
    sem[:, -3:] = NODATA
    image = np.random.default_rng(0).integers(0, 255, sem.shape + (3,), dtype=np.uint8)
    out, prob = refine.sam_refine(
        image, sem, tiny_predictor, iterations=2, use_boxes=use_boxes, return_prob=True
    )
    assert out.shape == sem.shape and out.dtype == np.uint8
    assert (out[:, -3:] == NODATA).all() and set(np.unique(out[:, :-3])) <= {0, 1, 2, 3}
    assert prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    again = refine.sam_refine(image, sem, tiny_predictor, iterations=2, use_boxes=use_boxes)
    assert np.array_equal(out, again)  # deterministic


def test_sam_refine_min_iou_guard_and_kept_classes(tiny_predictor):
    """min_iou=1 keeps every refined class as coarse unless SAM agrees exactly; classes left out of
    `classes` are never touched."""
    sem = two_fields()
    image = np.random.default_rng(1).integers(0, 255, sem.shape + (3,), dtype=np.uint8)
    out = refine.sam_refine(image, sem, tiny_predictor, classes=(CLASS_IDS["field"],), min_iou=1.01)
    assert np.array_equal(out, sem)
    out = refine.sam_refine(image, sem, tiny_predictor, classes=(CLASS_IDS["field"],))
    for cid in (CLASS_IDS["tree"], CLASS_IDS["water"]):
        assert np.array_equal(out == cid, sem == cid)


def test_sam_refine_size_mismatch():
    with pytest.raises(ValueError, match="differ in size"):
        refine.sam_refine(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 12), np.uint8), None)


# --- superpixels ---------------------------------------------------------------------------------


def test_superpixel_refinement_snaps_class_borders_to_the_image():
    """A field/tree border off the 8 px cell grid: the coarse mask is blocky, the superpixel vote
    follows the colour edge, so field IoU rises; nodata stays nodata."""

    rng = np.random.default_rng(0)
    truth = np.full((128, 128), CLASS_IDS["field"], np.uint8)
    rr, cc = np.mgrid[:128, :128]
    truth[(rr - 60) ** 2 + (cc - 70) ** 2 < 30**2] = CLASS_IDS["tree"]  # a round orchard
    image = np.where(truth[..., None] == CLASS_IDS["tree"], [40, 110, 40], [200, 180, 90]).astype(float)
    image = np.clip(image + rng.normal(0, 8, image.shape), 1, 255).astype(np.uint8)
    coarse = np.kron(prompts.downsample_mask(truth, 16), np.ones((8, 8), int)).astype(np.uint8)
    coarse[:, :8] = NODATA
    refined, prob = refine.load_sam("superpixels").refine(image, coarse)
    assert refined.shape == truth.shape and prob.dtype == np.float32
    assert (refined[:, :8] == NODATA).all() and (prob[:, :8] == 0).all()

    def iou(pred):
        keep = pred != NODATA
        return metrics.semantic_from_cm(metrics.confusion_matrix(truth[keep], pred[keep]))["iou"][
            CLASS_IDS["tree"]
        ]

    assert iou(refined) > iou(coarse) + 0.02 and iou(refined) > 0.9
    assert 0.5 <= prob[coarse != NODATA].min() and prob.max() <= 1.0


def _orchard_tiles(n: int = 3):
    """(image, truth) tiles: fields with a dozen round tree groups each, 4 to 14 px across, off the cell grid."""
    rng = np.random.default_rng(1)
    rr, cc = np.mgrid[:128, :128]
    tiles = []
    for _ in range(n):
        truth = np.full((128, 128), CLASS_IDS["field"], np.uint8)
        for _ in range(12):
            r0, c0, radius = rng.uniform(0, 128), rng.uniform(0, 128), rng.uniform(4, 14)
            truth[(rr - r0) ** 2 + (cc - c0) ** 2 < radius**2] = CLASS_IDS["tree"]
        colour = np.where(truth[..., None] == CLASS_IDS["tree"], [40, 110, 40], [200, 180, 90]).astype(float)
        tiles.append((np.clip(colour + rng.normal(0, 8, colour.shape), 1, 255).astype(np.uint8), truth))
    return tiles


def test_selftrained_refinement_beats_the_superpixel_vote_without_seeing_the_truth():
    """Fitted on the blocky coarse masks alone, the pixel classifier learns the two colours and labels the
    tree groups' edges pixel by pixel; the superpixel vote of the coarse mask keeps more of the blocks."""

    tiles = _orchard_tiles()
    coarse = [
        np.kron(prompts.downsample_mask(truth, 16), np.ones((8, 8), int)).astype(np.uint8)
        for _, truth in tiles
    ]
    coarse[0][:, :8] = NODATA
    refiner = refine.load_sam("selftrained", seed=0)
    assert isinstance(refiner, refine.SelfTrainedRefiner) and not refiner.fitted
    with pytest.raises(RuntimeError, match=r"not fitted: call \.fit\(tiles\)"):
        refiner.refine(tiles[0][0], coarse[0])
    fitted = refiner.fit((image, c) for (image, _), c in zip(tiles, coarse, strict=True))
    assert fitted.fitted and fitted.model is not None and not refiner.fitted  # a fitted copy

    def tree_iou(pred, truth):
        keep = pred != NODATA
        return metrics.semantic_from_cm(metrics.confusion_matrix(truth[keep], pred[keep]))["iou"][
            CLASS_IDS["tree"]
        ]

    ious = []
    for (image, truth), c in zip(tiles, coarse, strict=True):
        refined, prob = fitted.refine(image, c)
        assert refined.shape == truth.shape and prob.dtype == np.float32
        assert ((refined == NODATA) == (c == NODATA)).all() and (prob[c == NODATA] == 0).all()
        plain, _ = refine.SuperpixelRefiner().refine(image, c)
        ious.append((tree_iou(c, truth), tree_iou(plain, truth), tree_iou(refined, truth)))
    coarse_iou, superpixel_iou, selftrained_iou = np.mean(ious, axis=0)
    assert coarse_iou < 0.75 and superpixel_iou < 0.9 and selftrained_iou > 0.95


def test_selftrained_refinement_of_one_class_falls_back_to_superpixels_and_needs_tiles():
    image, truth = _orchard_tiles(1)[0]
    field = np.full(truth.shape, CLASS_IDS["field"], np.uint8)
    fitted = refine.SelfTrainedRefiner().fit([(image, field)])
    assert fitted.fitted and fitted.fallback and fitted.model is None
    refined, prob = fitted.refine(image, field)
    expected, expected_prob = refine.SuperpixelRefiner().refine(image, field)
    assert (refined == expected).all() and np.allclose(prob, expected_prob)
    with pytest.raises(ValueError, match="got no tiles: it learns from the coarse masks it refines"):
        refine.SelfTrainedRefiner().fit([])


def test_sam_settings_rename_notebook_parameters_and_fit_sam_refine():
    import inspect

    s = refine.SamSettings.from_params(
        {"sam_points": 5, "sam_negative_points": 1, "seed": 7, "min_field_px": 9}
    )
    assert (s.n_pos, s.n_neg, s.seed, s.iterations) == (5, 1, 7, 2)
    assert set(s.kwargs()) <= set(inspect.signature(refine.sam_refine).parameters)
