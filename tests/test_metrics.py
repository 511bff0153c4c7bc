"""Metrics on hand-made masks whose answers were worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

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


# --- ALU-style merging, over/under-segmentation, per-field table -----------------------------------


def _split_and_merge_scene():
    """GT: fields 1 (rows 0-3, cols 0-7, 32 px), 2 and 3 (rows 5-7, cols 0-3 / 4-7, 12 px each).

    Pred 1 and 2 split field 1 into two halves (16 px each, IoU 0.5 each: one matches one-to-one);
    pred 3 covers fields 2 and 3 together (24 px, IoU 0.5 with each: one of them matches).
    """
    gt = np.zeros((8, 8), np.int32)
    gt[0:4, :] = 1
    gt[5:8, 0:4], gt[5:8, 4:8] = 2, 3
    pred = np.zeros_like(gt)
    pred[0:4, 0:4], pred[0:4, 4:8] = 1, 2
    pred[5:8, :] = 3
    return gt, pred


def test_alu_merge_joins_split_predictions():
    gt, pred = _split_and_merge_scene()
    fields, preds = metrics.field_table(gt, pred)
    f = fields.set_index("gt_id")
    # One-to-one: pred 1 takes field 1 (ties go to the lower id), pred 3 takes field 2.
    assert f["pred_id"].tolist() == [1, 3, 0]
    assert f["iou"].tolist() == [0.5, 0.5, 0.0]
    # ALU: preds 1 and 2 lie fully inside field 1 -> merged -> IoU 1.0. Pred 3 is only half inside
    # field 2 (12 of 24 px = 0.5 >= min_inside) -> assigned to field 2 alone -> IoU 0.5.
    assert f["n_merged"].tolist() == [2, 1, 0]
    assert f["alu_iou"].tolist() == [1.0, 0.5, 0.0]
    assert f["over_segmented"].tolist() == [True, False, False]
    assert f["under_segmented"].tolist() == [False, True, True]
    # Persello errors for field 1: best pred covers 16/32 -> OS 0.5, pred fully inside -> US 0.
    assert f.loc[1, "os_error"] == 0.5 and f.loc[1, "us_error"] == 0.0
    assert f.loc[2, "os_error"] == 0.0 and f.loc[2, "us_error"] == 0.5
    p = preds.set_index("pred_id")
    assert p["gt_id"].tolist() == [1, 0, 2] and p["area_px"].tolist() == [16, 16, 24]

    s = metrics.instance_scores(gt, pred)
    assert s["inst_precision"] == pytest.approx(2 / 3) and s["inst_recall"] == pytest.approx(2 / 3)
    # After merging: 2 predicted objects, both matched; 3 fields -> P 1, R 2/3, F1 0.8.
    assert s["alu_precision"] == 1.0 and s["alu_recall"] == pytest.approx(2 / 3)
    assert s["alu_f1"] == pytest.approx(0.8)
    assert s["over_seg_rate"] == pytest.approx(1 / 3) and s["under_seg_rate"] == pytest.approx(2 / 3)


def test_alu_keeps_predictions_that_are_mostly_outside():
    gt = np.zeros((4, 10), np.int32)
    gt[:, 0:4] = 1
    pred = np.zeros_like(gt)
    pred[:, 0:2] = 1  # inside the field
    pred[:, 3:10] = 2  # 4 of 28 px inside: not merged
    fields, _ = metrics.field_table(gt, pred)
    assert fields["n_merged"].tolist() == [1]
    assert fields["alu_iou"].tolist() == [0.5]


def test_field_table_and_scores_with_an_empty_side():
    gt, _ = _split_and_merge_scene()
    empty = np.zeros_like(gt)
    fields, preds = metrics.field_table(gt, empty)
    assert len(fields) == 3 and len(preds) == 0
    assert (
        (~fields["matched"]).all() and (fields["os_error"] == 1.0).all() and (fields["us_error"] == 1.0).all()
    )
    s = metrics.instance_scores(gt, empty)
    assert s["inst_recall"] == 0.0 and s["alu_f1"] == 0.0 and s["over_seg_rate"] == 0.0
    fields, preds = metrics.field_table(empty, gt)
    assert len(fields) == 0 and len(preds) == 3 and (~preds["matched"]).all()
    assert metrics.instance_scores(empty, gt)["inst_precision"] == 0.0
    assert metrics.instance_scores(empty, empty)["inst_f1"] == 1.0


def test_field_table_areas_in_square_metres():
    gt, pred = _split_and_merge_scene()
    fields, preds = metrics.field_table(gt, pred, pixel_area_m2=0.25)
    assert fields["area_m2"].tolist() == [8.0, 3.0, 3.0]
    assert preds["area_m2"].tolist() == [4.0, 4.0, 6.0]


# --- semantic ---------------------------------------------------------------------------------------


def test_confusion_matrix_and_scores_by_hand():
    gt = np.array([[0, 0, 1, 1], [1, 1, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [1, 0, 2, 3]])
    cm = metrics.confusion_matrix(gt, pred)
    expected = np.zeros((4, 4), int)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[1, 0], expected[2, 2] = 1, 1, 3, 1, 1
    np.testing.assert_array_equal(cm, expected)
    df = metrics.semantic_scores(cm)
    # others: tp 1, gt 2, pred 2 -> IoU 1/3, Dice 1/2; field: tp 3, gt 4, pred 4 -> IoU 3/5, Dice 3/4.
    assert df.loc["others", "iou"] == pytest.approx(1 / 3)
    assert df.loc["field", "iou"] == pytest.approx(3 / 5)
    assert df.loc["field", "dice"] == pytest.approx(0.75)
    assert df.loc["field", "precision"] == 0.75 and df.loc["tree", "iou"] == 1.0
    assert np.isnan(df.loc["water", "iou"])  # ignored pixel was the only water: absent class
    assert df.attrs["miou"] == pytest.approx((1 / 3 + 3 / 5 + 1) / 3)
    assert df.attrs["pixel_accuracy"] == pytest.approx(5 / 7)
    assert df["support"].tolist() == [2, 4, 1, 0]


def test_confusion_matrix_ignores_prediction_nodata_and_rejects_unknown_ids():
    gt = np.array([[1, 1]])
    assert metrics.confusion_matrix(gt, np.array([[1, 255]])).sum() == 1
    with pytest.raises(ValueError, match="class ids \\[7\\]"):
        metrics.confusion_matrix(gt, np.array([[1, 7]]))


# --- boundary ---------------------------------------------------------------------------------------


def test_boundary_f1_pixels_and_metres():
    gt = np.zeros((20, 20), np.int32)
    gt[:, 10:] = 1
    pred = np.zeros_like(gt)
    pred[:, 12:] = 1  # the edge is shifted by 2 px
    # inner boundaries (field pixels next to another label): gt col 10, pred col 12 -> 2 px apart
    assert metrics.boundary_f1(gt, pred, tolerance_px=0)["f1"] == 0.0
    assert metrics.boundary_f1(gt, pred, tolerance_px=1)["f1"] == 0.0
    assert metrics.boundary_f1(gt, pred, tolerance_px=2)["f1"] == 1.0
    half = pred.copy()
    half[10:, 10:12] = 1  # lower half of the edge now exact
    # pred edge: rows 0-9 at col 12, rows 10-19 at col 10, plus the step (row 10, col 11): 21 px,
    # 11 of them within 1 px of col 10; gt edge rows 9-19 lie within 1 px of a pred edge: 11 of 20.
    one = metrics.boundary_f1(gt, half, tolerance_px=1)
    assert one["precision"] == pytest.approx(11 / 21) and one["recall"] == pytest.approx(11 / 20)
    # 0.5 m pixels: 1 m = 2 px
    assert metrics.boundary_f1(gt, pred, tolerance_px=None, tolerance_m=1.0, pixel_size=0.5)["f1"] == 1.0
    assert metrics.boundary_f1(gt, pred, tolerance_px=None, tolerance_m=0.5, pixel_size=0.5)["f1"] == 0.0
    with pytest.raises(ValueError, match="pixel_size"):
        metrics.boundary_f1(gt, pred, tolerance_m=1.0)


def test_boundary_f1_empty_sides():
    empty = np.zeros((5, 5), np.int32)
    one = empty.copy()
    one[1:4, 1:4] = 1
    assert metrics.boundary_f1(empty, empty)["f1"] == 1.0
    assert metrics.boundary_f1(one, empty)["f1"] == 0.0


# --- pooling and bootstrap --------------------------------------------------------------------------


def _tile(shift):
    sem = np.zeros((16, 16), np.uint8)
    sem[:, 8:] = 1
    inst = (sem == 1).astype(np.int32)
    psem = np.zeros_like(sem)
    psem[:, 8 + shift :] = 1
    return sem, psem, inst, (psem == 1).astype(np.int32)


def test_tile_counts_pool_to_scores():
    import pandas as pd

    counts = pd.DataFrame([metrics.tile_counts(*_tile(s), pixel_size=0.5) for s in (0, 0, 2)])
    assert counts[["tp", "n_gt", "n_pred"]].sum().tolist() == [3, 3, 3]
    table = metrics.bootstrap_scores(counts, n_boot=200).set_index("metric")
    assert table.loc["inst_f1", "value"] == 1.0
    # field IoU pooled: perfect tiles 128/128 twice, shifted tile 96/128 -> (128+128+96)/(3*128)
    assert table.loc["iou_field", "value"] == pytest.approx(352 / 384)
    lo, hi = table.loc["iou_field", ["lo", "hi"]]
    assert 0.75 - 1e-9 <= lo <= 352 / 384 <= hi <= 1.0
    assert table.loc["boundary_m_f1", "value"] == 1.0  # 1 m = 2 px covers the shift
    assert table.loc["boundary_px_f1", "value"] == 1.0
    assert (table["n_tiles"] == 3).all()


def test_instance_only_method_has_nan_semantic_scores():
    import pandas as pd

    sem, _, inst, _ = _tile(0)
    counts = pd.DataFrame([metrics.tile_counts(sem, None, inst, inst, pixel_size=1.0)])
    table = metrics.bootstrap_scores(counts, n_boot=50).set_index("metric")
    assert np.isnan(table.loc["miou", "value"]) and table.loc["inst_f1", "value"] == 1.0


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    values = [0.2, 0.4, 0.6, 0.8]
    est, lo, hi = metrics.bootstrap_ci(values, n_boot=500, seed=1)
    assert est == pytest.approx(0.5) and 0.2 <= lo < 0.5 < hi <= 0.8
    assert metrics.bootstrap_ci(values, n_boot=500, seed=1) == (est, lo, hi)
    assert metrics.bootstrap_ci([5.0, 5.0]) == (5.0, 5.0, 5.0)
    assert all(np.isnan(metrics.bootstrap_ci([])))


def test_block_bootstrap_is_wider_than_tile_bootstrap_on_correlated_tiles():
    """Tiles of one block share their error (like overlapping tiles sharing fields and haze): resampling
    tiles treats 40 tiles as independent, resampling the 8 blocks does not, so its interval is wider."""
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for b in range(8):
        p_correct = rng.uniform(0.3, 0.95)  # the block's own difficulty, shared by its tiles
        for t in range(5):
            n_field = 100
            tp = rng.binomial(n_field, p_correct)
            rows.append({"tile_id": f"b{b}_t{t}", "block_id": f"b{b}", **_cm_counts(n_field, tp)})
    counts = pd.DataFrame(rows)
    tile = metrics.bootstrap_scores(counts, 500, metrics=["recall_field"]).iloc[0]
    block = metrics.bootstrap_scores(counts, 500, metrics=["recall_field"], cluster="block_id").iloc[0]
    assert tile["value"] == block["value"]
    assert (block["hi"] - block["lo"]) > 1.5 * (tile["hi"] - tile["lo"])
    assert block["n_units"] == 8 and tile["n_units"] == 40 and block["resampled"] == "block_id"
    # Paired differences resample the same blocks for both methods.
    better = counts.assign(cm_1_1=np.minimum(counts["cm_1_1"] + 5, 100))
    better["cm_1_0"] = 100 - better["cm_1_1"]
    diff = metrics.compare_methods(counts, better, ["recall_field"], 300, cluster="block_id").iloc[0]
    assert diff["n_units"] == 8 and 0 < diff["lo"] <= diff["diff"] <= diff["hi"]


def test_block_bootstrap_covers_the_truth_near_nominal_on_independent_blocks():
    import pandas as pd

    rng = np.random.default_rng(1)
    truth, hits, trials = 0.7, 0, 120
    for k in range(trials):
        rows = []
        for b in range(30):
            tp = rng.binomial(50, truth)
            rows.append({"tile_id": f"{b}", "block_id": f"{b // 2}", **_cm_counts(50, tp)})
        t = metrics.bootstrap_scores(
            pd.DataFrame(rows), 300, seed=k, metrics=["recall_field"], cluster="block_id"
        ).iloc[0]
        hits += t["lo"] <= truth <= t["hi"]
    assert 0.85 <= hits / trials <= 0.99  # nominal 0.95, percentile bootstrap with 15 blocks


def _cm_counts(n_field: int, tp: int) -> dict:
    """Confusion-matrix columns of a tile whose n_field field pixels are tp right, the rest 'others'."""
    cm = {f"cm_{i}_{j}": 0 for i in range(4) for j in range(4)}
    cm["cm_1_1"], cm["cm_1_0"], cm["cm_0_0"] = tp, n_field - tp, 50
    return cm


def test_worst_tiles_rank_by_an_error_defined_on_every_tile():
    import pandas as pd

    scores = pd.DataFrame(
        {"iou_field": [0.9, np.nan, 0.2, np.nan], "error_share": [0.05, 0.6, 0.3, 0.0]},
        index=["a", "b", "c", "d"],
    )
    worst, undefined = metrics.worst_tiles(scores, n=2)
    assert worst == ["b", "c"] and undefined == ["b", "d"]


# --- properties --------------------------------------------------------------------------------------

_labels = arrays(np.int32, (12, 12), elements=st.integers(0, 6))


@settings(max_examples=60, deadline=None)
@given(_labels, _labels, st.integers(0, 10_000))
def test_matching_properties(gt, pred, shift):
    res = metrics.match_instances(gt, pred)
    # Swapping the sides swaps false positives and negatives; relabelling ids changes nothing.
    swapped = metrics.match_instances(pred, gt)
    assert (swapped["tp"], swapped["fp"], swapped["fn"]) == (res["tp"], res["fn"], res["fp"])
    relabelled = metrics.match_instances(gt, np.where(pred > 0, pred + shift, 0))
    assert relabelled == res
    assert res["tp"] == _greedy(gt, pred)
    fields, preds = metrics.field_table(gt, pred)
    assert fields["matched"].sum() == res["tp"] and preds["matched"].sum() == res["tp"]
    assert (fields["alu_matched"].sum() >= 0) and (fields["n_merged"].sum() <= len(preds))


def _greedy(gt, pred):
    """Pairs at IoU >= 0.5 taken best first, each field and prediction at most once (a plain loop)."""
    pairs = []
    for g in np.unique(gt[gt > 0]):
        gm = gt == g
        for p in np.unique(pred[gm & (pred > 0)]):
            pm = pred == p
            iou = (gm & pm).sum() / (gm | pm).sum()
            if iou >= 0.5:
                pairs.append((-iou, g, p))
    used_g, used_p, tp = set(), set(), 0
    for _, g, p in sorted(pairs):
        if g not in used_g and p not in used_p:
            used_g.add(g)
            used_p.add(p)
            tp += 1
    return tp
