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
    assert html.count('"type": "image", "url": "data:image/png;base64,') == 3
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
