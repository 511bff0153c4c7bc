"""The offline leafmap map: layers, true placement, no network loads, and a real headless browser."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest

from magseg_nb import evaluation, metrics
from magseg_nb.viz import browser, maps

needs_chromium = pytest.mark.skipif(
    not Path(browser.CHROMIUM).exists(), reason=f"{browser.CHROMIUM} missing: bash scripts/setup.sh --browser"
)


def open_in_browser(page: Path, shot: Path, click=None, wait_s: float = 8.0):
    """Open a saved map in headless Chromium: (browser_check's result, the screenshot as an int RGB
    array); the page must draw its canvas without a page error."""
    from PIL import Image

    res = browser.browser_check(page, shot, wait_s=wait_s, click=click)
    assert res["canvas"] and res["errors"] == []
    return res, np.asarray(Image.open(shot).convert("RGB")).astype(int)


def colour_pixels(img, rgb) -> int:
    return int((np.abs(img - list(rgb)).sum(-1) < 60).sum())


@pytest.fixture(scope="module")
def saved_map(synthetic_run, tmp_path_factory):
    """The shared synthetic run's scene map saved as one HTML file."""
    run = synthetic_run
    scene, variant = run / "01_dataset_prep" / "scenes" / "vn0", run / "05_inference" / "magseg-sft"
    gt_inst, prof = evaluation.read_raster(scene / "instances.tif")
    pred_inst, _ = evaluation.read_raster(variant / "instances" / "vn0.tif")
    pred_sem, _ = evaluation.read_raster(variant / "refined" / "vn0.tif")
    tabs = metrics.scene_tables(gt_inst, pred_inst, pred_sem, pixel_area_m2=prof["transform"].a ** 2)
    pred = gpd.read_file(variant / "fields.gpkg", layer="fields").query("scene_id == 'vn0'")
    gt, pred = maps.attach_matches(gpd.read_file(scene / "labels.gpkg", layer="labels"), pred, *tabs)
    m = maps.scene_map(
        scene / "image.tif",
        gt,
        pred,
        {"coarse": variant / "coarse" / "vn0.tif", "refined": variant / "refined" / "vn0.tif"},
    )
    out = tmp_path_factory.mktemp("maps")  # the shared run folder stays as built
    path = maps.save_offline_html(m, out / "map.html")
    return {"run": run, "out": out, "path": path, "gt": gt, "pred": pred, "scene": scene}


def test_map_is_one_offline_file_with_every_layer(saved_map):
    html = saved_map["path"].read_text()
    assert maps.network_loads(html) == []
    assert "unpkg.com" not in html and "<script src" not in html and "<link rel" not in html
    assert html.count(maps.PAGE_STYLE) == 1  # no page margin: the 100vh map does not scroll
    for layer in ("imagery", "coarse", "refined", "ground truth", "predicted"):
        assert f'"id": "{layer}"' in html, layer
    assert html.count('"type": "image", "url": "data:image/png;base64,') == 2  # class masks: lossless
    assert html.count('"type": "image", "url": "data:image/webp;base64,') == 1  # imagery: WebP
    # Each field set is one GeoJSON source shared by its outline and click layers, with only the
    # popup's properties.
    assert html.count('"type": "geojson"') == 2
    assert html.count('"type": "Feature"') == len(saved_map["gt"]) + len(saved_map["pred"])
    assert '"iou"' in html and '"truth_class"' in html and '"predicted_class"' in html
    assert '"match_id"' not in html and '"area_m2"' not in html and '"instance_id"' not in html


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
@needs_chromium
def test_headless_chromium_shows_the_layers_and_saves_a_screenshot(saved_map):
    shot = saved_map["out"] / "map.png"
    # the middle of the field just up and right of the scene centre (fields are ~45 px, gaps 5 px)
    res, img = open_in_browser(saved_map["path"], shot, click=(0.5175, 0.4656), wait_s=6.0)
    # The layer switcher asks the map itself: every layer exists, coarse starts hidden.
    assert res["layers"] == {
        "imagery": True,
        "coarse": False,
        "refined": True,
        "ground truth": True,
        "predicted": True,
    }
    assert res["popup"] and "truth class: field" in res["popup"] and "IoU: " in res["popup"]
    magenta = colour_pixels(img, (255, 61, 245))  # predicted outlines were drawn
    assert img.shape[:2] == (800, 1200) and magenta > 200
    print(f"screenshot: {shot}")


