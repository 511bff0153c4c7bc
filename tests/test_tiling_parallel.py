"""Notebook 01's data preparation: the faster mask path against the previous one, and scenes prepared in
processes or on a Dask cluster giving the same files as the serial path."""

from __future__ import annotations

import hashlib

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from rasterio.transform import from_origin
from skimage.segmentation import find_boundaries

from benchmarks.rasterize_reference import reference_rasterize
from magseg_nb import geo, landscape
from magseg_nb.labels import CLASS_IDS

CRS = "EPSG:32648"
T = from_origin(500_000.0, 1_200_000.0, 1.0, 1.0)


def assert_same_masks(got: geo.Masks, want: geo.Masks):
    for name in ("semantic", "boundary", "instances"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b), f"{name}: {int((a != b).sum())} pixels differ"
    assert got.report == want.report


def tricky_labels() -> gpd.GeoDataFrame:
    """Nested, partly overlapping, equal-area (ties), holed, multi-part and sub-pixel polygons."""
    x0, y0 = 500_000.0, 1_200_000.0

    def box(c0, r0, c1, r1):
        return shapely.box(x0 + c0, y0 - r1, x0 + c1, y0 - r0)

    rows = [
        ("field", 1, box(0, 0, 30, 30)),
        ("field", 2, box(20.5, 10.25, 50, 40)),  # overlaps field 1 off the pixel grid
        ("tree", 0, box(5, 5, 10, 10)),  # inside field 1
        ("field", 3, box(50, 0, 60, 10)),  # same area as the next one: a tie, file order decides
        ("water", 0, box(50, 10, 60, 20)),
        ("field", 4, box(0, 40, 30, 64).difference(box(10, 45, 20, 55))),  # a hole
        ("field", 5, shapely.MultiPolygon([box(35, 45, 40, 50), box(45, 45, 50, 50)])),
        ("field", 6, box(60, 30, 64, 34)),
        ("tree", 0, box(60.2, 30.2, 60.4, 30.4)),  # sub-pixel, overlaps field 6 by less than a pixel
        ("road", 0, box(0, 30, 64, 32)),
        ("field", 7, box(40, 20, 45, 25)),  # a field touching nothing, inside field 2
    ]
    df = pd.DataFrame(rows, columns=["class", "field_id", "geometry"])
    ids = df["class"].map(lambda c: CLASS_IDS.get(c, CLASS_IDS["others"])).astype(np.uint8)
    return gpd.GeoDataFrame(df.assign(class_id=ids.values), geometry="geometry", crs=CRS)


@pytest.mark.parametrize("presence_only", [False, True])
def test_masks_equal_the_previous_implementation_on_tricky_polygons(presence_only):
    labels = tricky_labels()
    valid = np.ones((64, 64), bool)
    valid[:, :3] = False  # a nodata edge
    got = geo.rasterize_labels(labels, (64, 64), T, valid, presence_only)
    want = reference_rasterize(labels, (64, 64), T, valid, presence_only)
    assert_same_masks(got, want)
    # The fixture exercises what it claims: overlaps are counted and the tie is decided by file order.
    assert got.report["n_overlap_pairs"] >= 4 and got.report["overlap_px"] > 0
    assert got.instances[5, 55] == 3 and got.semantic[15, 55] == CLASS_IDS["water"]
    assert got.instances[50, 15] == 0 and got.instances[50, 5] == 4  # the hole is not field 4


def test_masks_equal_the_previous_implementation_on_a_generated_scene():
    scene = landscape.generate_scene("s", "vietnam", 256, 0.8, seed=3)
    labels = scene.labels.copy()
    labels["class_id"] = labels["class"].map(lambda c: CLASS_IDS.get(c, CLASS_IDS["others"])).astype(np.uint8)
    valid = scene.image.any(axis=2)
    got = geo.rasterize_labels(labels, scene.fields.shape, scene.transform, valid)
    want = reference_rasterize(labels, scene.fields.shape, scene.transform, valid)
    assert_same_masks(got, want)
    assert got.report["n_fields"] > 20


