"""geo: GeoTIFF I/O, masks from polygons, bad input, tiling, the spatial split, figures of notebook 01."""

from __future__ import annotations

import hashlib
import itertools

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from magseg_nb import geo, landscape
from magseg_nb.labels import NODATA

CRS = "EPSG:32648"
T = from_origin(500_000.0, 1_200_000.0, 1.0, 1.0)  # 1 m pixels, top-left at (500000, 1200000)


def px_box(r0, c0, r1, c1):
    """A polygon covering pixel rows r0..r1-1 and columns c0..c1-1 of the 1 m grid ``T``."""
    return shapely.box(500_000 + c0, 1_200_000 - r1, 500_000 + c1, 1_200_000 - r0)


def make_raster(path, h=20, w=20, nodata=0, crs=CRS, value=100):
    data = np.full((3, h, w), value, np.uint8)
    return geo.write_geotiff(path, data, crs, T, nodata=nodata)


def make_labels(path, rows, crs=CRS):
    """rows: (class, field_id, geometry) in UTM."""
    gdf = gpd.GeoDataFrame(pd.DataFrame(rows, columns=["class", "field_id", "geometry"]), crs=CRS)
    if crs != CRS:
        gdf = gdf.to_crs(crs)
    return geo.write_vector(gdf, path)


@pytest.fixture
def simple(tmp_path):
    """20x20 raster; two side-by-side fields (cols 0-9, 10-19, rows 0-9), a tree inside field 1, water."""
    image = make_raster(tmp_path / "in" / "image.tif")
    rows = [
        ("field", 1, px_box(0, 0, 10, 10)),
        ("field", 2, px_box(0, 10, 10, 20)),
        ("tree", 0, px_box(2, 2, 4, 4)),
        ("water", 0, px_box(14, 0, 20, 5)),
        ("road", 0, px_box(10, 0, 12, 20)),
    ]
    labels = make_labels(tmp_path / "in" / "labels.gpkg", rows)
    return image, labels, rows


# --- writing ------------------------------------------------------------------------------------------


def test_write_geotiff_round_trip_2d_and_3d(tmp_path):
    a = np.arange(12 * 10, dtype=np.int32).reshape(12, 10)
    path = geo.write_geotiff(tmp_path / "a.tif", a, CRS, T)
    with rasterio.open(path) as src:
        assert (src.count, src.dtypes[0], src.crs.to_string(), src.transform) == (1, "int32", CRS, T)
        assert np.array_equal(src.read(1), a)
    rgb = np.random.default_rng(0).integers(0, 255, (3, 300, 260), dtype=np.uint8)
    path = geo.write_geotiff(tmp_path / "sub" / "rgb.tif", rgb, CRS, T, nodata=0)
    with rasterio.open(path) as src:
        assert src.nodata == 0 and src.block_shapes[0] == (256, 256)
        assert np.array_equal(src.read(), rgb)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.tif", "rgb.tif", "sub"], "no temp files left"


def test_write_geotiff_failure_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        geo.write_geotiff(tmp_path / "bad.tif", np.zeros((2, 2, 2, 2)), CRS, T)
    with pytest.raises(rasterio.errors.CRSError):
        geo.write_geotiff(tmp_path / "bad.tif", np.zeros((4, 4), np.uint8), "EPSG:999999", T)
    assert list(tmp_path.iterdir()) == []


# --- masks from polygons ----------------------------------------------------------------------------