@pytest.mark.slow
@pytest.mark.browser
@needs_chromium
def test_the_smoke_chains_map_opens_offline_with_its_layers(smoke_run):
    """The map notebook 06 wrote in the smoke chain, opened in Chromium; screenshot kept in the run folder."""
    from .conftest import stage_dir

    page = stage_dir(smoke_run, "06_metrics") / "map.html"
    assert maps.network_loads(page.read_text()) == []
    shot = smoke_run / "map_screenshot.png"
    res = browser.browser_check(page, shot, wait_s=8.0)
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
    from magseg_nb import instances

    r = whole_scene_run
    assert r["summary"]["map_scenes"] == ["s0"] and r["summary"]["map_tiles"] == 4
    whole = instances.read_mask(r["vdir"] / "whole_scene" / "coarse" / "s0.tif")[0]
    scored = instances.read_mask(r["vdir"] / "coarse" / "s0.tif")[0]
    assert (whole != 255).all()  # every pixel of the scene has a prediction
    tested = scored != 255
    assert tested.sum() == 2 * 32 * 32
    assert np.array_equal(whole[tested], scored[tested]) and np.array_equal(scored[tested], r["sem"][tested])
    assert (whole[~tested] == 3).all()  # the map-only answers (all water)
    assert (r["vdir"] / "whole_scene" / "fields.gpkg").exists()


