"""Field instances (boundary-aware watershed) and polygons: hand-made masks with known answers."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
from rasterio.crs import CRS
from rasterio.transform import from_origin

from magseg_nb import geo, instances
from magseg_nb.labels import CLASS_IDS, NODATA

from .fixtures import CRS_UTM, TRANSFORM, two_fields


def test_watershed_splits_fields_joined_by_a_neck():
    field = two_fields() == CLASS_IDS["field"]
    inst = instances.field_instances(field, min_area_px=16, h_px=2)
    assert inst.dtype == np.int32
    assert inst.max() == 2 and set(np.unique(inst)) == {0, 1, 2}
    assert inst[10, 10] != inst[10, 40] and inst[10, 10] > 0 and inst[10, 40] > 0
    assert (inst[~field] == 0).all()


def test_boundary_prob_separates_touching_fields():
    field = np.zeros((30, 60), bool)
    field[5:25, 5:55] = True  # one block: two fields with no gap between them
    boundary = np.zeros(field.shape, np.float32)
    boundary[:, 29:31] = 1.0
    assert instances.field_instances(field, h_px=2).max() == 1
    inst = instances.field_instances(field, boundary_prob=boundary, h_px=2)
    assert inst.max() == 2 and inst[15, 10] != inst[15, 50]


def test_edge_markers_split_touching_fields_of_different_colour():
    field = np.zeros((30, 60), bool)
    field[5:25, 5:55] = True  # one block of field class, two crops side by side
    image = np.zeros((30, 60, 3), np.uint8)
    image[:, :30] = (200, 180, 60)
    image[:, 30:] = (120, 160, 60)
    edges = instances.image_edges(image, sigma=1.0)
    assert edges.max() == 1 and edges[15, 10] < 0.05
    inst = instances.field_instances(field, markers="edges", edges=edges)
    assert inst.max() == 2 and inst[15, 10] != inst[15, 50] and (inst[~field] == 0).all()
    flat = instances.field_instances(field, markers="edges", edges=np.zeros(field.shape, np.float32))
    assert flat.max() == 1  # no edge, no split; every part still gets a marker
    with pytest.raises(ValueError, match="markers='edges' needs an edge map"):
        instances.field_instances(field, markers="edges")
    with pytest.raises(ValueError, match="markers must be one of"):
        instances.field_instances(field, markers="peaks")


def test_min_area_holes_and_confidence_markers():
    field = np.zeros((40, 40), bool)
    field[2:20, 2:20] = True
    field[8:10, 8:10] = False  # a 4-pixel hole
    field[30:33, 30:33] = True  # a 9-pixel speck
    inst = instances.field_instances(field, min_area_px=10, max_hole_px=8)
    assert inst.max() == 1 and inst[8, 8] == 1 and inst[31, 31] == 0
    conf = np.where(field, 0.9, 0.0).astype(np.float32)
    conf[10:12, 2:20] = 0.1  # a low-confidence line splits the interior into two markers
    inst = instances.field_instances(field, markers="confidence", confidence=conf, min_area_px=10)
    assert inst.max() == 2
    with pytest.raises(ValueError, match="needs a confidence map"):
        instances.field_instances(field, markers="confidence")
    with pytest.raises(ValueError, match="boundary_prob has shape"):
        instances.field_instances(field, boundary_prob=np.zeros((3, 3)))


def test_empty_field_mask_gives_no_instances():
    assert instances.field_instances(np.zeros((8, 8), bool)).max() == 0


# --- polygons ------------------------------------------------------------------------------------


def test_polygonize_attributes_crs_area_and_validity():
    sem = two_fields()
    inst = instances.field_instances(sem == CLASS_IDS["field"], h_px=2)
    conf = np.full(sem.shape, 0.75, np.float32)
    import pandas as pd

    tiles = pd.DataFrame(
        {
            "tile_id": ["t0", "t1"],
            "row_off": [0, 0],
            "col_off": [0, 28],
            "height": [40, 40],
            "width": [28, 32],
        }
    )
    gdf = instances.polygonize(inst, sem, TRANSFORM, CRS_UTM, {"scene_id": "s0"}, conf, tiles)
    assert list(gdf.columns) == instances.FIELD_COLUMNS + ["geometry"]
    assert gdf.crs == CRS_UTM and len(gdf) == 2
    assert gdf.geometry.is_valid.all() and (gdf["class"] == "field").all()
    assert (gdf.scene_id == "s0").all() and np.allclose(gdf.confidence, 0.75)
    assert sorted(gdf.tile_id) == ["t0", "t1"]
    # areas in m2: pixel counts x 0.25 m2
    counts = np.bincount(inst.ravel())[1:]
    assert sorted(gdf.area_m2) == pytest.approx(sorted(counts * 0.25))
    minx, miny, maxx, maxy = gdf.total_bounds
    assert minx >= 500000 and maxy <= 1200000 and maxx <= 500000 + 60 * 0.5


def test_polygonize_simplify_keeps_valid_polygons():
    inst = np.zeros((50, 50), np.int32)
    yy, xx = np.mgrid[:50, :50]
    inst[(yy - 25) ** 2 + (xx - 25) ** 2 < 300] = 1
    gdf = instances.polygonize(inst, (inst > 0).astype(np.uint8), TRANSFORM, CRS_UTM, simplify_tolerance=1.0)
    raw = instances.polygonize(inst, (inst > 0).astype(np.uint8), TRANSFORM, CRS_UTM)
    assert gdf.geometry.is_valid.all()
    assert len(gdf.geometry.iloc[0].exterior.coords) < len(raw.geometry.iloc[0].exterior.coords)
    assert gdf.confidence.isna().all()


def test_polygonize_geographic_crs_area():
    inst = np.zeros((10, 10), np.int32)
    inst[2:8, 2:8] = 1
    deg = from_origin(105.0, 11.0, 1e-5, 1e-5)  # ~1.1 m pixels near the equator
    gdf = instances.polygonize(inst, inst.astype(np.uint8), deg, CRS.from_epsg(4326))
    assert gdf.area_m2.iloc[0] == pytest.approx(36 * 1.1**2, rel=0.05)


def test_write_fields_round_trip_and_empty(tmp_path):
    sem = two_fields()
    inst = instances.field_instances(sem == CLASS_IDS["field"])
    gdf = instances.polygonize(inst, sem, TRANSFORM, CRS_UTM, {"scene_id": "s0"})
    paths = instances.write_fields(gdf, tmp_path / "a")
    back = gpd.read_file(paths["gpkg"], layer="fields")
    assert back.crs == CRS_UTM and len(back) == len(gdf)
    assert set(instances.FIELD_COLUMNS) <= set(back.columns)
    assert gpd.read_parquet(paths["parquet"]).crs == CRS_UTM
    empty = instances.polygonize(np.zeros((5, 5), np.int32), np.zeros((5, 5), np.uint8), TRANSFORM, CRS_UTM)
    paths = instances.write_fields(empty, tmp_path / "b")
    back = gpd.read_file(paths["gpkg"], layer="fields")
    assert len(back) == 0 and set(instances.FIELD_COLUMNS) <= set(back.columns)
    assert not list((tmp_path / "b").glob("*.tmp.*"))


def test_vote_segments_keeps_whole_segments_the_mask_calls_field():
    segments = np.zeros((10, 10), np.int32)
    segments[:, :4], segments[:, 4:7], segments[:, 7:] = 5, 7, 9  # 40, 30 and 30 px
    mask = np.zeros((10, 10), bool)
    mask[:, :4] = True  # segment 5: all field
    mask[:6, 4:7] = True  # segment 7: 60 % field
    mask[:4, 7:] = True  # segment 9: 40 % field
    got = instances.vote_segments(mask, segments)
    expected = np.zeros((10, 10), np.int32)
    expected[:, :4], expected[:, 4:7] = 1, 2  # whole segments, ids consecutive; 9 is not a field
    assert got.dtype == np.int32 and np.array_equal(got, expected)
    assert np.array_equal(instances.vote_segments(mask, segments, min_share=0.35).max(), 3)
    assert np.array_equal(
        instances.vote_segments(mask, segments, min_area_px=35), (segments == 5).astype(np.int32)
    )
    assert instances.vote_segments(np.zeros((10, 10), bool), segments).max() == 0
    with pytest.raises(ValueError, match="segments have shape"):
        instances.vote_segments(mask, segments[:5])
    with pytest.raises(ValueError, match="labels >= 0"):
        instances.vote_segments(mask, -segments)


def test_scene_fields_votes_segments_inside_the_predicted_area():
    refined = np.full((10, 10), CLASS_IDS["others"], np.uint8)
    refined[:, :6] = CLASS_IDS["field"]
    refined[:, 8:] = NODATA  # not predicted (outside the inferred tiles)
    segments = np.zeros((10, 10), np.int32)
    segments[:5], segments[5:, :5], segments[5:, 5:] = 1, 2, 3
    inst, gdf = instances.scene_fields(refined, TRANSFORM, CRS_UTM, "s0", markers="segments", segments=segments,
                                       min_area_px=1)  # fmt: skip
    # segment 1: 30 field px of 40 predicted; segment 2: all field; segment 3: 5 field px of 15 predicted
    expected = np.zeros((10, 10), np.int32)
    expected[:5, :8], expected[5:, :5] = 1, 2
    assert np.array_equal(inst, expected) and len(gdf) == 2 and list(gdf["class"]) == ["field", "field"]
    with pytest.raises(ValueError, match="needs the image segments"):
        instances.scene_fields(refined, TRANSFORM, CRS_UTM, "s0", markers="segments")


def test_read_mask_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebook 05"):
        instances.read_mask(tmp_path / "refined" / "s0.tif")


def test_scene_fields_from_a_saved_mask(tmp_path):
    sem = two_fields()
    path = tmp_path / "refined.tif"
    geo.write_geotiff(path, sem.astype(np.uint8), CRS_UTM, TRANSFORM)
    mask, crs, transform = instances.read_mask(path)
    image = np.random.default_rng(0).integers(0, 255, sem.shape + (3,), dtype=np.uint8)
    inst, gdf = instances.scene_fields(mask, transform, crs, "s0", image=image, markers="distance", h_px=2)
    assert inst.max() == len(gdf) == 2 and gdf.crs == CRS_UTM
    colours = np.array([[120, 120, 120], [230, 200, 60], [30, 120, 40], [40, 110, 220]], np.uint8)
    inst, gdf = instances.scene_fields(mask, transform, crs, "s0", image=colours[sem])  # edges by default
    assert inst.max() == len(gdf) >= 1 and (mask[inst > 0] == CLASS_IDS["field"]).all()


def test_field_settings_rename_notebook_parameters_and_fit_scene_fields():
    import inspect

    s = instances.FieldSettings.from_params({"min_field_px": 400, "simplify_m": 0.5, "seed": 3})
    assert s.min_area_px == 400 and s.simplify_tolerance == 0.5 and s.markers == "segments"
    with pytest.raises(ValueError, match="watershed_markers must be one of"):
        instances.FieldSettings.from_params({"watershed_markers": "peaks"})
    accepted = set(inspect.signature(instances.scene_fields).parameters) | set(
        inspect.signature(instances.field_instances).parameters
    )
    assert set(s.kwargs()) - accepted == {"use_image_edges"}  # read by inference.polygonize_saved