def test_prepare_scene_masks_values(tmp_path, simple):
    image, labels, _ = simple
    out = geo.prepare_scene(image, labels, tmp_path / "scene")
    read = {k: rasterio.open(out[k]).read(1) for k in ("semantic", "boundary", "instances")}
    sem, bnd, inst = read["semantic"], read["boundary"], read["instances"]
    assert sem.dtype == np.uint8 and bnd.dtype == np.uint8 and inst.dtype == np.int32
    # Fields, with the small tree polygon winning inside field 1; water; road and the rest are others.
    assert (sem[0:10, 4:10] == 1).all() and (sem[2:4, 2:4] == 2).all()
    assert (sem[14:20, 0:5] == 3).all() and (sem[10:12] == 0).all() and (sem[14:20, 5:] == 0).all()
    assert (inst[0:10, 4:10] == 1).all() and (inst[0:10, 10:20] == 2).all()
    assert (inst[2:4, 2:4] == 0).all() and (inst[10:] == 0).all()
    # Inner edges of each field, around the tree hole too; 0 elsewhere.
    assert bnd[5, 9] == 1 and bnd[5, 10] == 1 and bnd[9, 5] == 1 and bnd[9, 15] == 1
    assert bnd[0, 5] == 0, "the raster edge is not a field edge"
    assert bnd[5, 5] == 0 and bnd[2, 1] == 1 and bnd[12, 5] == 0
    assert set(np.unique(bnd)) == {0, 1}
    rep = out["report"]
    assert rep["n_fields"] == 2 and rep["n_polygons"] == 5
    assert rep["n_overlap_pairs"] == 1 and rep["overlap_px"] == 4
    assert rep["crs"] == CRS and rep["res_m"] == 1.0 and (rep["width"], rep["height"]) == (20, 20)
    assert rep["reprojected_from"] is None and rep["nodata_frac"] == 0
    assert rep["frac_water"] == pytest.approx(30 / 400)
    with rasterio.open(out["instances"]) as src:
        assert src.crs.to_string() == CRS and src.transform == T
    # The image and normalised labels are copied next to the masks.
    assert out["image"] == tmp_path / "scene" / "image.tif" and out["image"].exists()
    back = gpd.read_file(out["labels"], layer="labels")
    assert list(back.columns) == ["class", "field_id", "geometry"] and len(back) == 5


def test_fields_without_ids_get_new_unique_ids(tmp_path):
    image = make_raster(tmp_path / "image.tif")
    gdf = gpd.GeoDataFrame({"kind": ["a", "a", "b"]}, geometry=[px_box(0, 0, 5, 5), px_box(5, 5, 10, 10),
                                                                 px_box(10, 10, 20, 20)], crs=CRS)  # fmt: skip
    geo.write_vector(gdf, tmp_path / "labels.gpkg")
    out = geo.prepare_scene(
        image,
        tmp_path / "labels.gpkg",
        tmp_path / "s",
        class_field="kind",
        class_map={"a": "field", "b": "water"},
    )
    inst = rasterio.open(out["instances"]).read(1)
    assert sorted(np.unique(inst)) == [0, 1, 2]
    assert rasterio.open(out["semantic"]).read(1)[15, 15] == 3


def test_nodata_pixels_and_presence_only(tmp_path, simple):
    _, labels, _ = simple
    data = np.full((3, 20, 20), 90, np.uint8)
    data[:, :, 15:] = 0  # nodata on the right
    image = geo.write_geotiff(tmp_path / "nd.tif", data, CRS, T, nodata=0)
    out = geo.prepare_scene(image, labels, tmp_path / "s1")
    sem, inst = rasterio.open(out["semantic"]).read(1), rasterio.open(out["instances"]).read(1)
    assert (sem[:, 15:] == NODATA).all() and (inst[:, 15:] == 0).all() and (sem[:, :15] != NODATA).all()
    assert out["report"]["nodata_frac"] == pytest.approx(0.25)
    # presence-only labels: unlabelled pixels are unknown, not "others".
    only_fields = make_labels(tmp_path / "f.gpkg", [("field", 1, px_box(0, 0, 10, 10))])
    sem = rasterio.open(
        geo.prepare_scene(image, only_fields, tmp_path / "s2", presence_only=True)["semantic"]
    ).read(1)
    assert (sem[0:10, 0:10] == 1).all() and (sem[12:, :] == NODATA).all()