def test_map_only_predictions_never_enter_the_metrics(whole_scene_run):
    """06 scores evaluation.common_tiles over the test tiles with the variant's coarse/ refined/ rasters:
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
    methods = evaluation.discover_methods(r["run01"], r["run05"])
    model_rows = [m for m in methods if not m["baseline"]]
    assert [m["name"] for m in model_rows] == ["magseg-sft coarse", "magseg-sft refined"]
    for m in model_rows:
        assert all("whole_scene" not in str(p) for p in m["semantic"].values())
        assert m["tile_ids"] == {"s0_0_0", "s0_32_64"}
    scored = evaluation.common_tiles(r["tiles"].assign(tile_id=r["tiles"]["tile_id"].astype(str)), methods)
    assert sorted(scored["tile_id"]) == ["s0_0_0", "s0_32_64"] and set(scored["split"]) == {"test"}
    counts, _ = evaluation.evaluate_method(r["run01"], scored, model_rows[0]["semantic"], None)
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
    gt_inst, prof = evaluation.read_raster(scene / "instances.tif")
    pred_sem, _ = evaluation.read_raster(src / "refined" / "s0.tif")
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


def test_popup_fields_carry_truth_prediction_and_iou_only():
    from shapely.geometry import box

    gt = gpd.GeoDataFrame(
        {"class": ["field", "field"], "field_id": [1, 2], "truth_class": ["field", "field"]},
        geometry=[box(0, 0, 1, 1), box(2, 0, 3, 1)],
        crs="EPSG:32648",
    )
    gt["predicted_class"], gt["iou"], gt["area_m2"] = ["field", "water"], [0.8123, 0.0], [1.0, 1.0]
    pred = gpd.GeoDataFrame(
        {"class": ["field", "tree"], "instance_id": [7, 8], "match_id": [1, 0], "iou": [0.8123, 0.0]},
        geometry=[box(0, 0, 1, 1), box(4, 0, 5, 1)],
        crs="EPSG:32648",
    )
    g, p = maps.popup_fields(gt, pred)
    assert list(g.columns) == list(p.columns) == ["truth_class", "predicted_class", "iou", "geometry"]
    assert list(p["truth_class"]) == ["field", "no match"] and list(p["predicted_class"]) == ["field", "tree"]
    assert list(g["predicted_class"]) == ["field", "water"]
    assert list(maps._popup_gdf(p, maps.POPUP)["iou"]) == [0.81, 0.0]
    assert maps.popup_fields(None, pred[:0]) == (None, None)
    # Without the class columns, each side takes the class of its match.
    bare_gt = gt.drop(columns=["predicted_class", "truth_class"]).assign(match_id=[7, 0])
    g, p = maps.popup_fields(bare_gt, pred.drop(columns="class"))
    assert list(g["truth_class"]) == ["field", "field"] and list(g["predicted_class"]) == ["?", "?"]
    g, p = maps.popup_fields(bare_gt, pred)
    assert list(g["predicted_class"]) == ["field", "no match"] and list(p["truth_class"]) == [
        "field",
        "no match",
    ]


# --- a demo-size scene: a 1024 px generated scene with hundreds of fields, under 3 MB -------------------

MAP_LIMIT_BYTES = 3_000_000  # issue 18: at most 3 MB for a demo scene


@pytest.fixture(scope="module")
def demo_size_map(tmp_path_factory):
    """The map 06 writes for a demo scene, built from a generated 1024 px scene (0.8 m, as the demo
    profile): its label fields as truth, the same fields shifted by 2 px as the prediction (every
    field matched, IoU < 1), the shifted classes as coarse and refined masks, two scored test tiles."""
    import pandas as pd

    from magseg_nb import geo, instances, landscape

    tmp = tmp_path_factory.mktemp("demo_map")
    s = landscape.generate_scene("vn0", "vietnam", 1024, 0.8, seed=0)
    image = landscape.write_scene(s, tmp / "scene")["image"]
    sem = np.where(s.kind < 4, s.kind, 0).astype(np.uint8)  # roads and buildings are 'others'
    pred_sem, pred_inst = np.roll(sem, 2, axis=1), np.roll(s.fields, 2, axis=1)
    masks = {k: geo.write_geotiff(tmp / k / "vn0.tif", pred_sem[None], s.crs, s.transform, nodata=255)
             for k in ("coarse", "refined")}  # fmt: skip
    pred = instances.polygonize(pred_inst, pred_sem, s.transform, s.crs, attrs={"scene_id": "vn0"})
    tabs = metrics.scene_tables(s.fields, pred_inst, pred_sem, pixel_area_m2=0.8**2)
    gt, pred = maps.attach_matches(s.labels, pred, *tabs)
    gt = maps.add_predicted_class(gt, pred_sem, s.transform)
    tiles = pd.DataFrame(
        {
            "tile_id": ["vn0_0_0", "vn0_512_512"],
            "row_off": [0, 512],
            "col_off": [0, 512],
            "height": 256,
            "width": 256,
        }
    )
    test = maps.tile_outlines(tiles, s.transform, s.crs)
    m = maps.scene_map(image, gt, pred, masks, title="vn0 · magseg-sft", test_tiles=test)
    path = maps.save_offline_html(m, tmp / "map.html", title="MAgSeg · vn0 · magseg-sft")
    return {"path": path, "gt": gt, "pred": pred, "tmp": tmp}


def test_a_demo_size_map_is_under_3_mb(demo_size_map):
    import re

    html = demo_size_map["path"].read_text()
    gt, pred = demo_size_map["gt"], demo_size_map["pred"]
    assert len(gt) > 300 and len(pred) > 300  # hundreds of fields, as on a demo scene
    assert (pred["iou"] > 0.5).mean() > 0.9 and (gt["truth_class"] == gt["predicted_class"]).mean() > 0.9
    size = demo_size_map["path"].stat().st_size
    print(f"demo-size map: {size / 1e6:.2f} MB, {len(gt)} truth and {len(pred)} predicted fields")
    assert size < MAP_LIMIT_BYTES
    # Every field once (one shared source per set), only the popup's properties.
    assert html.count('"type": "Feature"') == len(gt) + len(pred) + 2
    assert html.count('"type": "geojson"') == 3
    assert '"match_id"' not in html and '"area_m2"' not in html and '"field_id"' not in html
    images = sum(len(x) for x in re.findall(r"data:image/\w+;base64,[A-Za-z0-9+/=]+", html))
    assert images < 600_000  # imagery (WebP) and two class masks (PNG)
    assert maps.network_loads(html) == []


@pytest.mark.browser
@needs_chromium
def test_a_demo_size_map_opens_with_popups_and_dashed_test_tiles(demo_size_map):
    # a field inside the scored test tile below right of the centre
    res, img = open_in_browser(demo_size_map["path"], demo_size_map["tmp"] / "map.png", click=(0.56, 0.55))
    assert res["layers"] == {
        "imagery": True,
        "coarse": False,
        "refined": True,
        "ground truth": True,
        "predicted": True,
        maps.TEST_TILES: True,
    }
    popup = res["popup"] or ""
    assert "truth class: " in popup and "predicted class: " in popup and "IoU: " in popup
    cyan = colour_pixels(img, (0, 229, 255))  # the scored test tiles' dashed outline
    magenta = colour_pixels(img, (255, 61, 245))
    assert cyan > 500 and magenta > 5000