def test_inner_boundaries_equal_skimage():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 7), (9, 1), (40, 33)]:
        labels = rng.integers(0, 4, shape).astype(np.int32)
        want = (find_boundaries(labels, connectivity=1, mode="inner") & (labels > 0)).astype(np.uint8)
        got = geo.inner_boundaries(labels)
        assert got.dtype == np.uint8 and np.array_equal(got, want), shape
    labels = np.zeros((6, 6), np.int32)
    labels[1:5, 1:5] = 7
    expected = np.zeros((6, 6), np.uint8)
    expected[1:5, 1:5] = 1
    expected[2:4, 2:4] = 0  # inside pixels of a field with no other neighbour are no boundary
    assert np.array_equal(geo.inner_boundaries(labels), expected)


# --- the same files serially, in processes, and on a Dask cluster --------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three generated scenes of 192 px (two countries), with a nodata edge."""
    out = tmp_path_factory.mktemp("sources")
    d = landscape.Difficulty(nodata_edge_frac=0.1)
    return landscape.generate_sources(out, ["vietnam", "india"], 2, 192, 0.8, seed=1, difficulty=d,
                                      log=lambda *_: None)[:3]  # fmt: skip


def prepare_all(sources, run01, **kw):
    scenes = geo.prepare_scenes(sources, run01 / "scenes", log=lambda *_: None, **kw)
    tiles, rep = geo.make_tiles(run01, scenes, 64, 16, 64, seed=0, **kw)
    return scenes, tiles, rep


def file_hashes(run01) -> dict[str, str]:
    """sha256 of every raster and table (GeoPackages hold a write time, so they are compared by content)."""
    return {str(p.relative_to(run01)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run01.rglob("*")) if p.suffix in (".tif", ".csv")}  # fmt: skip


@pytest.fixture(scope="module")
def serial(sources, tmp_path_factory):
    run01 = tmp_path_factory.mktemp("serial")
    return run01, *prepare_all(sources, run01)


def assert_same_run(run01, scenes, tiles, rep, serial):
    ref01, ref_scenes, ref_tiles, ref_rep = serial
    pd.testing.assert_frame_equal(scenes, ref_scenes)
    pd.testing.assert_frame_equal(tiles, ref_tiles)
    assert rep == ref_rep
    got, want = file_hashes(run01), file_hashes(ref01)
    assert len(want) == 3 * 4 + 2 * len(ref_tiles) + 2  # scene rasters, two files per tile, two tables
    assert got == want
    for scene_id in ref_scenes.scene_id:
        a = gpd.read_file(geo.scene_paths(run01, scene_id)["labels"])
        b = gpd.read_file(geo.scene_paths(ref01, scene_id)["labels"])
        pd.testing.assert_frame_equal(a.drop(columns="geometry"), b.drop(columns="geometry"))
        assert shapely.equals_exact(a.geometry.values, b.geometry.values, 0).all()


def test_two_worker_processes_write_the_same_files(sources, serial, tmp_path):
    run01 = tmp_path / "run01"
    assert_same_run(run01, *prepare_all(sources, run01, workers=2), serial)


def test_a_dask_local_cluster_writes_the_same_files(sources, serial, tmp_path):
    distributed = pytest.importorskip("distributed")
    run01 = tmp_path / "run01"
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        with distributed.get_task_stream(client) as stream:
            out = prepare_all(sources, run01, executor=client)
        # Every per-scene job ran on the cluster: prepare, scan and write, three scenes each.
        names = sorted(task["key"].rsplit("-", 1)[0] for task in stream.data)
        assert names == ["prepare_scene"] * 3 + ["scan_tiles"] * 3 + ["write_scene_tiles"] * 3
    assert_same_run(run01, *out, serial)


def test_run_each_keeps_the_order_and_raises_the_job_error(tmp_path):
    assert geo.run_each(divmod, [(7, 2), (9, 4), (1, 1)], workers=2) == [(3, 1), (2, 1), (1, 0)]
    assert geo.run_each(divmod, [(7, 2)], workers=1) == [(3, 1)]
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(geo.GeoDataError, match="bad.tif"):
        geo.run_each(geo.open_raster, [(bad,), (bad,)], workers=2)