def test_nodata_class_in_class_map(tmp_path, simple):
    image, _, _ = simple
    labels = make_labels(
        tmp_path / "l.gpkg", [("field", 1, px_box(0, 0, 10, 10)), ("cloud", 0, px_box(0, 0, 4, 4))]
    )
    out = geo.prepare_scene(image, labels, tmp_path / "s", class_map={"cloud": "nodata"})
    sem = rasterio.open(out["semantic"]).read(1)
    assert (sem[0:4, 0:4] == NODATA).all() and (sem[5:10, 5:10] == 1).all()
    assert (rasterio.open(out["instances"]).read(1)[0:4, 0:4] == 0).all()


def test_non_uint8_image_becomes_rgb8(tmp_path, simple):
    _, labels, _ = simple
    data = np.random.default_rng(1).integers(100, 4000, (4, 20, 20)).astype(np.uint16)
    image = geo.write_geotiff(tmp_path / "s2.tif", data, CRS, T)
    out = geo.prepare_scene(image, labels, tmp_path / "s")
    with rasterio.open(out["image"]) as src:
        assert (src.count, src.dtypes[0], src.nodata) == (3, "uint8", 0)
        assert src.read().min() >= 1 and src.read().max() == 255
    # A 4-band uint8 image (RGB + NIR) keeps its first three bands, unstretched.
    rgbn = np.random.default_rng(2).integers(1, 255, (4, 20, 20)).astype(np.uint8)
    image = geo.write_geotiff(tmp_path / "rgbn.tif", rgbn, CRS, T, nodata=0)
    with rasterio.open(geo.prepare_scene(image, labels, tmp_path / "s4")["image"]) as src:
        assert src.count == 3 and np.array_equal(src.read(), rgbn[:3])


# --- bad input ----------------------------------------------------------------------------------------


def test_raster_without_crs_is_an_error_naming_file_and_fix(tmp_path, simple):
    _, labels, _ = simple
    path = tmp_path / "nocrs.tif"
    with rasterio.open(path, "w", driver="GTiff", height=8, width=8, count=3, dtype="uint8") as dst:
        dst.write(np.ones((3, 8, 8), np.uint8))
    with pytest.raises(geo.GeoDataError, match=r"nocrs\.tif has no CRS.*rio edit-info --crs"):
        geo.prepare_scene(path, labels, tmp_path / "s")


@pytest.mark.parametrize(
    "content", [b"not a tiff at all", b"II*\x00" + b"\x00" * 40], ids=["text", "truncated"]
)
def test_corrupt_geotiff_is_an_error_naming_file(tmp_path, simple, content):
    _, labels, _ = simple
    path = tmp_path / "broken.tif"
    path.write_bytes(content)
    with pytest.raises(geo.GeoDataError, match=r"broken\.tif.*corrupt.*re-download"):
        geo.prepare_scene(path, labels, tmp_path / "s")


def test_truncated_pixel_data_is_an_error_naming_file(tmp_path, simple):
    _, labels, _ = simple
    good = geo.write_geotiff(tmp_path / "good.tif", np.random.default_rng(0).integers(0, 255, (3, 512, 512),
                                                                                       np.uint8), CRS, T)  # fmt: skip
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(geo.GeoDataError, match=r"cut\.tif"):
        geo.prepare_scene(cut, labels, tmp_path / "s")


def test_missing_files_are_named(tmp_path, simple):
    image, labels, _ = simple
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        geo.prepare_scene(tmp_path / "nope.tif", labels, tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="nope.gpkg"):
        geo.prepare_scene(image, tmp_path / "nope.gpkg", tmp_path / "s")


