"""The classical watershed baseline: it works on easy images, and its notebook outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import rasterio

from magseg_nb import baseline, geo, landscape
from magseg_nb.metrics import instance_counts, match_instances


def quadrants(noise=0.0, seed=0):
    """A 96x96 image of 4 flat coloured fields meeting at T-junctions, and its true instances."""
    truth = np.zeros((96, 96), np.int32)
    truth[:48, :40], truth[:48, 40:], truth[48:, :60], truth[48:, 60:] = 1, 2, 3, 4
    colours = np.array([[0, 0, 0], [200, 60, 60], [60, 200, 60], [60, 60, 200], [200, 200, 60]], np.float32)
    image = colours[truth] + np.random.default_rng(seed).normal(0, noise, (96, 96, 3))
    return np.clip(image, 1, 255).astype(np.uint8), truth


def test_flat_noisy_fields_are_found():
    """Distinct flat fields are what a watershed handles: (nearly) every field found at any noise level."""
    f1 = []
    for noise in range(0, 13, 2):
        image, truth = quadrants(noise=noise, seed=noise)
        pred = baseline.watershed_baseline(image)
        assert pred.shape == (96, 96) and pred.dtype == np.int32
        scores = match_instances(truth, pred)
        assert scores["tp"] == 4 and scores["mean_matched_iou"] > 0.9
        f1.append(scores["f1"])
    assert np.mean(f1) > 0.95


def test_nodata_pixels_get_no_instance_and_small_segments_are_dropped():
    image, _ = quadrants()
    image[:, :10] = 0
    pred = baseline.watershed_baseline(image, min_area_px=3000)
    assert (pred[:, :10] == 0).all()
    assert (pred == 0).mean() > 0.5, "quadrants of ~2000 px are below min_area_px"


def test_bad_image_shape():
    with pytest.raises(ValueError, match=r"RGB image \(H, W, 3\)"):
        baseline.watershed_baseline(np.zeros((10, 10), np.uint8))


def test_score_scenes():
    imgs, truths = zip(*(quadrants(noise=n, seed=n) for n in (2, 4)), strict=True)
    assert baseline.watershed_baseline(np.zeros((8, 8, 3), np.uint8)).max() == 0
    table = baseline.score_scenes(list(imgs), list(truths), scene_ids=["a", "b"])
    assert list(table.scene_id) == ["a", "b"] and (table.f1 > 0.85).all() and (table.tp == 4).all()


def quadrant_run(tmp_path, n_scenes=2):
    """A notebook-01 run folder of quadrant scenes (image, semantic all field, instances) and a tiles
    table: two 48x96 tiles per scene, each its own block; the top tile is val, the bottom one test."""
    run01, rows = tmp_path / "01", []
    transform = rasterio.transform.from_origin(500000, 1000000, 0.8, 0.8)
    for k in range(n_scenes):
        image, truth = quadrants(noise=2 + 2 * k, seed=k)
        paths = geo.scene_paths(run01, f"s{k}")
        geo.write_geotiff(paths["image"], image.transpose(2, 0, 1), "EPSG:32648", transform, nodata=0)
        geo.write_geotiff(paths["semantic"], np.ones((96, 96), np.uint8), "EPSG:32648", transform, nodata=255)
        geo.write_geotiff(paths["instances"], truth, "EPSG:32648", transform, dtype="int32")
        for r, split in ((0, "val"), (48, "test")):
            rows.append({"tile_id": f"s{k}_{r}", "scene_id": f"s{k}", "row_off": r, "col_off": 0, "height": 48,
                         "width": 96, "block_id": f"s{k}_b{r}", "split": split})  # fmt: skip
    return run01, pd.DataFrame(rows)


def test_tune_on_tiles_scores_the_given_tiles_as_notebook_06_does(tmp_path):
    run01, tiles = quadrant_run(tmp_path)
    val = tiles[tiles.split == "val"]
    grid = {"sigma": [1.0, 2.0], "min_area_px": [100, 5000]}
    best, table = baseline.tune_on_tiles(run01, val, grid, margin_px=96)
    assert best.min_area_px == 100 and best.sigma == 1.0, "the first of the tied best settings"
    assert len(table) == 4 and table.f1.is_monotonic_decreasing
    assert (table[table.min_area_px == 5000].f1 == 0).all() and (
        table[table.min_area_px == 5000].n_pred == 0
    ).all()
    # Each val tile (rows 0-47) holds two true fields; with the margin the crop is the whole scene, so the
    # counts are those of the whole-scene baseline clipped to the tile, as notebook 06 scores test.
    top = table[(table.sigma == 1.0) & (table.min_area_px == 100)].iloc[0]
    expected = {"tp": 0, "n_gt": 0, "n_pred": 0}
    for t in val.itertuples():
        image, truth = quadrants(noise=2 + 2 * int(t.scene_id[1:]), seed=int(t.scene_id[1:]))
        pred = baseline.watershed_baseline(image, sigma=1.0, min_area_px=100)
        got = instance_counts(truth[:48], pred[:48], 0.5)
        expected = {key: expected[key] + got[key] for key in expected}
    assert expected["n_gt"] == 4 and expected["tp"] == 4
    assert (top.tp, top.n_gt, top.n_pred) == (expected["tp"], expected["n_gt"], expected["n_pred"])
    assert top.f1 == pytest.approx(2 * expected["tp"] / (expected["n_gt"] + expected["n_pred"]))
    with pytest.raises(ValueError, match="no tiles: pass the validation-split rows"):
        baseline.tune_on_tiles(run01, tiles.iloc[:0])


def test_run_baseline_writes_instance_rasters(tmp_path):
    sources = landscape.generate_sources(tmp_path / "scenes", ["cambodia"], 1, 192, 0.8, log=lambda *_: None)
    geo.prepare_scenes(sources, tmp_path / "scenes", log=lambda *_: None)
    scores = baseline.run_baseline(tmp_path, ["kh0"])
    assert list(scores.scene_id) == ["kh0"]
    assert {"tp", "fp", "fn", "precision", "recall", "f1"} <= set(scores.columns)
    assert 0 <= scores.f1.iloc[0] <= 1
    with (
        rasterio.open(tmp_path / "baseline" / "kh0_instances.tif") as src,
        rasterio.open(sources[0].image_path) as img,
    ):
        assert src.dtypes[0] == "int32" and src.crs == img.crs and src.transform == img.transform
        assert src.read(1).max() > 0
    images, truths = baseline.load_scenes(tmp_path, ["kh0"])
    assert images[0].shape == (192, 192, 3) and truths[0].dtype == np.int32


def test_compare_difficulty_easy_beats_default():
    import matplotlib.pyplot as plt

    from magseg_nb.viz import dataset as viz

    scores, examples = baseline.compare_difficulty("cambodia", landscape.Difficulty(), size=256, seed=1)
    assert list(scores.landscape) == ["easy", "this run"]
    assert scores.f1.iloc[0] > scores.f1.iloc[1] + 0.1
    image, truth, pred = examples["easy"]
    assert image.shape == (256, 256, 3) and truth.shape == pred.shape == (256, 256)
    assert len(viz.plot_difficulty(examples, scores).axes) == 6
    plt.close("all")


def test_shared_gradient_watershed_gives_the_baseline_its_former_output(small_scene):
    """The baseline uses instances' gradient-watershed pieces; this is the recipe it had inline before
    (ndimage labels, 4-connected markers), which must give the very same instances."""
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, sobel
    from skimage.morphology import h_minima
    from skimage.segmentation import watershed

    image, s = small_scene.image, baseline.WatershedSettings(sigma=1.0, h_rel=0.02)
    valid = image.any(axis=2)
    smooth = gaussian(image.astype(np.float32) / 255.0, sigma=s.sigma, channel_axis=-1)
    grad = np.max([sobel(smooth[..., c]) for c in range(3)], axis=0)
    levels = np.clip(grad / max(float(np.quantile(grad[valid], 0.99)), 1e-9) * 4000, 0, 65535).astype(
        np.uint16
    )
    levels[~valid] = 65535
    markers, _ = ndi.label(h_minima(levels, max(1, int(s.h_rel * 4000))) & valid)
    seg = watershed(levels, markers, mask=valid)
    seg[np.bincount(seg.ravel())[seg] < s.min_area_px] = 0
    got = baseline.watershed_baseline(image, s)
    assert got.max() > 100 and np.array_equal(got, seg.astype(np.int32))
