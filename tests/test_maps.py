"""The offline leafmap map: layers, true placement, no network loads, and a real headless browser."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest

from magseg_nb import metrics
from magseg_nb.viz import maps

from .test_metrics import make_synthetic_run


@pytest.fixture(scope="module")
def saved_map(tmp_path_factory):
    """A synthetic run and its scene map saved as one HTML file."""
    run = make_synthetic_run(tmp_path_factory.mktemp("maps") / "runs" / "syn", variants=("magseg-sft",))
    scene, variant = run / "01_dataset_prep" / "scenes" / "vn0", run / "05_inference" / "magseg-sft"
    gt_inst, prof = metrics.read_raster(scene / "instances.tif")
    pred_inst, _ = metrics.read_raster(variant / "instances" / "vn0.tif")
    pred_sem, _ = metrics.read_raster(variant / "refined" / "vn0.tif")
    tabs = metrics.scene_tables(gt_inst, pred_inst, pred_sem, pixel_area_m2=prof["transform"].a ** 2)
    pred = gpd.read_file(variant / "fields.gpkg", layer="fields").query("scene_id == 'vn0'")
    gt, pred = maps.attach_matches(gpd.read_file(scene / "labels.gpkg", layer="labels"), pred, *tabs)
    m = maps.scene_map(
        scene / "image.tif",
        gt,
        pred,
        {"coarse": variant / "coarse" / "vn0.tif", "refined": variant / "refined" / "vn0.tif"},
    )
    path = maps.save_offline_html(m, run / "map.html")
    return {"run": run, "path": path, "gt": gt, "pred": pred, "scene": scene}


def test_map_is_one_offline_file_with_every_layer(saved_map):
    html = saved_map["path"].read_text()
    assert maps.network_loads(html) == []
    assert "unpkg.com" not in html and "<script src" not in html and "<link rel" not in html
    for layer in ("imagery", "coarse", "refined", "ground truth", "predicted"):
        assert f'"id": "{layer}"' in html, layer
    assert html.count('"type": "image", "url": "data:image/png;base64,') == 2  # class masks: lossless
    assert html.count('"type": "image", "url": "data:image/webp;base64,') == 1  # imagery: WebP
    assert '"iou"' in html and '"match_id"' in html and '"area_m2"' in html


def test_popup_columns_hold_the_match(saved_map):
    gt, pred = saved_map["gt"], saved_map["pred"]
    assert (gt["field_id"] > 0).all() and gt["iou"].between(0, 1).all()
    matched = pred[pred["match_id"] > 0]
    assert len(matched) and (matched["iou"] >= 0.5).all()
    # A predicted polygon and its matched field point at each other.
    row = matched.iloc[0]
    assert gt.set_index("field_id").loc[row["match_id"], "match_id"] == row["instance_id"]


def test_rasters_are_placed_at_their_true_corners(saved_map):
    import rasterio
    from rasterio.warp import transform_bounds

    path = saved_map["scene"] / "image.tif"
    arr, bounds, _ = maps.to_wgs84(path)
    with rasterio.open(path) as src:
        expected = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    np.testing.assert_allclose(bounds, expected, atol=1e-6)
    assert 104.9 < bounds[0] < 105.1 and 10.8 < bounds[1] < 10.9  # UTM 48N origin of scene vn0
    assert arr.shape[0] == 3


def test_network_loads_are_detected():
    assert maps.network_loads('<script src="https://unpkg.com/x.js"></script>')
    assert maps.network_loads('{"sources": {"osm": {"tiles": ["https://tile.osm.org/{z}/{x}/{y}.png"]}}}')
    assert maps.network_loads('<style>a{background:url("http://x/y.png")}</style>')
    assert maps.network_loads('{"glyphs": "https://fonts/{fontstack}/{range}.pbf"}')
    assert not maps.network_loads('<!-- <script src="https://unpkg.com/x.js"></script> -->')
    assert not maps.network_loads('<a href="https://maplibre.org/">MapLibre</a>')


def test_class_colours_and_nodata_transparency():
    rgba = maps.class_rgba(np.array([[0, 1, 2, 3, 255]]))
    assert rgba.shape == (1, 5, 4)
    assert tuple(rgba[0, 1, :3]) == (230, 200, 60) and rgba[0, 4, 3] == 0 and rgba[0, 0, 3] > 0


def test_a_raster_without_crs_is_refused(tmp_path):
    import rasterio

    path = tmp_path / "nocrs.tif"
    with rasterio.open(path, "w", driver="GTiff", height=4, width=4, count=1, dtype="uint8") as dst:
        dst.write(np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="has no CRS"):
        maps.to_wgs84(path)


@pytest.mark.browser
@pytest.mark.skipif(
    not Path(maps.CHROMIUM).exists(), reason=f"{maps.CHROMIUM} missing: bash scripts/setup.sh --browser"
)
def test_headless_chromium_shows_the_layers_and_saves_a_screenshot(saved_map):
    from PIL import Image

    shot = saved_map["run"] / "map.png"
    res = maps.browser_check(saved_map["path"], shot, wait_s=6.0, click=(0.55, 0.45))
    assert res["canvas"] and res["errors"] == []
    # The layer switcher asks the map itself: every layer exists, coarse starts hidden.
    assert res["layers"] == {
        "imagery": True,
        "coarse": False,
        "refined": True,
        "ground truth": True,
        "predicted": True,
    }
    assert res["popup"] and "class" in res["popup"]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    magenta = (np.abs(img - [255, 61, 245]).sum(-1) < 60).sum()  # predicted outlines were drawn
    assert img.shape[:2] == (800, 1200) and magenta > 200
    print(f"screenshot: {shot}")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(
    not Path(maps.CHROMIUM).exists(), reason=f"{maps.CHROMIUM} missing: bash scripts/setup.sh --browser"
)
def test_the_smoke_chains_map_opens_offline_with_its_layers(smoke_run):
    """The map notebook 06 wrote in the smoke chain, opened in Chromium; screenshot kept in the run folder."""
    from .conftest import stage_dir

    page = stage_dir(smoke_run, "06_metrics") / "map.html"
    assert maps.network_loads(page.read_text()) == []
    shot = smoke_run / "map_screenshot.png"
    res = maps.browser_check(page, shot, wait_s=8.0)
    assert res["canvas"] and res["errors"] == []
    assert {"imagery", "coarse", "refined", "ground truth"} <= set(res["layers"])
    assert shot.stat().st_size > 10_000


# --- the whole map scene: predicted for the map, never scored -------------------------------------------


def _all_water(model, processor, examples, max_new_tokens, batch_size=8):
    """A fake generate that answers 'water' everywhere (so map-only pixels are recognisable)."""
    from magseg_nb import textgrid

    from .test_inference import SPEC

    return [textgrid.encode(np.full((SPEC.grid, SPEC.grid), 3, np.uint8), SPEC.encoding) for _ in examples]


@pytest.fixture()
def whole_scene_run(tmp_path):
    import hashlib

    from magseg_nb import inference

    from .test_inference import SPEC, blocky_semantic, make_run01, oracle

    sem = blocky_semantic(64, 96)
    windows = [
        (r, c, "test" if (r, c) in {(0, 0), (32, 64)} else "train") for r in (0, 32) for c in (0, 32, 64)
    ]
    run01, tiles = make_run01(tmp_path / "runs" / "r", {"s0": (sem, windows)})
    run05 = run01.parent / "05_inference"
    vdir = run05 / "magseg-sft"
    test = inference.select_test_tiles(tiles)
    kw = {"field_kw": {"min_area_px": 8, "h_px": 1.0}, "log": None}
    inference.run_variant(None, None, run01, tiles, SPEC, vdir, generate=oracle(), **kw)
    digest = {
        p.relative_to(vdir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in vdir.rglob("*")
        if p.is_file()
    }
    ids = inference.map_scene_ids(tiles, test, "first")
    summary = inference.run_map_scenes(
        None, None, run01, tiles, test, ids, SPEC, vdir, generate=_all_water, **kw
    )
    return {
        "run01": run01,
        "run05": run05,
        "vdir": vdir,
        "tiles": tiles,
        "sem": sem,
        "digest": digest,
        "summary": summary,
    }


def test_whole_scene_prediction_covers_the_scene_and_keeps_the_scored_pixels(whole_scene_run):
    from magseg_nb import refine

    r = whole_scene_run
    assert r["summary"]["map_scenes"] == ["s0"] and r["summary"]["map_tiles"] == 4
    whole = refine.read_mask(r["vdir"] / "whole_scene" / "coarse" / "s0.tif")[0]
    scored = refine.read_mask(r["vdir"] / "coarse" / "s0.tif")[0]
    assert (whole != 255).all()  # every pixel of the scene has a prediction
    tested = scored != 255
    assert tested.sum() == 2 * 32 * 32
    assert np.array_equal(whole[tested], scored[tested]) and np.array_equal(scored[tested], r["sem"][tested])
    assert (whole[~tested] == 3).all()  # the map-only answers (all water)
    assert (r["vdir"] / "whole_scene" / "fields.gpkg").exists()


def test_map_only_predictions_never_enter_the_metrics(whole_scene_run):
    """06 scores metrics.common_tiles over the test tiles with the variant's coarse/ refined/ rasters:
    the whole-scene run changes none of those files, adds no method and no tile."""
    import hashlib

    r = whole_scene_run
    vdir = r["vdir"]
    after = {
        p.relative_to(vdir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in vdir.rglob("*")
        if p.is_file()
    }
    assert {k: v for k, v in after.items() if not k.startswith("whole_scene/")} == r["digest"]
    methods = metrics.discover_methods(r["run01"], r["run05"])
    model_rows = [m for m in methods if not m["baseline"]]
    assert [m["name"] for m in model_rows] == ["magseg-sft coarse", "magseg-sft refined"]
    for m in model_rows:
        assert all("whole_scene" not in str(p) for p in m["semantic"].values())
        assert m["tile_ids"] == {"s0_0_0", "s0_32_64"}
    scored = metrics.common_tiles(r["tiles"].assign(tile_id=r["tiles"]["tile_id"].astype(str)), methods)
    assert sorted(scored["tile_id"]) == ["s0_0_0", "s0_32_64"] and set(scored["split"]) == {"test"}
    counts, _ = metrics.evaluate_method(r["run01"], scored, model_rows[0]["semantic"], None)
    # The scored coarse mask is the oracle's (exact): no 'water everywhere' map-only pixel got in.
    assert metrics.per_tile_scores(counts)["error_share"].max() == 0.0


def test_map_scene_ids_and_variant_choice():
    import pandas as pd

    from magseg_nb import inference

    tiles = pd.DataFrame(
        {"tile_id": ["a_1", "b_1", "c_1"], "scene_id": ["a", "b", "c"], "split": ["train", "test", "test"]}
    )
    test = tiles[tiles.split == "test"]
    assert inference.map_scene_ids(tiles, test, "first") == ["b"]
    assert inference.map_scene_ids(tiles, test, "all") == ["b", "c"]
    assert inference.map_scene_ids(tiles, test, "none") == [] == inference.map_scene_ids(tiles, test, "")
    assert inference.map_scene_ids(tiles, test, ["a"]) == ["a"]
    with pytest.raises(ValueError, match="unknown scenes"):
        inference.map_scene_ids(tiles, test, ["zz"])
    assert inference.map_variant([]) is None


def test_whole_scene_map_outlines_test_tiles_and_pops_up_truth_and_prediction(whole_scene_run, tmp_path):
    r = whole_scene_run
    src = maps.prediction_folder(r["vdir"], "s0")
    assert src.name == "whole_scene" and maps.default_scene(r["vdir"], r["tiles"]) == "s0"
    scene = r["run01"] / "scenes" / "s0"
    gt_inst, prof = metrics.read_raster(scene / "instances.tif")
    pred_sem, _ = metrics.read_raster(src / "refined" / "s0.tif")
    labels = gpd.GeoDataFrame(
        {"class": ["field", "field"], "field_id": [1, 2]},
        geometry=[
            maps.tile_outlines(r["tiles"].iloc[[0]], prof["transform"], prof["crs"]).geometry[0].buffer(-2),
            maps.tile_outlines(r["tiles"].iloc[[1]], prof["transform"], prof["crs"]).geometry[0].buffer(-2),
        ],
        crs=prof["crs"],
    )
    gt = maps.add_predicted_class(labels, pred_sem, prof["transform"])
    assert list(gt["truth_class"]) == ["field", "field"]
    assert gt["predicted_class"].iloc[1] == "water"  # tile s0_0_32 is map-only: the all-water answers
    test = r["tiles"][r["tiles"].split == "test"]
    outlines = maps.tile_outlines(test, prof["transform"], prof["crs"])
    assert list(outlines["tile_id"]) == ["s0_0_0", "s0_32_64"]
    np.testing.assert_allclose(outlines.geometry[0].area, (32 * 0.5) ** 2)
    m = maps.scene_map(
        scene / "image.tif", gt, None, {"refined": src / "refined" / "s0.tif"}, test_tiles=outlines
    )
    html = maps.save_offline_html(m, tmp_path / "map.html").read_text()
    assert f'"id": "{maps.TEST_TILES}"' in html and "test tile: scored in 06" in html
    assert '"predicted_class"' in html and '"truth_class"' in html
    assert "data:image/webp;base64," in html and maps.network_loads(html) == []