def test_labels_in_another_crs_are_reprojected_and_reported(tmp_path, simple):
    image, labels_utm, rows = simple
    ref = geo.prepare_scene(image, labels_utm, tmp_path / "ref")
    wgs = make_labels(tmp_path / "wgs.gpkg", rows, crs="EPSG:4326")
    with pytest.warns(UserWarning, match=r"wgs\.gpkg: labels are in EPSG:4326.*reprojected"):
        out = geo.prepare_scene(image, wgs, tmp_path / "s")
    assert out["report"]["reprojected_from"] == "EPSG:4326"
    for k in ("semantic", "instances"):
        assert np.array_equal(rasterio.open(out[k]).read(1), rasterio.open(ref[k]).read(1))
    assert gpd.read_file(out["labels"]).crs.to_epsg() == 32648


def test_empty_label_file_is_an_error(tmp_path, simple):
    image, _, _ = simple
    empty = gpd.GeoDataFrame({"class": [], "field_id": []}, geometry=[], crs=CRS)
    geo.write_vector(empty, tmp_path / "empty.gpkg")
    with pytest.raises(geo.GeoDataError, match=r"empty\.gpkg.*has no features"):
        geo.prepare_scene(image, tmp_path / "empty.gpkg", tmp_path / "s")


def test_labels_without_crs_unknown_classes_or_outside_the_raster(tmp_path, simple):
    image, _, rows = simple
    nocrs = gpd.GeoDataFrame(pd.DataFrame(rows, columns=["class", "field_id", "geometry"]))
    geo.write_vector(nocrs, tmp_path / "nocrs.gpkg")
    with pytest.raises(geo.GeoDataError, match=r"nocrs\.gpkg has no CRS"):
        geo.prepare_scene(image, tmp_path / "nocrs.gpkg", tmp_path / "s")
    odd = make_labels(tmp_path / "odd.gpkg", [("rice", 1, px_box(0, 0, 5, 5))])
    with pytest.raises(geo.GeoDataError, match=r"\['rice'\].*class_map"):
        geo.prepare_scene(image, odd, tmp_path / "s")
    with pytest.raises(geo.GeoDataError, match="no column 'crop'"):
        geo.prepare_scene(image, odd, tmp_path / "s", class_field="crop")
    far = make_labels(tmp_path / "far.gpkg", [("field", 1, shapely.box(0, 0, 10, 10))])
    with pytest.raises(geo.GeoDataError, match=r"no polygon of .*far\.gpkg lies inside raster"):
        geo.prepare_scene(image, far, tmp_path / "s")


def test_overlap_rule_smaller_polygon_wins_whatever_the_file_order(tmp_path):
    image = make_raster(tmp_path / "image.tif")
    small, big = ("water", 0, px_box(5, 5, 8, 8)), ("field", 7, px_box(0, 0, 20, 20))
    for k, rows in enumerate(([small, big], [big, small])):
        labels = make_labels(tmp_path / f"l{k}.gpkg", rows)
        out = geo.prepare_scene(image, labels, tmp_path / f"s{k}")
        sem = rasterio.open(out["semantic"]).read(1)
        assert (sem[5:8, 5:8] == 3).all() and sem[0, 0] == 1
        assert out["report"]["n_overlap_pairs"] == 1 and out["report"]["overlap_px"] == 9


# --- tiling and the split -------------------------------------------------------------------------


def test_tile_starts():
    assert geo.tile_starts(100, 32, 8) == [0, 24, 48, 68]
    assert geo.tile_starts(96, 32, 0) == [0, 32, 64]
    assert geo.tile_starts(32, 32, 0) == [0]
    with pytest.raises(ValueError, match="tile_overlap=32"):
        geo.tile_starts(100, 32, 32)
    with pytest.raises(geo.GeoDataError, match="smaller than tile_size=64"):
        geo.tile_starts(50, 64, 0)


