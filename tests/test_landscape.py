"""The generated landscape: deterministic, georeferenced, labelled, country-specific and hard."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio

from magseg_nb import baseline, geo, landscape
from magseg_nb.labels import CLASS_IDS
from magseg_nb.metrics import match_instances


@pytest.fixture(scope="module")
def scene():
    return landscape.generate_scene("vn0", "vietnam", 256, 0.8, seed=3)


def test_scene_shapes_dtypes_and_georeference(scene):
    assert scene.image.shape == (256, 256, 3) and scene.image.dtype == np.uint8
    assert scene.fields.shape == (256, 256) and scene.fields.dtype == np.int32
    assert scene.crs == "EPSG:32648"
    assert scene.transform.a == pytest.approx(0.8) and scene.transform.e == pytest.approx(-0.8)
    assert (scene.transform.c, scene.transform.f) == landscape.COUNTRIES["vietnam"].origin
    assert scene.image.min() >= 1, "0 is reserved for nodata"
    assert list(scene.labels.columns) == ["class", "field_id", "geometry"]
    assert set(scene.labels["class"]) <= {"field", "tree", "water", "road", "building", "others"}
    assert scene.labels.crs.to_epsg() == 32648


def test_same_seed_same_scene_other_seed_other_scene(scene):
    again = landscape.generate_scene("vn0", "vietnam", 256, 0.8, seed=3)
    other = landscape.generate_scene("vn0", "vietnam", 256, 0.8, seed=4)
    assert np.array_equal(scene.image, again.image)
    assert np.array_equal(scene.fields, again.fields)
    assert scene.labels.geometry.geom_equals(again.labels.geometry).all()
    assert not np.array_equal(scene.image, other.image)


def test_polygons_rasterize_back_to_the_generated_fields(scene):
    masks = geo.rasterize_labels(geo_labels(scene), scene.fields.shape, scene.transform)
    assert np.array_equal(masks.instances, scene.fields)
    assert np.array_equal(masks.semantic == CLASS_IDS["field"], scene.fields > 0)
    field_ids = scene.labels.loc[scene.labels["class"] == "field", "field_id"]
    assert field_ids.is_unique and field_ids.min() >= 1
    assert masks.report["n_overlap_pairs"] == 0


def geo_labels(scene):
    """Labels in the form read_labels returns (class_id column added)."""
    out = scene.labels.copy()
    out["class_id"] = out["class"].map(lambda c: CLASS_IDS.get(c, 0)).astype(np.uint8)
    return out


def test_every_class_is_present_in_a_default_scene():
    s = landscape.generate_scene("in1", "india", 512, 0.8, seed=0)
    shares = np.bincount(s.kind.ravel(), minlength=6) / s.kind.size
    assert shares[landscape.FIELD] > 0.5
    assert shares[landscape.TREE] > 0.02 and shares[landscape.ROAD] > 0.005
    assert set(s.labels["class"]) >= {"field", "tree", "road"}


def test_countries_differ_in_field_size_and_crs():
    medians = {}
    for country in ("vietnam", "cambodia", "india"):
        s = landscape.generate_scene("x0", country, 384, 0.8, seed=1)
        areas = np.bincount(s.fields.ravel())[1:]
        medians[country] = np.median(areas[areas > 0]) * 0.8**2
        assert s.crs == f"EPSG:{landscape.COUNTRIES[country].epsg}"
    assert medians["vietnam"] < medians["india"] < medians["cambodia"]


def test_vietnam_has_elongated_strip_fields():
    from skimage.measure import regionprops

    # 512 px: a 256 px scene may be mostly village or river and hold too few fields to judge.
    scene = landscape.generate_scene("vn0", "vietnam", 512, 0.8, seed=0)
    props = regionprops(scene.fields)
    elong = [p.axis_major_length / max(p.axis_minor_length, 1) for p in props if p.area > 100]
    assert np.mean(np.array(elong) > 2.5) > 0.2, "a good share of fields should be long strips"


def test_label_misalignment_shifts_labels_by_the_given_distance():
    d = landscape.Difficulty(label_misalignment_m=3.0)
    plain = landscape.generate_scene("kh0", "cambodia", 256, 0.8, seed=2)
    shifted = landscape.generate_scene("kh0", "cambodia", 256, 0.8, seed=2, difficulty=d)
    a = plain.labels.geometry.centroid
    b = shifted.labels.geometry.centroid
    dist = np.hypot(b.x.values - a.x.values, b.y.values - a.y.values)
    assert dist == pytest.approx(np.full(len(dist), 3.0), abs=1e-6)


def test_nodata_edge_is_zero_in_every_band():
    s = landscape.generate_scene(
        "in0", "india", 256, 0.8, difficulty=landscape.Difficulty(nodata_edge_frac=0.1)
    )
    nodata = (s.image == 0).all(axis=2)
    assert 0.05 < nodata.mean() < 0.12
    assert nodata[-1, -1] and not nodata[0, 0]
    assert not (s.image == 0).any(axis=2)[~nodata].any()


def test_write_scene_files(tmp_path, scene):
    paths = landscape.write_scene(scene, tmp_path / "vn0")
    with rasterio.open(paths["image"]) as src:
        assert (src.count, src.height, src.width, src.dtypes[0]) == (3, 256, 256, "uint8")
        assert src.crs.to_epsg() == 32648 and src.nodata == 0
        assert np.array_equal(src.read().transpose(1, 2, 0), scene.image)
    assert pyogrio.list_layers(paths["labels"])[0][0] == "labels"
    back = gpd.read_file(paths["labels"], layer="labels")
    assert len(back) == len(scene.labels) and back.crs.to_epsg() == 32648
    assert not list(tmp_path.rglob(".*tmp*")), "no temporary files left behind"


def test_generate_sources_gives_scene_sources(tmp_path):
    sources = landscape.generate_sources(tmp_path, ["vietnam", "india"], 2, 128, 1.0, log=lambda *_: None)
    assert [s.scene_id for s in sources] == ["vn0", "vn1", "in0", "in1"]
    assert [s.country for s in sources] == ["vietnam", "vietnam", "india", "india"]
    assert all(s.image_path.exists() and s.labels_path.exists() and s.layer == "labels" for s in sources)
    with rasterio.open(sources[0].image_path) as a, rasterio.open(sources[1].image_path) as b:
        assert a.bounds.right + 2000 == pytest.approx(b.bounds.left), "scenes of a country do not overlap"


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="unknown country 'peru'"):
        landscape.generate_scene("p0", "peru")
    with pytest.raises(ValueError, match="res_m=5"):
        landscape.generate_scene("v0", "vietnam", 64, res_m=5)
    with pytest.raises(ValueError, match="unknown country"):
        landscape.scene_plan(["vietnam", "mars"], 1)


@pytest.mark.slow
def test_the_default_landscape_is_hard_and_the_easy_one_is_not():
    """A fair watershed solves the easy setting far better than the default one (F1 at IoU 0.5)."""
    f1 = {}
    for name, d in (("easy", landscape.Difficulty.easy()), ("default", landscape.Difficulty())):
        scores = []
        for country in ("vietnam", "cambodia", "india"):
            s = landscape.generate_scene("t0", country, 512, 0.8, seed=5, difficulty=d)
            scores.append(match_instances(s.fields, baseline.watershed_baseline(s.image))["f1"])
        f1[name] = float(np.mean(scores))
    assert f1["default"] < 0.6
    assert f1["easy"] > f1["default"] + 0.15


def _shares(s):
    """Label shares as the tiles count them: others (incl. roads, buildings), field, tree, water."""
    k = s.kind
    cls = np.select([k == landscape.FIELD, k == landscape.TREE, k == landscape.WATER], [1, 2, 3], 0)
    return np.bincount(cls.ravel(), minlength=4) / cls.size


@pytest.mark.parametrize("country", ["vietnam", "cambodia", "india"])
def test_default_composition_is_a_mixed_landscape_not_all_field(country):
    """Field must not dominate (an all-field guess would look good), and every class has a real share."""
    s = landscape.generate_scene(f"{landscape.COUNTRIES[country].code}0", country, 768, 0.8, seed=0)
    others, fieldf, tree, water = _shares(s)
    assert 0.45 < fieldf < 0.7
    assert 0.1 < others < 0.3 and 0.08 < tree < 0.25 and 0.02 < water < 0.15
    # Tiles differ a lot: some are nearly all field, some are mostly village, trees or water.
    tiles = (s.kind == landscape.FIELD).reshape(6, 128, 6, 128).mean(axis=(1, 3))
    assert tiles.max() > 0.8 and tiles.min() < 0.3


def test_composition_knobs_change_the_mix():
    bare = landscape.Difficulty(villages=0.0, trees=0.0, water=0.0)
    more = landscape.Difficulty(villages=2.0)
    base = _shares(landscape.generate_scene("kh0", "cambodia", 384, 0.8, seed=1))
    none = _shares(landscape.generate_scene("kh0", "cambodia", 384, 0.8, seed=1, difficulty=bare))
    lots = _shares(landscape.generate_scene("kh0", "cambodia", 384, 0.8, seed=1, difficulty=more))
    assert none[1] > base[1] + 0.15, "without villages, trees and water the scene is mostly field"
    assert none[2] == 0 or none[2] < 0.06  # only orchards remain as trees
    assert lots[0] > base[0] + 0.05
    s = landscape.generate_scene("kh0", "cambodia", 384, 0.8, seed=1, difficulty=more)
    assert (s.kind == landscape.BUILDING).mean() > 0.01 and "building" in set(s.labels["class"])
