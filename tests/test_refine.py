"""SAM refinement, watershed field instances and polygonization on hand-made masks."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
from rasterio.crs import CRS
from rasterio.transform import from_origin

from magseg_nb import geo, refine
from magseg_nb.labels import CLASS_IDS, NODATA

CRS_UTM = CRS.from_epsg(32648)  # UTM 48N (Vietnam)
TRANSFORM = from_origin(500000.0, 1200000.0, 0.5, 0.5)  # 0.5 m pixels


def two_fields(h=40, w=60):
    """Two rectangular fields touching at a one-pixel neck, a tree block, water, and others."""
    sem = np.zeros((h, w), np.uint8)
    sem[4:20, 4:26] = CLASS_IDS["field"]
    sem[4:20, 30:56] = CLASS_IDS["field"]
    sem[11:12, 26:30] = CLASS_IDS["field"]  # thin neck joining the two
    sem[26:36, 4:20] = CLASS_IDS["tree"]
    sem[26:36, 30:50] = CLASS_IDS["water"]
    return sem


@pytest.fixture(scope="module")
def tiny_predictor():
    return refine.load_sam("tiny", seed=0)


# --- SAM -----------------------------------------------------------------------------------------


def test_load_sam_none_and_unknown():
    assert refine.load_sam("none") is None
    with pytest.raises(ValueError, match="unknown SAM backend 'vit_l'.*none, superpixels, tiny, vit_b, vit_h"):
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


# --- instances -----------------------------------------------------------------------------------


def test_watershed_splits_fields_joined_by_a_neck():
    field = two_fields() == CLASS_IDS["field"]
    inst = refine.field_instances(field, min_area_px=16, h_px=2)
    assert inst.dtype == np.int32
    assert inst.max() == 2 and set(np.unique(inst)) == {0, 1, 2}
    assert inst[10, 10] != inst[10, 40] and inst[10, 10] > 0 and inst[10, 40] > 0
    assert (inst[~field] == 0).all()


def test_boundary_prob_separates_touching_fields():
    field = np.zeros((30, 60), bool)
    field[5:25, 5:55] = True  # one block: two fields with no gap between them
    boundary = np.zeros(field.shape, np.float32)
    boundary[:, 29:31] = 1.0
    assert refine.field_instances(field, h_px=2).max() == 1
    inst = refine.field_instances(field, boundary_prob=boundary, h_px=2)
    assert inst.max() == 2 and inst[15, 10] != inst[15, 50]


def test_edge_markers_split_touching_fields_of_different_colour():
    field = np.zeros((30, 60), bool)
    field[5:25, 5:55] = True  # one block of field class, two crops side by side
    image = np.zeros((30, 60, 3), np.uint8)
    image[:, :30] = (200, 180, 60)
    image[:, 30:] = (120, 160, 60)
    edges = refine.image_edges(image, sigma=1.0)
    assert edges.max() == 1 and edges[15, 10] < 0.05
    inst = refine.field_instances(field, markers="edges", edges=edges)
    assert inst.max() == 2 and inst[15, 10] != inst[15, 50] and (inst[~field] == 0).all()
    flat = refine.field_instances(field, markers="edges", edges=np.zeros(field.shape, np.float32))
    assert flat.max() == 1  # no edge, no split; every part still gets a marker
    with pytest.raises(ValueError, match="markers='edges' needs an edge map"):
        refine.field_instances(field, markers="edges")
    with pytest.raises(ValueError, match="markers must be one of"):
        refine.field_instances(field, markers="peaks")


def test_min_area_holes_and_confidence_markers():
    field = np.zeros((40, 40), bool)
    field[2:20, 2:20] = True
    field[8:10, 8:10] = False  # a 4-pixel hole
    field[30:33, 30:33] = True  # a 9-pixel speck
    inst = refine.field_instances(field, min_area_px=10, max_hole_px=8)
    assert inst.max() == 1 and inst[8, 8] == 1 and inst[31, 31] == 0
    conf = np.where(field, 0.9, 0.0).astype(np.float32)
    conf[10:12, 2:20] = 0.1  # a low-confidence line splits the interior into two markers
    inst = refine.field_instances(field, markers="confidence", confidence=conf, min_area_px=10)
    assert inst.max() == 2
    with pytest.raises(ValueError, match="needs a confidence map"):
        refine.field_instances(field, markers="confidence")
    with pytest.raises(ValueError, match="boundary_prob has shape"):
        refine.field_instances(field, boundary_prob=np.zeros((3, 3)))


def test_empty_field_mask_gives_no_instances():
    assert refine.field_instances(np.zeros((8, 8), bool)).max() == 0


# --- polygons ------------------------------------------------------------------------------------


def test_polygonize_attributes_crs_area_and_validity():
    sem = two_fields()
    inst = refine.field_instances(sem == CLASS_IDS["field"], h_px=2)
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
    gdf = refine.polygonize(inst, sem, TRANSFORM, CRS_UTM, {"scene_id": "s0"}, conf, tiles)
    assert list(gdf.columns) == refine.FIELD_COLUMNS + ["geometry"]
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
    gdf = refine.polygonize(inst, (inst > 0).astype(np.uint8), TRANSFORM, CRS_UTM, simplify_tolerance=1.0)
    raw = refine.polygonize(inst, (inst > 0).astype(np.uint8), TRANSFORM, CRS_UTM)
    assert gdf.geometry.is_valid.all()
    assert len(gdf.geometry.iloc[0].exterior.coords) < len(raw.geometry.iloc[0].exterior.coords)
    assert gdf.confidence.isna().all()


def test_polygonize_geographic_crs_area():
    inst = np.zeros((10, 10), np.int32)
    inst[2:8, 2:8] = 1
    deg = from_origin(105.0, 11.0, 1e-5, 1e-5)  # ~1.1 m pixels near the equator
    gdf = refine.polygonize(inst, inst.astype(np.uint8), deg, CRS.from_epsg(4326))
    assert gdf.area_m2.iloc[0] == pytest.approx(36 * 1.1**2, rel=0.05)


def test_write_fields_round_trip_and_empty(tmp_path):
    sem = two_fields()
    inst = refine.field_instances(sem == CLASS_IDS["field"])
    gdf = refine.polygonize(inst, sem, TRANSFORM, CRS_UTM, {"scene_id": "s0"})
    paths = refine.write_fields(gdf, tmp_path / "a")
    back = gpd.read_file(paths["gpkg"], layer="fields")
    assert back.crs == CRS_UTM and len(back) == len(gdf)
    assert set(refine.FIELD_COLUMNS) <= set(back.columns)
    assert gpd.read_parquet(paths["parquet"]).crs == CRS_UTM
    empty = refine.polygonize(np.zeros((5, 5), np.int32), np.zeros((5, 5), np.uint8), TRANSFORM, CRS_UTM)
    paths = refine.write_fields(empty, tmp_path / "b")
    back = gpd.read_file(paths["gpkg"], layer="fields")
    assert len(back) == 0 and set(refine.FIELD_COLUMNS) <= set(back.columns)
    assert not list((tmp_path / "b").glob("*.tmp.*"))


def test_read_mask_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebook 05"):
        refine.read_mask(tmp_path / "refined" / "s0.tif")


def test_scene_fields_from_a_saved_mask(tmp_path):
    sem = two_fields()
    path = tmp_path / "refined.tif"
    geo.write_geotiff(path, sem.astype(np.uint8), CRS_UTM, TRANSFORM)
    mask, crs, transform = refine.read_mask(path)
    image = np.random.default_rng(0).integers(0, 255, sem.shape + (3,), dtype=np.uint8)
    inst, gdf = refine.scene_fields(mask, transform, crs, "s0", image=image, markers="distance", h_px=2)
    assert inst.max() == len(gdf) == 2 and gdf.crs == CRS_UTM
    colours = np.array([[120, 120, 120], [230, 200, 60], [30, 120, 40], [40, 110, 220]], np.uint8)
    inst, gdf = refine.scene_fields(mask, transform, crs, "s0", image=colours[sem])  # edges by default
    assert inst.max() == len(gdf) >= 1 and (mask[inst > 0] == CLASS_IDS["field"]).all()


def test_superpixel_refinement_snaps_class_borders_to_the_image():
    """A field/tree border off the 8 px cell grid: the coarse mask is blocky, the superpixel vote
    follows the colour edge, so field IoU rises; nodata stays nodata."""
    from magseg_nb import metrics, prompts
    from magseg_nb.labels import CLASS_IDS, NODATA

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
        return metrics.semantic_from_cm(metrics.confusion_matrix(truth[keep], pred[keep]))["iou"][CLASS_IDS["tree"]]

    assert iou(refined) > iou(coarse) + 0.02 and iou(refined) > 0.9
    assert 0.5 <= prob[coarse != NODATA].min() and prob.max() <= 1.0