def test_all_nodata_tiles_are_skipped_and_counted(tmp_path, simple):
    _, labels, _ = simple
    data = np.full((3, 20, 20), 90, np.uint8)
    data[:, 10:, :] = 0
    image = geo.write_geotiff(tmp_path / "nd.tif", data, CRS, T, nodata=0)
    geo.prepare_scene(image, labels, tmp_path / "scenes" / "s0")
    tiles, rep = geo.scan_tiles(tmp_path / "scenes" / "s0", "s0", "vietnam", 10, 0)
    assert rep == {"n_candidates": 4, "n_all_nodata": 2}
    assert list(tiles.tile_id) == ["s0_r0_c0", "s0_r0_c1"]
    assert tiles.nodata_frac.tolist() == [0.0, 0.0]
    assert tiles.loc[0, "frac_field"] == pytest.approx(96 / 100)


def candidates(n_scenes=2, countries=("vietnam", "india"), side=1024, tile=128, overlap=32):
    rows = []
    for country, k in itertools.product(countries, range(n_scenes)):
        sid = f"{country[:2]}{k}"
        for i, r in enumerate(geo.tile_starts(side, tile, overlap)):
            for j, c in enumerate(geo.tile_starts(side, tile, overlap)):
                rows.append({"tile_id": f"{sid}_r{i}_c{j}", "scene_id": sid, "country": country, "row_off": r,
                             "col_off": c, "height": tile, "width": tile})  # fmt: skip
    return pd.DataFrame(rows)


def test_spatial_split_never_shares_pixels_between_splits():
    tiles, rep = geo.spatial_split(candidates(), block_size=256, seed=0)
    assert rep["n_straddling_dropped"] > 0 and rep["n_blocks"] == 64
    for _, g in tiles.groupby("scene_id"):
        owner = np.full((1024, 1024), "", dtype=object)
        for t in g.itertuples():
            win = owner[t.row_off : t.row_off + t.height, t.col_off : t.col_off + t.width]
            assert set(np.unique(win)) <= {"", t.split}, f"{t.tile_id} shares pixels with another split"
            win[...] = t.split
    # Each country has all three splits, roughly in proportion.
    shares = pd.crosstab(tiles.country, tiles.split, normalize="index")
    assert (shares[["train", "val", "test"]] > 0.05).all().all()
    assert (shares["train"] > 0.5).all()
    # block_id is the block of the tile centre.
    t = tiles.iloc[0]
    assert t.block_id == f"{t.scene_id}_b{(t.row_off + 64) // 256}_{(t.col_off + 64) // 256}"


def test_spatial_split_is_deterministic_by_seed():
    a, _ = geo.spatial_split(candidates(), 256, seed=1)
    b, _ = geo.spatial_split(candidates(), 256, seed=1)
    c, _ = geo.spatial_split(candidates(), 256, seed=2)
    assert a.equals(b) and not a.split.equals(c.split.reindex(a.index))


def test_spatial_split_small_country_still_gets_val_and_test():
    tiles, _ = geo.spatial_split(candidates(1, ("cambodia",), side=384, tile=128, overlap=0), 128)
    assert set(tiles.split) == {"train", "val", "test"}


def test_spatial_split_bad_settings():
    with pytest.raises(ValueError, match="at least tile_size=128"):
        geo.spatial_split(candidates(), 64)
    with pytest.raises(ValueError, match="summing to 1"):
        geo.spatial_split(candidates(), 256, {"train": 0.9, "val": 0.2, "test": 0.1})
    with pytest.raises(geo.GeoDataError, match="no tiles"):
        geo.spatial_split(pd.DataFrame(), 256)


def test_split_by_scene_uses_the_dataset_split():
    tiles = candidates(1, side=256, tile=128, overlap=0)
    out, rep = geo.split_by_scene(tiles, {"vi0": "train", "in0": "test"})
    assert set(zip(out.scene_id, out.split, strict=True)) == {("vi0", "train"), ("in0", "test")}
    assert (out.block_id == out.scene_id).all()
    with pytest.raises(geo.GeoDataError, match="no train/val/test split"):
        geo.split_by_scene(tiles, {"vi0": "train", "in0": None})


