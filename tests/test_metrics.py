"""Metrics on hand-made masks whose answers were worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from magseg_nb import metrics


def _blocks(shape, boxes):
    """A label image with box k (r0, r1, c0, c1) labelled k+1 (later boxes overwrite earlier ones)."""
    out = np.zeros(shape, np.int32)
    for k, (r0, r1, c0, c1) in enumerate(boxes):
        out[r0:r1, c0:c1] = k + 1
    return out


# --- match_instances -------------------------------------------------------------------------------


def test_match_identical_masks_is_perfect():
    gt = _blocks((10, 10), [(0, 5, 0, 5), (0, 5, 5, 10), (5, 10, 0, 10)])
    res = metrics.match_instances(gt, gt * 7)  # ids differ, shapes equal
    assert res["tp"] == 3 and res["fp"] == 0 and res["fn"] == 0
    assert res["precision"] == res["recall"] == res["f1"] == 1.0
    assert res["mean_matched_iou"] == 1.0


def test_match_counts_by_hand():
    # GT: two 4x4 fields (16 px each). Pred A covers GT1 plus 4 extra px -> IoU 16/20 = 0.8 (match);
    # pred B covers half of GT2 -> IoU 8/16 = 0.5 (match at >= 0.5); pred C lies on background (FP).
    gt = np.zeros((8, 12), np.int32)
    gt[0:4, 0:4] = 1
    gt[0:4, 6:10] = 2
    pred = np.zeros_like(gt)
    pred[0:5, 0:4] = 10  # 20 px, 16 inside GT1
    pred[0:2, 6:10] = 20  # 8 px inside GT2
    pred[6:8, 10:12] = 30
    res = metrics.match_instances(gt, pred)
    assert (res["tp"], res["fp"], res["fn"]) == (2, 1, 0)
    assert res["precision"] == pytest.approx(2 / 3)
    assert res["recall"] == 1.0
    assert res["f1"] == pytest.approx(0.8)
    assert res["mean_matched_iou"] == pytest.approx((0.8 + 0.5) / 2)
    # Strictly above one half, B no longer matches.
    res = metrics.match_instances(gt, pred, iou_threshold=0.51)
    assert (res["tp"], res["fp"], res["fn"]) == (1, 2, 1)


def test_match_split_field_in_exact_halves_matches_once():
    gt = np.ones((4, 4), np.int32)
    pred = np.zeros_like(gt)
    pred[:, :2], pred[:, 2:] = 1, 2  # both halves have IoU exactly 0.5 with the field
    res = metrics.match_instances(gt, pred)
    assert (res["tp"], res["fp"], res["fn"]) == (1, 1, 0)


def test_match_low_threshold_uses_best_assignment():
    # GT1 = cols 0-5, GT2 = cols 6-9 (rows 0-1). Pred a = cols 0-3 (IoU 8/12 with GT1),
    # pred b = cols 3-9: with GT1 overlap 6 px -> IoU 6/(12+14-6)=0.3, with GT2 8 -> IoU 8/14=0.571.
    gt = np.zeros((2, 10), np.int32)
    gt[:, 0:6], gt[:, 6:10] = 1, 2
    pred = np.zeros_like(gt)
    pred[:, 0:3], pred[:, 3:10] = 1, 2
    res = metrics.match_instances(gt, pred, iou_threshold=0.25)
    assert res["tp"] == 2
    assert res["mean_matched_iou"] == pytest.approx((6 / 12 + 8 / 14) / 2)


def test_match_empty_sides():
    empty = np.zeros((5, 5), np.int32)
    one = empty.copy()
    one[1:3, 1:3] = 4
    assert metrics.match_instances(empty, empty)["f1"] == 1.0
    res = metrics.match_instances(one, empty)
    assert (res["tp"], res["fn"], res["precision"], res["recall"], res["f1"]) == (0, 1, 0.0, 0.0, 0.0)
    res = metrics.match_instances(empty, one)
    assert (res["fp"], res["precision"], res["f1"]) == (1, 0.0, 0.0)


def test_match_valid_mask_clips_instances():
    gt = np.zeros((4, 8), np.int32)
    gt[:, 0:4], gt[:, 4:8] = 1, 2
    pred = np.zeros_like(gt)
    pred[:, 0:4] = 5  # GT2 was never predicted because its half of the scene was not inferred
    valid = np.zeros_like(gt, bool)
    valid[:, :4] = True
    assert metrics.match_instances(gt, pred)["fn"] == 1
    res = metrics.match_instances(gt, pred, valid=valid)
    assert (res["tp"], res["fn"], res["f1"]) == (1, 0, 1.0)


def test_match_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        metrics.match_instances(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="integer"):
        metrics.match_instances(np.zeros((3, 3)), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match=">= 0"):
        metrics.match_instances(-np.ones((3, 3), int), np.zeros((3, 3), int))


def test_match_agrees_with_a_plain_loop_on_random_partitions():
    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = _random_partition(rng, (40, 40), 12)
        pred = _random_partition(rng, (40, 40), 15)
        fast = metrics.match_instances(gt, pred)
        assert fast["tp"] == _loop_tp(gt, pred)


def _random_partition(rng, shape, n):
    """Nearest-seed (Voronoi) labels with some background."""
    seeds = rng.integers(0, shape[0], size=(n, 2))
    rr, cc = np.indices(shape)
    d = (rr[..., None] - seeds[:, 0]) ** 2 + (cc[..., None] - seeds[:, 1]) ** 2
    lab = d.argmin(-1).astype(np.int32) + 1
    lab[rng.random(shape) < 0.1] = 0
    return lab


def _loop_tp(gt, pred):
    tp = 0
    for g in np.unique(gt[gt > 0]):
        gm = gt == g
        for p in np.unique(pred[gm & (pred > 0)]):
            pm = pred == p
            if (gm & pm).sum() / (gm | pm).sum() > 0.5:
                tp += 1
    return tp
