"""Metrics on hand-made masks whose answers were worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from magseg_nb import metrics
from magseg_nb.labels import CLASSES


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


# --- a synthetic run folder in the documented layout (01 scenes + baseline, 05 variants) -----------

SCENES = {"vn0": ("Vietnam", (500000.0, 1200000.0)), "kh0": ("Cambodia", (450000.0, 1300000.0))}
SIZE, TILE, RES = 128, 64, 0.5


def _synthetic_scene(rng):
    """Semantic + instances: 14 px fields on a 16 px grid (2 px bunds), a pond and a tree block."""
    sem = np.zeros((SIZE, SIZE), np.uint8)
    inst = np.zeros((SIZE, SIZE), np.int32)
    k = 0
    for r in range(0, SIZE, 16):
        for c in range(0, SIZE, 16):
            k += 1
            sem[r : r + 14, c : c + 14], inst[r : r + 14, c : c + 14] = 1, k
    sem[96:128, 0:32], inst[96:128, 0:32] = 3, 0
    sem[0:16, 96:128], inst[0:16, 96:128] = 2, 0
    return sem, inst


def _degrade(sem, inst, rng, cell, n_split, n_merge):
    """A plausible prediction: blocky semantic (cell-sized majority), some fields split, some merged."""
    from skimage.measure import label

    coarse = (
        sem.reshape(SIZE // cell, cell, SIZE // cell, cell).transpose(0, 2, 1, 3).reshape(-1, cell * cell)
    )
    coarse = np.array([np.bincount(v, minlength=4).argmax() for v in coarse], np.uint8)
    coarse = np.kron(coarse.reshape(SIZE // cell, SIZE // cell), np.ones((cell, cell), np.uint8))
    refined = sem.copy()
    ids = rng.permutation(np.unique(inst[inst > 0]))
    for g in ids[:n_merge]:  # erase the bund to the right: two fields merge
        rr, cc = np.nonzero(inst == g)
        refined[rr.min() : rr.max() + 1, cc.max() + 1 : min(cc.max() + 3, SIZE)] = 1
    pred_inst = label(refined == 1, connectivity=1).astype(np.int32)
    nxt = pred_inst.max() + 1
    for g in ids[n_merge : n_merge + n_split]:  # split a field in two halves
        rr, cc = np.nonzero((inst == g) & (pred_inst > 0))
        if rr.size:
            half = cc < cc.min() + (cc.max() - cc.min() + 1) // 2
            pred_inst[rr[half], cc[half]] = nxt
            nxt += 1
    return coarse, refined, pred_inst


def _write(path, arr, transform, nodata=None):
    from magseg_nb import geo

    geo.write_geotiff(path, arr, "EPSG:32648", transform, nodata=nodata)


def _polygons(inst, sem, transform, **cols):
    import geopandas as gpd
    import rasterio.features
    from shapely.geometry import shape

    rows = [(int(v), shape(g)) for g, v in rasterio.features.shapes(inst, mask=inst > 0, transform=transform)]
    gdf = gpd.GeoDataFrame(
        {"field_id": [r[0] for r in rows]}, geometry=[r[1] for r in rows], crs="EPSG:32648"
    )
    gdf["class"] = [CLASSES[int(sem[inst == i].max())] for i in gdf["field_id"]]
    for k, v in cols.items():
        gdf[k] = v
    return gdf


def make_synthetic_run(run_dir: Path, variants=("magseg-sft", "magseg-grpo", "text4seg-sft")) -> Path:
    """01_dataset_prep and 05_inference folders in the documented layout, with finished state files."""
    import json

    import pandas as pd
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    run01, run05 = run_dir / "01_dataset_prep", run_dir / "05_inference"
    tiles, scenes = [], []
    for s_i, (sid, (country, (x0, y0))) in enumerate(SCENES.items()):
        transform = from_origin(x0, y0, RES, RES)
        sem, inst = _synthetic_scene(rng)
        inst = np.where(inst > 0, inst + 1000 * s_i, 0).astype(np.int32)
        palette = np.array([(150, 140, 120), (200, 180, 70), (30, 100, 40), (40, 80, 160)], np.uint8)
        image = (palette[sem] + rng.integers(0, 20, (SIZE, SIZE, 3))).astype(np.uint8).transpose(2, 0, 1)
        folder = run01 / "scenes" / sid
        _write(folder / "image.tif", image, transform)
        _write(folder / "semantic.tif", sem, transform, nodata=255)
        _write(folder / "instances.tif", inst, transform)
        _polygons(inst, sem, transform).to_file(folder / "labels.gpkg", layer="labels")
        _, _, base = _degrade(sem, inst, rng, 8, n_split=6, n_merge=6)
        _write(run01 / "baseline" / f"{sid}_instances.tif", base, transform)
        for r in range(0, SIZE, TILE):
            for c in range(0, SIZE, TILE):
                split = "train" if (r, c) == (0, 0) else "test"
                tiles.append(
                    {
                        "tile_id": f"{sid}_r{r // TILE}_c{c // TILE}",
                        "scene_id": sid,
                        "country": country,
                        "row_off": r,
                        "col_off": c,
                        "height": TILE,
                        "width": TILE,
                        "block_id": 0,
                        "split": split,
                    }
                )
        scenes.append(
            {
                "scene_id": sid,
                "country": country,
                "crs": "EPSG:32648",
                "res_m": RES,
                "width": SIZE,
                "height": SIZE,
                "n_fields": int(inst.max() > 0),
            }
        )
        inferred = np.zeros((SIZE, SIZE), bool)
        inferred[:, :] = True
        inferred[:TILE, :TILE] = False  # the train tile is not inferred
        for v_i, variant in enumerate(variants):
            cell = 16 if variant.startswith("text4seg") else 8
            coarse, refined, pinst = _degrade(sem, inst, rng, cell, n_split=4 - v_i, n_merge=3 - v_i)
            vdir = run05 / variant
            _write(
                vdir / "coarse" / f"{sid}.tif",
                np.where(inferred, coarse, 255).astype(np.uint8),
                transform,
                255,
            )
            _write(
                vdir / "refined" / f"{sid}.tif",
                np.where(inferred, refined, 255).astype(np.uint8),
                transform,
                255,
            )
            _write(
                vdir / "instances" / f"{sid}.tif", np.where(inferred, pinst, 0).astype(np.int32), transform
            )
            gdf = _polygons(
                np.where(inferred, pinst, 0).astype(np.int32),
                refined,
                transform,
                scene_id=sid,
                tile_id="",
                confidence=1.0,
            ).rename(columns={"field_id": "instance_id"})
            gdf["area_m2"] = gdf.geometry.area
            path = vdir / "fields.gpkg"
            if path.exists():
                old = __import__("geopandas").read_file(path, layer="fields")
                gdf = pd.concat([old, gdf], ignore_index=True)
            gdf.to_file(path, layer="fields")
    tiles = pd.DataFrame(tiles)
    tiles.to_csv(run01 / "tiles.csv", index=False)
    pd.DataFrame(scenes).to_csv(run01 / "scenes.csv", index=False)
    for variant in variants:
        tiles[tiles["split"] == "test"][["tile_id", "scene_id"]].assign(n_answers=4, n_malformed=0).to_csv(
            run05 / variant / "tiles.csv", index=False
        )
    for folder in (run01, run05):
        (folder / "state.json").write_text(
            json.dumps(
                {"stage": folder.name, "outputs": {}, "summary": {}, "fingerprint": "synthetic", "params": {}}
            )
        )
    return run_dir


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    return make_synthetic_run(tmp_path_factory.mktemp("synthetic") / "runs" / "syn")


def test_evaluate_methods_on_a_synthetic_run(synthetic_run):
    import geopandas as gpd
    import pandas as pd

    run01, run05 = synthetic_run / "01_dataset_prep", synthetic_run / "05_inference"
    methods = metrics.discover_methods(run01, run05)
    names = [m["name"] for m in methods]
    assert names == [
        "magseg-grpo coarse",
        "magseg-grpo refined",
        "magseg-sft coarse",
        "magseg-sft refined",
        "text4seg-sft coarse",
        "text4seg-sft refined",
        "all-field baseline",
        "watershed baseline",
    ]
    tiles = metrics.common_tiles(pd.read_csv(run01 / "tiles.csv"), methods)
    assert len(tiles) == 6 and "vn0_r0_c0" not in set(tiles["tile_id"])
    by_name = {m["name"]: m for m in methods}
    counts, fields = metrics.evaluate_method(
        run01, tiles, by_name["magseg-sft refined"]["semantic"], by_name["magseg-sft refined"]["instances"]
    )
    assert len(counts) == 6 and set(counts["country"]) == {"Vietnam", "Cambodia"}
    # Every GT field piece in the scored tiles appears once in the field table.
    assert len(fields) == counts["n_gt"].sum() and {"tile_id", "scene_id", "iou"} <= set(fields.columns)
    table = metrics.bootstrap_scores(counts, n_boot=100).set_index("metric")
    assert 0.5 < table.loc["iou_field", "value"] <= 1 and 0 < table.loc["inst_f1", "value"] < 1
    base_counts, _ = metrics.evaluate_method(run01, tiles, None, by_name["watershed baseline"]["instances"])
    diff = metrics.compare_methods(base_counts, counts, n_boot=100)
    assert list(diff["metric"]) == list(metrics.HEADLINE)
    text = metrics.describe_difference(diff[diff["metric"] == "inst_f1"].iloc[0], "baseline", "sft")
    assert text.startswith("inst_f1: sft")
    assert gpd.read_file(run05 / "magseg-sft" / "fields.gpkg", layer="fields").crs.to_epsg() == 32648
    # The all-field baseline labels every scored pixel "field": its field recall is 1, its accuracy
    # the share of field pixels.
    allf, _ = metrics.evaluate_method(run01, tiles, metrics.ALL_FIELD, None)
    t = metrics.bootstrap_scores(allf, n_boot=20).set_index("metric")["value"]
    cm = allf.filter(like="cm_").sum()
    assert t["recall_field"] == 1.0 and t["dice_tree"] == 0.0
    assert t["pixel_accuracy"] == pytest.approx(cm["cm_1_1"] / cm.sum())


def test_random_weight_rows_are_wiring_checks_never_results(synthetic_run):
    import pandas as pd

    run01, run05 = synthetic_run / "01_dataset_prep", synthetic_run / "05_inference"
    methods = metrics.discover_methods(run01, run05, random_weight_refinement=True)
    wiring = [m["name"] for m in methods if m["wiring"]]
    assert wiring and all(n.endswith("(wiring check, random weights)") and " refined" in n for n in wiring)
    assert metrics.main_method(methods, "refined")["name"] == "magseg-grpo coarse"
    tiles = metrics.common_tiles(pd.read_csv(run01 / "tiles.csv"), methods)
    results = {
        m["name"]: metrics.evaluate_method(run01, tiles, m["semantic"], m["instances"])[0] for m in methods
    }
    pairs = metrics.ablation_pairs(methods, "coarse")
    sam = [p for p in pairs if p[0].startswith("Refinement")]
    assert sam and all("wiring check" in q for q, _, _ in sam)
    reading = metrics.ablation_reading(metrics.ablation_table(results, pairs, n_boot=30, cluster=None))
    for line in reading:
        if line.startswith("**Refinement"):
            assert "not a result" in line and "better" not in line


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


def test_evaluate_method_rejects_a_prediction_off_the_scene_grid(synthetic_run, tmp_path):
    import pandas as pd
    from rasterio.transform import from_origin

    run01 = synthetic_run / "01_dataset_prep"
    bad = tmp_path / "vn0.tif"
    _write(bad, np.zeros((SIZE, SIZE), np.uint8), from_origin(0, 0, RES, RES))
    tiles = pd.read_csv(run01 / "tiles.csv").query("scene_id == 'vn0'")
    with pytest.raises(ValueError, match="not on the scene grid"):
        metrics.evaluate_method(run01, tiles, {"vn0": bad}, None)
    with pytest.raises(FileNotFoundError, match="missing.tif does not exist"):
        metrics.evaluate_method(run01, tiles, {"vn0": tmp_path / "missing.tif"}, None)


def test_analysis_tables_figures_and_report(synthetic_run, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from magseg_nb.viz import metrics as vizm

    run01, run05 = synthetic_run / "01_dataset_prep", synthetic_run / "05_inference"
    methods = metrics.discover_methods(run01, run05)
    tiles = metrics.common_tiles(pd.read_csv(run01 / "tiles.csv"), methods)
    evaluated = {
        m["name"]: metrics.evaluate_method(run01, tiles, m["semantic"], m["instances"]) for m in methods
    }
    results = {k: v[0] for k, v in evaluated.items()}
    overall = metrics.score_table(results, n_boot=50)
    assert set(overall["method"]) == set(results) and (overall["group"] == "all").all()
    by_country = metrics.score_table(results, n_boot=50, by="country")
    assert set(by_country["group"]) == {"Vietnam", "Cambodia"}
    wide = metrics.wide_table(overall)
    assert (
        wide.loc["watershed baseline", "miou"] == "n/a" and "[" in wide.loc["magseg-sft refined", "inst_f1"]
    )
    pairs = metrics.ablation_pairs(methods)
    assert ("GRPO after SFT", "magseg-sft refined", "magseg-grpo refined") in pairs
    assert ("MAgSeg vs Text4Seg format", "text4seg-sft refined", "magseg-sft refined") in pairs
    assert ("Refinement", "magseg-sft coarse", "magseg-sft refined") in pairs
    assert ("vs classical watershed", "watershed baseline", "magseg-grpo refined") in pairs
    ablation = metrics.ablation_table(results, pairs, n_boot=50)
    reading = metrics.ablation_reading(ablation)
    assert len(reading) == len(pairs) and all(line.startswith("**") for line in reading)
    grpo = next(line for line in reading if line.startswith("**GRPO"))
    row = ablation.query("question == 'GRPO after SFT' and metric == 'inst_f1'").iloc[0]
    if row["lo"] > 0:
        assert "inst_f1" in grpo and "(magseg-grpo refined better)" in grpo
    elif row["hi"] >= 0:
        assert "inst_f1" not in grpo
    main = metrics.main_method(methods)
    assert main["name"] == "magseg-grpo refined"
    fields = pd.concat([v[1].assign(method=k) for k, v in evaluated.items()], ignore_index=True)
    curve = metrics.recall_by_size(fields[fields["method"] == main["name"]], n_boot=50)
    assert curve["n_fields"].sum() == results[main["name"]]["n_gt"].sum()
    assert ((curve["lo"] <= curve["recall"]) & (curve["recall"] <= curve["hi"])).all()
    figs = {
        "bars": vizm.per_class_bars(overall, "iou"),
        "headline": vizm.headline_bars(overall, ["miou", "inst_f1"]),
        "gallery": vizm.error_gallery(
            run01, tiles, metrics.per_tile_scores(results[main["name"]]), main, n=2
        ),
        "size": vizm.recall_vs_size({"x": curve}),
    }
    n_methods = overall["method"].nunique()
    first = overall[overall["method"] == overall["method"].iloc[0]].set_index("metric")["value"]
    bars = figs["bars"].axes[0].patches
    assert len(bars) == n_methods * len(CLASSES)
    heights = [b.get_height() for b in bars[: len(CLASSES)]]
    assert np.allclose(heights, [first[f"iou_{c}"] for c in CLASSES], equal_nan=True)
    assert [t.get_text() for t in figs["headline"].axes[0].get_xticklabels()] == ["miou", "inst_f1"]
    assert len(figs["headline"].axes[0].patches) == n_methods * 2
    for name, fig in figs.items():
        assert vizm.save(fig, tmp_path / "figures", name).stat().st_size > 1000
    assert len(figs["gallery"].axes) == 6
    report = metrics.write_report(
        tmp_path / "report.md", "t", [("Overall", wide), ("Reading", reading), ("Empty", pd.DataFrame())]
    )
    text = report.read_text()
    assert text.startswith("# t") and "| method | miou |" in text and "(none)" in text


def test_effective_resolution_and_training_eval(tmp_path):
    import json

    (tmp_path / "02_instruction_format").mkdir()
    (tmp_path / "02_instruction_format" / "magseg_test.jsonl").write_text(
        json.dumps({"grid": 16, "patch_layout": 4}) + "\n"
    )
    (tmp_path / "02_instruction_format" / "text4seg_test.jsonl").write_text(json.dumps({"grid": 64}) + "\n")
    res = metrics.effective_resolution(tmp_path / "02_instruction_format", tile_px=256, res_m=0.5).set_index(
        "format"
    )
    assert res.loc["magseg", "cells_per_tile_side"] == 64 and res.loc["text4seg", "metres_per_cell"] == 2.0
    (tmp_path / "03_sft" / "magseg").mkdir(parents=True)
    (tmp_path / "03_sft" / "magseg" / "eval.json").write_text(json.dumps({"val": {"dice": 0.7}, "n": 3}))
    ev = metrics.read_eval_jsons(tmp_path)
    assert ev.loc[0, "stage"] == "03_sft" and ev.loc[0, "val.dice"] == 0.7


@pytest.mark.slow
def test_notebook_06_runs_on_a_synthetic_chain(tmp_path):
    """The notebook itself (papermill) on the synthetic 01/05 folders: every output file is written."""
    import json

    import papermill

    root = Path(__file__).resolve().parents[1]
    run = make_synthetic_run(tmp_path / "runs" / "syn")
    papermill.execute_notebook(
        str(root / "notebooks" / "06_metrics.ipynb"),
        str(tmp_path / "out.ipynb"),
        parameters={"run_dir": str(run), "profile": "smoke", "n_boot": 100, "browser_screenshot": False},
        cwd=str(root / "notebooks"),
        kernel_name="python3",
        progress_bar=False,
    )
    out = run / "06_metrics"
    for name in (
        "metrics.csv",
        "metrics.json",
        "fields.csv",
        "ablation.csv",
        "map.html",
        "report.md",
        "figures/per_class_iou.png",
        "figures/worst_tiles.png",
        "figures/recall_vs_field_size.png",
    ):
        assert (out / name).stat().st_size > 0, name
    state = json.loads((out / "state.json").read_text())
    assert state["summary"]["n_tiles"] == 6 and state["summary"]["best_inst_f1_method"]
    assert "## Reading" in (out / "report.md").read_text()


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


def test_models_are_compared_on_coarse_masks_unless_a_real_sam_refined_them():
    assert metrics.comparison_masks("auto", "tiny") == "coarse"
    assert metrics.comparison_masks("auto", "none") == "coarse"
    assert metrics.comparison_masks("auto", "vit_h") == "refined"
    assert metrics.comparison_masks("refined", "tiny") == "refined"
    with pytest.raises(ValueError, match="compare_masks must be"):
        metrics.comparison_masks("best", "tiny")
    methods = [
        {"name": f"{v} {r}", "variant": v, "refinement": r}
        for v in ("magseg-sft", "magseg-grpo", "text4seg-sft")
        for r in ("coarse", "refined")
    ] + [{"name": "watershed baseline", "variant": "baseline", "refinement": "baseline"}]
    pairs = metrics.ablation_pairs(methods, "coarse")
    assert ("GRPO after SFT", "magseg-sft coarse", "magseg-grpo coarse") in pairs
    assert ("MAgSeg vs Text4Seg format", "text4seg-sft coarse", "magseg-sft coarse") in pairs
    assert ("vs classical watershed", "watershed baseline", "text4seg-sft coarse") in pairs
    assert ("Refinement", "magseg-grpo coarse", "magseg-grpo refined") in pairs
    assert not any("refined" in b for q, _, b in pairs if q != "Refinement")
    assert metrics.main_method(methods, "coarse")["name"] == "magseg-grpo coarse"