@pytest.fixture(scope="module")
def run01(tmp_path_factory):
    """A small prepared and tiled generated dataset: 2 countries x 1 scene of 256 px."""
    out = tmp_path_factory.mktemp("run01")
    d = landscape.Difficulty(nodata_edge_frac=0.15)
    sources = landscape.generate_sources(out / "scenes", ["vietnam", "india"], 1, 256, 0.8, seed=0, difficulty=d,
                                         log=lambda *_: None)  # fmt: skip
    scenes = geo.prepare_scenes(sources, out / "scenes", log=lambda *_: None)
    tiles, rep = geo.make_tiles(out, scenes, 64, 16, 64, seed=0)
    return out, scenes, tiles, rep


def test_make_tiles_outputs(run01):
    out, scenes, tiles, rep = run01
    assert list(tiles.columns) == geo.TILE_COLUMNS
    table = geo.read_tiles_table(out)
    assert list(table.columns) == geo.TILE_COLUMNS and len(table) == len(tiles) == rep["n_tiles"]
    assert rep["n_all_nodata"] > 0, "the nodata corner leaves whole tiles empty"
    assert rep["n_candidates"] == 2 * 5 * 5
    assert rep["n_candidates"] - rep["n_all_nodata"] - rep["n_straddling_dropped"] == rep["n_tiles"]
    assert rep["n_train"] + rep["n_val"] + rep["n_test"] == rep["n_tiles"]
    split = pd.read_csv(out / "split.csv")
    assert list(split.columns) == ["tile_id", "scene_id", "block_id", "split"]
    assert hashlib.sha256((out / "split.csv").read_bytes()).hexdigest() == rep["split_sha256"]
    assert sorted(p.name for p in (out / "tiles").iterdir()) == sorted(tiles.tile_id)
    fracs = table[["frac_others", "frac_field", "frac_tree", "frac_water"]].sum(axis=1)
    assert np.allclose(fracs, 1, atol=1e-4)
    assert set(scenes.crs) == {"EPSG:32648", "EPSG:32644"}


def test_read_tile_matches_the_scene_window(run01):
    out, _, tiles, _ = run01
    t = tiles.iloc[len(tiles) // 2]
    tile = geo.read_tile(out, t.tile_id)
    assert tile.image.shape == (64, 64, 3) and tile.image.dtype == np.uint8
    assert (
        tile.semantic.dtype == np.uint8
        and tile.boundary.dtype == np.uint8
        and tile.instance.dtype == np.int32
    )
    paths = geo.scene_paths(out, t.scene_id)
    win = rasterio.windows.Window(t.col_off, t.row_off, 64, 64)
    with rasterio.open(paths["image"]) as src:
        assert np.array_equal(src.read(window=win).transpose(1, 2, 0), tile.image)
        assert tile.transform == src.window_transform(win) and tile.crs == src.crs
    with rasterio.open(paths["instances"]) as src:
        assert np.array_equal(src.read(1, window=win), tile.instance)
    with rasterio.open(paths["semantic"]) as src:
        assert np.array_equal(src.read(1, window=win), tile.semantic)


def test_read_tiles_table_without_stage_01(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebook 01_dataset_prep first"):
        geo.read_tiles_table(tmp_path)


def test_figures(run01, tmp_path):
    import matplotlib.pyplot as plt

    from magseg_nb.viz import dataset as viz

    out, scenes, tiles, _ = run01
    fig = viz.plot_tile(geo.read_tile(out, tiles.tile_id.iloc[0]))
    assert len(fig.axes) == 4
    path = viz.save(fig, tmp_path / "figs", "tile")
    assert path.read_bytes()[:4] == b"\x89PNG"
    previews = {s: viz.scene_preview(geo.scene_paths(out, s)["image"], 64) for s in scenes.scene_id}
    assert previews["vn0"].shape == (64, 64, 3)
    assert len(viz.plot_split_map(tiles, scenes, previews).axes) >= len(scenes)
    balance = viz.class_balance(tiles)
    assert list(balance.index) == ["india", "vietnam"] and np.allclose(balance.sum(axis=1), 1)
    assert len(viz.plot_class_balance(tiles).axes) == 1
    rgb = viz.class_rgb(np.array([[0, 1], [2, 255]], np.uint8))
    assert rgb.shape == (2, 2, 3) and tuple(rgb[1, 1]) == (255, 255, 255)
    plt.close("all")


def test_bench_tiling_runs_on_a_small_scene(tmp_path, capsys):
    import runpy

    from magseg_nb.chain import repo_root

    bench = runpy.run_path(str(repo_root() / "benchmarks" / "bench_tiling.py"))
    result = bench["main"](["--size", "256", "--tile", "64", "--overlap", "0", "--keep", str(tmp_path)])
    assert result["n_tiles"] == 16 and result["ratio_raw_over_full"] > 0
    assert len(list((tmp_path / "run01" / "tiles").iterdir())) == 16
    assert "ratio raw / full" in capsys.readouterr().out


def test_invalid_polygons_are_repaired_and_lines_dropped(tmp_path):
    image = make_raster(tmp_path / "image.tif")
    bowtie = shapely.Polygon(
        [(500_000, 1_199_990), (500_010, 1_200_000), (500_010, 1_199_990), (500_000, 1_200_000)]
    )
    line = shapely.LineString([(500_000, 1_199_995), (500_020, 1_199_995)])
    gdf = gpd.GeoDataFrame({"class": ["field", "field", "road"], "field_id": [1, 2, 0]},
                           geometry=[bowtie, px_box(12, 0, 20, 20), line], crs=CRS)  # fmt: skip
    geo.write_vector(gdf, tmp_path / "messy.gpkg")
    out = geo.prepare_scene(image, tmp_path / "messy.gpkg", tmp_path / "s")
    rep = out["report"]
    assert rep["n_invalid_repaired"] == 1 and rep["n_non_polygons_dropped"] == 1 and rep["n_polygons"] == 2
    inst = rasterio.open(out["instances"]).read(1)
    assert 40 <= (inst[0:10, 0:10] == 1).sum() <= 60, "the bow-tie keeps both of its triangles (50 m2)"
    only_line = gpd.GeoDataFrame({"class": ["road"]}, geometry=[line], crs=CRS)
    geo.write_vector(only_line, tmp_path / "line.gpkg")
    with pytest.raises(geo.GeoDataError, match=r"line\.gpkg has no polygons"):
        geo.prepare_scene(image, tmp_path / "line.gpkg", tmp_path / "s2")


def test_percentile_stretch_maps_the_2_98_range_onto_1_255():
    band = np.tile(np.arange(101, dtype=np.float32), (101, 1))  # every value 0..100, once per row
    array = np.stack([band, band * 2 + 10, np.full_like(band, 7)])
    valid = np.ones(band.shape, bool)
    valid[0, :] = False
    out = geo.percentile_stretch(array, valid)
    assert out.shape == (3, 101, 101) and out.dtype == np.uint8
    assert (out[:, 0] == 0).all(), "not valid -> 0"
    assert out[0, 1, 2] == 1 and out[0, 1, 98] == 255 and out[0, 1, 0] == 1 and out[0, 1, 100] == 255
    assert out[0, 1, 50] == 128  # 1 + 254 * (50 - 2) / 96
    np.testing.assert_array_equal(out[1], out[0])  # a band's affine change does not change its stretch
    assert (out[2, 1:] == 1).all()  # a flat band: no range to stretch
    tile = np.where(valid[..., None], array.transpose(1, 2, 0), 0).astype(np.uint8)  # (H, W, 3), 0 = nodata
    np.testing.assert_array_equal(
        geo.stretched_tile(tile), geo.percentile_stretch(tile.transpose(2, 0, 1), valid).transpose(1, 2, 0)
    )
