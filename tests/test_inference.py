"""Inference: stitching answers into tile and scene masks, bad input, and the files a variant writes."""

from __future__ import annotations

import json
import re

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from magseg_nb import geo, inference, instances, layout, prompts, textgrid
from magseg_nb.labels import CLASSES, NODATA

CRS_UTM = CRS.from_epsg(32648)
RES = 0.5
TILE = 32
SPEC = inference.FormatSpec("magseg", grid=4, patch_layout=2, encoding="rle")
COLORS = np.array([[120, 120, 120], [230, 200, 60], [30, 120, 40], [40, 110, 220]], np.uint8)


def blocky_semantic(h, w, seed=0):
    """Classes constant on 4x4 px blocks, so a 4x4 grid of a 16 px patch is exact."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(len(CLASSES), size=(h // 4, w // 4), p=[0.3, 0.4, 0.2, 0.1])
    return np.kron(cells, np.ones((4, 4), int)).astype(np.uint8)


def make_run01(root, scenes):
    """A minimal notebook-01 folder: per scene image/semantic/boundary/instances, tiles/, tiles.csv.

    ``scenes``: {scene_id: (semantic (H,W), [(row_off, col_off, split), ...])}; NODATA pixels get a
    zero (nodata) image."""
    run01 = root / "01_dataset_prep"
    rows = []
    for k, (scene_id, (sem, windows)) in enumerate(scenes.items()):
        paths = geo.scene_paths(run01, scene_id)
        transform = from_origin(600000.0 + 1000 * k, 1100000.0, RES, RES)
        image = np.where((sem == NODATA)[..., None], 0, COLORS[np.minimum(sem, 3)]).transpose(2, 0, 1)
        geo.write_geotiff(paths["image"], image, CRS_UTM, transform, nodata=0)
        geo.write_geotiff(paths["semantic"], sem, CRS_UTM, transform, nodata=NODATA)
        geo.write_geotiff(paths["boundary"], np.zeros_like(sem), CRS_UTM, transform)
        geo.write_geotiff(paths["instances"], (sem == 1).astype(np.int32), CRS_UTM, transform)
        for r, c, split in windows:
            rows.append(
                {"tile_id": f"{scene_id}_{r}_{c}", "scene_id": scene_id, "country": "Vietnam", "row_off": r,
                 "col_off": c, "height": TILE, "width": TILE, "block_id": "b", "split": split,
                 "nodata_frac": float(np.mean(sem[r : r + TILE, c : c + TILE] == NODATA))}
            )  # fmt: skip
    tiles = pd.DataFrame(rows)
    geo.write_tiles(run01, tiles)
    tiles.to_csv(run01 / "tiles.csv", index=False)
    return run01, geo.read_tiles_table(run01)


def oracle(bad_patches=()):
    """A fake ``models.generate``: reads the classes back from the tile's colours and answers the
    asked patch exactly; patches listed in ``bad_patches`` ((row, col)) get prose instead."""

    def generate(model, processor, examples, max_new_tokens, batch_size=8):
        out = []
        for ex in examples:
            img = np.asarray(ex["images"][0])
            sem = np.argmin(((img[:, :, None, :].astype(int) - COLORS[None, None]) ** 2).sum(-1), axis=-1)
            text = ex["prompt"][0]["content"][-1]["text"]
            m = re.search(r"row (\d+), column (\d+)", text)
            patch = (int(m.group(1)) - 1, int(m.group(2)) - 1) if m else None
            if patch in bad_patches:
                out.append("I cannot see any fields here, sorry.")
                continue
            target = prompts.patch_target(sem, patch, SPEC.patch_layout, SPEC.grid)
            out.append(textgrid.encode(target, SPEC.encoding))
        return out

    return generate


@pytest.fixture
def scene(tmp_path):
    sem = blocky_semantic(64, 96)
    sem[32:, 64:] = NODATA  # a nodata corner: tile (32, 64) is all nodata
    windows = [(0, 0, "test"), (0, 32, "test"), (16, 16, "test"), (0, 64, "test"), (32, 0, "train"),
               (32, 64, "test")]  # fmt: skip
    run01, tiles = make_run01(tmp_path, {"s0": (sem, windows)})
    return run01, tiles, sem


# --- pure functions ------------------------------------------------------------------------------


def test_upsample_grid_inverts_downsample():
    sem = blocky_semantic(16, 16)
    grid = prompts.downsample_mask(sem, 4)
    assert np.array_equal(inference.upsample_grid(grid, (16, 16)), sem)
    odd = inference.upsample_grid(np.arange(9).reshape(3, 3), (7, 5))
    assert odd.shape == (7, 5) and odd[0, 0] == 0 and odd[-1, -1] == 8
    # cell i starts at row i*h//g, as in prompts.downsample_mask
    assert odd[:, 0].tolist() == [0, 0, 3, 3, 6, 6, 6]


def test_assemble_tile_exact_answers():
    sem = blocky_semantic(32, 32, seed=3)
    answers = [
        textgrid.encode(prompts.patch_target(sem, p, 2, 4), "rle") for p in inference.tile_patches(SPEC)
    ]
    pred = inference.assemble_tile(sem.shape, SPEC, answers)
    assert np.array_equal(pred.mask, sem) and pred.mask.dtype == np.uint8
    assert pred.n_malformed == 0 and (pred.confidence == 1).all()


def test_unparseable_answer_fills_others_with_zero_confidence():
    sem = blocky_semantic(32, 32, seed=4)
    patches = inference.tile_patches(SPEC)
    answers = [textgrid.encode(prompts.patch_target(sem, p, 2, 4), "rle") for p in patches]
    answers[1] = "Sorry, no grid."  # patch (0, 1): rows 0-15, cols 16-31
    answers[2] = answers[2] + "\nfield *2"  # a repaired (extra row) answer
    pred = inference.assemble_tile(sem.shape, SPEC, answers)
    assert pred.n_malformed == 2 and pred.n_unparsed == 1
    assert (pred.mask[:16, 16:] == 0).all() and (pred.confidence[:16, 16:] == 0).all()
    assert 0 < pred.confidence[16:, :16].max() < 1
    assert np.array_equal(pred.mask[:16, :16], sem[:16, :16])


def test_text4seg_one_answer_per_tile():
    spec = inference.FormatSpec("text4seg", grid=8, patch_layout=4, encoding="plain")
    sem = blocky_semantic(32, 32, seed=5)
    assert inference.tile_patches(spec) == [None]
    pred = inference.assemble_tile(
        sem.shape, spec, [textgrid.encode(prompts.downsample_mask(sem, 8), "plain")]
    )
    assert np.array_equal(pred.mask, sem)
    with pytest.raises(ValueError, match="2 answers for a tile of 1 patches"):
        inference.assemble_tile(sem.shape, spec, ["a", "b"])


def test_scene_votes_overlap_and_nodata():
    votes = inference.SceneVotes((4, 6))
    votes.add(0, 0, np.ones((4, 4), np.uint8), 1.0)
    votes.add(0, 2, np.full((4, 4), 2, np.uint8), 0.5)  # overlaps cols 2-3 with a weaker vote
    votes.add(0, 2, np.full((4, 4), NODATA, np.uint8), 1.0)  # nodata does not vote
    labels, conf = votes.result()
    assert labels[:, :4].tolist() == [[1] * 4] * 4 and (labels[:, 4:] == 2).all()
    assert np.allclose(conf[:, :2], 1) and np.allclose(conf[:, 2:4], 0.5) and np.allclose(conf[:, 4:], 0.5)
    empty, conf = inference.SceneVotes((2, 2)).result()
    assert (empty == NODATA).all() and (conf == 0).all()


def test_is_nodata_tile():
    assert inference.is_nodata_tile(np.zeros((4, 4, 3), np.uint8))
    assert not inference.is_nodata_tile(np.ones((4, 4, 3), np.uint8), nodata_frac=0.5)
    assert inference.is_nodata_tile(np.ones((4, 4, 3), np.uint8), nodata_frac=0.5, max_nodata_frac=0.5)


def test_limit_tiles_takes_every_scene():
    tiles = pd.DataFrame(
        {
            "tile_id": [f"{s}_{i}" for s in "abc" for i in range(4)],
            "scene_id": [s for s in "abc" for _ in range(4)],
        }
    )
    picked = inference.limit_tiles(tiles, 4)
    assert sorted(picked.tile_id) == ["a_0", "a_1", "b_0", "c_0"]
    assert len(inference.limit_tiles(tiles, 0)) == 12


def test_format_spec_from_02(tmp_path):
    with pytest.raises(FileNotFoundError, match="formats.json is missing: run notebook 02"):
        inference.format_spec(tmp_path, "magseg")
    prompts.record_format(tmp_path, "magseg", 8, "rle", 4, "mark")
    assert inference.format_spec(tmp_path, "magseg") == inference.FormatSpec("magseg", 8, 4, "rle", "mark")
    assert prompts.read_formats(tmp_path)["magseg"]["cells_per_tile_side"] == 32
    with pytest.raises(FileNotFoundError, match="has no 'text4seg' .*run notebook 02_instruction_format"):
        inference.format_spec(tmp_path, "text4seg")


def test_variants_found_and_selected(tmp_path):
    adapter = tmp_path / "03_sft" / "magseg" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/m/tiny"}))
    full = tmp_path / "03_sft" / "text4seg" / "model"
    full.mkdir(parents=True)
    (full / "config.json").write_text("{}")
    found = inference.find_variants(tmp_path)
    assert [(v.name, v.is_adapter, v.base_model) for v in found] == [
        ("magseg-sft", True, "/m/tiny"),
        ("text4seg-sft", False, ""),
    ]
    assert [v.name for v in inference.select_variants(found, "all")] == ["magseg-sft", "text4seg-sft"]
    with pytest.raises(ValueError, match=r"\['magseg-grpo'\] have no trained model.*run notebook 03/04"):
        inference.select_variants(found, ["magseg-grpo"])
    with pytest.raises(FileNotFoundError, match="run notebooks 03 and 04 first"):
        inference.select_variants([], "all")


def test_a_moved_run_finds_the_shipped_base_in_this_checkout(tmp_path):
    from magseg_nb import tiny_base

    adapter = tmp_path / "03_sft" / "magseg" / "adapter"
    adapter.mkdir(parents=True)
    elsewhere = "/gone/clone/pretrained/tiny-gemma3-proxy"  # the checkout that trained it is deleted
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": elsewhere}))
    assert inference.adapter_base(adapter) == str(tiny_base.PRETRAINED_DIR)
    assert inference.find_variants(tmp_path)[0].base_model == str(tiny_base.PRETRAINED_DIR)
    # A path that exists, a hub id, or a model this checkout does not ship is kept as recorded.
    for kept in (str(tmp_path), "google/gemma-3-4b-it", "/gone/clone/some-other-model"):
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": kept}))
        assert inference.adapter_base(adapter) == kept


# --- a scene end to end with the oracle model ------------------------------------------------------


def test_infer_scene_stitches_and_skips_nodata(scene):
    run01, tiles, sem = scene
    test = inference.select_test_tiles(tiles)
    res = inference.infer_scene(None, None, run01, test, SPEC, generate=oracle(), log=None)
    assert res.coarse.shape == sem.shape and res.crs == CRS_UTM
    status = dict(zip(res.tiles.tile_id, res.tiles.status, strict=True))
    assert status["s0_32_64"] == "skipped_nodata" and "s0_32_0" not in status  # train tile not inferred
    covered = np.zeros(sem.shape, bool)
    covered[:32, :] = True
    covered[16:48, 16:48] = True
    assert np.array_equal(res.coarse[covered], sem[covered])
    assert (res.coarse[~covered] == NODATA).all()
    assert res.tiles.n_malformed.fillna(0).sum() == 0


def test_infer_scene_malformed_answers_outvoted_in_overlaps(scene):
    run01, tiles, sem = scene
    test = inference.select_test_tiles(tiles)
    res = inference.infer_scene(None, None, run01, test, SPEC, generate=oracle(bad_patches={(1, 1)}))
    inferred = res.tiles[res.tiles.status == "inferred"]
    assert inferred.n_malformed.sum() == inferred.n_unparsed.sum() == 4  # one patch of each of 4 tiles
    # Tile (0,0)'s patch (1,1) covers rows/cols 16-31; tile (16,16) covers that area with parsed answers.
    assert np.array_equal(res.coarse[16:32, 16:32], sem[16:32, 16:32])
    # Tile (0,64)'s bad patch is covered by nothing else: filled with others, confidence 0.
    assert (res.coarse[16:32, 80:96] == 0).all() and (res.confidence[16:32, 80:96] == 0).all()
    rows = [r for r in res.answers if not r["parsed"]]
    assert len(rows) == 4 and rows[0]["repairs"] and rows[0]["answer"].startswith("I cannot")


def test_empty_scene_raises(scene):
    run01, tiles, _ = scene
    with pytest.raises(ValueError, match="no test-split tiles to infer"):
        inference.infer_scene(None, None, run01, tiles.iloc[:0], SPEC, generate=oracle())
    with pytest.raises(ValueError, match="no test-split tiles.*rerun notebook 01_dataset_prep"):
        inference.select_test_tiles(tiles.assign(split="train"))


@pytest.fixture
def written(tmp_path):
    """run_variant over two scenes: s0 (normal) and s1 (every test tile nodata)."""
    sem = blocky_semantic(64, 96)
    sem[32:, 64:] = NODATA
    s1 = np.full((32, 32), NODATA, np.uint8)
    run01, tiles = make_run01(
        tmp_path,
        {
            "s0": (
                sem,
                [(0, 0, "test"), (0, 32, "test"), (16, 16, "test"), (0, 64, "test"), (32, 64, "test")],
            ),
            "s1": (s1, [(0, 0, "test")]),
        },
    )
    out = tmp_path / "05_inference" / "magseg-sft"
    summary = inference.run_variant(
        None, None, run01, tiles, SPEC, out, predictor=None, generate=oracle(bad_patches={(0, 0)}),
        field_kw={"min_area_px": 8, "h_px": 1.0}, log=None,
    )  # fmt: skip
    return out, summary, sem, run01


def test_run_variant_files_crs_bounds_classes(written):
    out, summary, sem, run01 = written
    assert summary["tiles_inferred"] == 4 and summary["tiles_skipped_nodata"] == 2
    assert summary["answers"] == 16 and summary["malformed"] == summary["unparsed"] == 4
    for sub in ("coarse", "refined", "confidence", "instances"):
        assert sorted(p.name for p in (out / sub).glob("*.tif")) == ["s0.tif", "s1.tif"]
    with rasterio.open(out / "coarse" / "s0.tif") as src, rasterio.open(run01 / "scenes/s0/image.tif") as ref:
        coarse = src.read(1)
        assert src.crs == ref.crs == CRS_UTM and src.bounds == ref.bounds and src.transform == ref.transform
        assert src.nodata == NODATA and src.dtypes[0] == "uint8"
    assert set(np.unique(coarse)) <= {0, 1, 2, 3, NODATA}
    assert (coarse[32:, 64:] == NODATA).all()  # the nodata tile
    with rasterio.open(out / "coarse" / "s1.tif") as src:
        assert (src.read(1) == NODATA).all()
    with rasterio.open(out / "instances" / "s0.tif") as src:
        inst = src.read(1)
        assert src.dtypes[0] == "int32" and inst.max() > 0
        assert (coarse[inst > 0] == 1).all()  # instances lie in the field class
    with rasterio.open(out / "instances" / "s1.tif") as src:
        assert src.read(1).max() == 0
    table = pd.read_csv(out / "tiles.csv")
    assert {"tile_id", "scene_id", "n_answers", "n_malformed", "n_unparsed", "infer_s"} <= set(table.columns)
    assert sorted(pd.read_csv(out / "skipped_tiles.csv").tile_id) == ["s0_32_64", "s1_0_0"]
    assert sum(1 for _ in open(out / "answers.jsonl")) == 16


def test_run_variant_fields_gpkg(written):
    out, summary, sem, run01 = written
    gdf = gpd.read_file(out / "fields.gpkg", layer="fields")
    assert len(gdf) == summary["fields"] > 0
    assert {"class", "area_m2", "scene_id", "tile_id", "confidence", "instance_id"} <= set(gdf.columns)
    assert gdf.crs == CRS_UTM and gdf.geometry.is_valid.all() and (gdf["class"] == "field").all()
    assert (gdf.scene_id == "s0").all() and gdf.tile_id.str.startswith("s0_").all()
    assert (gdf.area_m2 >= 8 * RES**2).all() and gdf.confidence.between(0, 1).all()
    with rasterio.open(run01 / "scenes/s0/image.tif") as ref:
        b = ref.bounds
    minx, miny, maxx, maxy = gdf.total_bounds
    assert b.left <= minx and maxx <= b.right and b.bottom <= miny and maxy <= b.top
    parquet = gpd.read_parquet(out / "fields.parquet")
    assert len(parquet) == len(gdf) and parquet.crs == CRS_UTM


def test_polygonize_saved_reruns_without_model(written):
    out, summary, _, run01 = written
    before = gpd.read_file(out / "fields.gpkg", layer="fields")
    (out / "fields.gpkg").unlink()
    again = inference.polygonize_saved(out, run01, min_area_px=8, h_px=1.0)
    after = gpd.read_file(out / "fields.gpkg", layer="fields")
    assert again["fields"] == len(after) == len(before)
    assert np.allclose(sorted(after.area_m2), sorted(before.area_m2))
    fewer = inference.polygonize_saved(out, run01, min_area_px=10_000)
    assert fewer["fields"] == 0 and len(gpd.read_file(out / "fields.gpkg", layer="fields")) == 0
    with pytest.raises(FileNotFoundError, match="polygonize_only=False first"):
        inference.polygonize_saved(out.parent / "nothing", run01)


def test_polygonize_saved_votes_the_baseline_segments(written):
    out, _, _, run01 = written
    with pytest.raises(FileNotFoundError, match="rerun notebook 01_dataset_prep"):
        inference.polygonize_saved(out, run01, markers="segments")
    refined = {}
    for scene_id in ("s0", "s1"):
        refined[scene_id], crs, transform = instances.read_mask(out / "refined" / f"{scene_id}.tif")
        h, w = refined[scene_id].shape
        segments = (np.arange(h)[:, None] // 16 * 8 + np.arange(w)[None, :] // 16 + 1).astype(
            np.int32
        )  # 16 px squares
        geo.write_geotiff(layout.baseline_instances(run01, scene_id), segments, crs, transform, dtype="int32")
    summary = inference.polygonize_saved(out, run01, markers="segments", min_area_px=8)
    inst = instances.read_mask(out / "instances" / "s0.tif")[0]
    sem = refined["s0"]
    assert instances.read_mask(out / "instances" / "s1.tif")[0].max() == 0  # s1: nothing predicted
    squares = [sem[r : r + 16, c : c + 16] for r in range(0, 64, 16) for c in range(0, 96, 16)]
    expected = sum((sq != NODATA).any() and (sq[sq != NODATA] == 1).mean() >= 0.5 for sq in squares)
    assert inst.max() == summary["fields"] == expected >= 1
    for label in range(1, inst.max() + 1):
        square = inst == label  # one whole 16 px square, cut only where nothing was predicted
        rows, cols = np.nonzero(square)
        assert rows.min() % 16 == 0 and cols.min() % 16 == 0 and (sem[square] != NODATA).all()
        assert (sem[square] == 1).mean() >= 0.5


def test_run_variant_with_tiny_sam(scene, tmp_path):
    from magseg_nb import refine

    run01, tiles, sem = scene
    out = tmp_path / "v"
    summary = inference.run_variant(
        None, None, run01, tiles, SPEC, out, predictor=refine.load_sam("tiny", device="cpu"),
        sam_kw={"iterations": 2}, generate=oracle(), log=None,
    )  # fmt: skip
    with rasterio.open(out / "refined" / "s0.tif") as src:
        refined = src.read(1)
    assert set(np.unique(refined)) <= {0, 1, 2, 3, NODATA}
    assert (refined[32:, 64:] == NODATA).all()
    assert pd.read_csv(out / "tiles.csv").refine_s.notna().all()
    assert summary["refine_s"] >= 0


def _record_fits(monkeypatch) -> list:
    """Every ``SelfTrainedRefiner.fit`` call from now on, as (the (image, coarse) pairs, the fitted copy)."""
    from magseg_nb import refine

    fits, real_fit = [], refine.SelfTrainedRefiner.fit

    def spy(self, pairs):
        pairs = list(pairs)
        fits.append((pairs, real_fit(self, pairs)))
        return fits[-1][1]

    monkeypatch.setattr(refine.SelfTrainedRefiner, "fit", spy)
    return fits


def test_run_variant_fits_a_selftrained_refiner_once_on_every_scene(tmp_path, monkeypatch):
    """The self-trained refiner learns from the coarse masks of all test tiles of all scenes at once (one
    fit, after every scene is inferred), then refines each tile with that one classifier."""
    from magseg_nb import refine

    a, b = blocky_semantic(64, 64), blocky_semantic(32, 64, seed=5)
    run01, tiles = make_run01(
        tmp_path,
        {"s0": (a, [(0, 0, "test"), (32, 32, "test"), (0, 32, "train")]), "s1": (b, [(0, 32, "test")])},
    )
    fits = _record_fits(monkeypatch)
    out = tmp_path / "v"
    summary = inference.run_variant(
        None,
        None,
        run01,
        tiles,
        SPEC,
        out,
        predictor=refine.load_sam("selftrained"),
        generate=oracle(),
        log=None,
    )
    assert len(fits) == 1 and summary["tiles_inferred"] == 3
    pairs, fitted = fits[0]
    assert [c.shape for _, c in pairs] == [(TILE, TILE)] * 3 and fitted.model is not None
    for scene_id, sem, (r, c) in (("s0", a, (0, 0)), ("s0", a, (32, 32)), ("s1", b, (0, 32))):
        refined = instances.read_mask(out / "refined" / f"{scene_id}.tif")[0]
        coarse = instances.read_mask(out / "coarse" / f"{scene_id}.tif")[0]
        window = (slice(r, r + TILE), slice(c, c + TILE))
        assert np.array_equal(coarse[window], sem[window])  # the oracle's exact cells
        image = geo.read_tile(run01, f"{scene_id}_{r}_{c}").image
        assert np.array_equal(refined[window], fitted.refine(image, coarse[window])[0])
    assert (instances.read_mask(out / "refined" / "s0.tif")[0][:32, 32:] == NODATA).all()  # a train tile


def test_map_scenes_fit_their_own_selftrained_refiner_on_the_map_tiles(tmp_path, monkeypatch):
    """The map-only tiles (never scored) are refined by a classifier fitted on their own coarse masks, once."""
    from magseg_nb import refine

    sem = blocky_semantic(64, 96)
    windows = [(r, c, "test" if (r, c) == (0, 0) else "train") for r in (0, 32) for c in (0, 32, 64)]
    run01, tiles = make_run01(tmp_path, {"s0": (sem, windows)})
    fits = _record_fits(monkeypatch)
    test = inference.select_test_tiles(tiles)
    summary = inference.run_map_scenes(
        None, None, run01, tiles, test, ["s0"], SPEC, tmp_path / "v", predictor=refine.load_sam("selftrained"),
        generate=oracle(), log=None,
    )  # fmt: skip
    assert summary["map_tiles"] == 5 and len(fits) == 1 and len(fits[0][0]) == 5
    refined = instances.read_mask(tmp_path / "v" / "whole_scene" / "refined" / "s0.tif")[0]
    mapped = np.ones(refined.shape, bool)
    mapped[:32, :32] = False  # the test tile: no scored run was written here, so nothing to show
    assert (refined[mapped] != NODATA).all() and (refined[~mapped] == NODATA).all()
    assert set(np.unique(refined[mapped])) <= {0, 1, 2, 3}


# --- the real (tiny, random) model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from magseg_nb import models

    return models.resolve_model("tiny-gemma3", tmp_path_factory.mktemp("models"))


def test_adapter_that_does_not_match_the_model(tiny_model, tmp_path):
    from peft import get_peft_model

    from magseg_nb import models

    model, _ = models.load_model_and_processor(tiny_model, device="cpu")
    adapter = tmp_path / "03_sft" / "magseg" / "adapter"
    get_peft_model(model, models.lora_config(r=2, alpha=4)).save_pretrained(adapter)
    variant = inference.find_variants(tmp_path)[0]
    assert variant.base_model == tiny_model
    with pytest.raises(
        models.AdapterMismatchError, match=r"trained on base model .*tiny-gemma3.*google/gemma-3"
    ):
        inference.load_variant(variant, base_model="google/gemma-3-4b-it")
    model, processor = inference.load_variant(variant, device="cpu")  # its own base: loads
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"  # the float32 LoRA merged in
    assert processor.tokenizer is not None


def test_answer_budget_from_training_answers(tiny_model, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    worst = inference.answer_budget(processor, SPEC)
    row = {"completion": [{"role": "assistant", "content": [{"type": "text", "text": "field *4\n" * 4}]}]}
    (tmp_path / "magseg_train.jsonl").write_text(json.dumps(row) + "\n")
    from_data = inference.answer_budget(processor, SPEC, tmp_path)
    n = len(processor.tokenizer("field *4\n" * 4, add_special_tokens=False)["input_ids"])
    assert from_data == int(n * 1.25) + 8 < worst


def test_stage_needs_and_reuse_saved(written, tmp_path):
    out, _, _, run01 = written
    assert inference.stage_needs(tmp_path, "all") == ["01_dataset_prep", "02_instruction_format", "03_sft"]
    assert inference.stage_needs(tmp_path, ["magseg-grpo"])[-1] == "04_grpo"
    copy = tmp_path / "again" / "magseg-sft"
    inference.reuse_saved(out, copy)
    assert (copy / "refined" / "s0.tif").exists() and not (copy / "instances").exists()
    assert inference.polygonize_saved(copy, run01, min_area_px=8, h_px=1.0)["fields"] > 0
    with pytest.raises(FileNotFoundError, match="polygonize_only=False"):
        inference.reuse_saved(tmp_path / "nothing", copy)
    scores = inference.quick_scores(out, run01)
    assert list(scores.scene_id) == ["s0", "s1"] and scores.pixels.iloc[1] == 0
    assert 0 < scores.mean_dice_coarse.iloc[0] < 1  # the oracle's one bad patch per tile costs a little
    assert scores.changed_by_sam.iloc[0] == 0  # no SAM: refined == coarse
    s = inference.scene_outputs(out, run01, "s0")
    assert s["coarse"].shape == s["image"].shape[:2] == s["truth"].shape
    assert (s["coarse"] != NODATA).any(axis=1).all()  # cropped to the inferred area


def test_figures(written, tmp_path):
    from magseg_nb.viz import inference as vi

    out, _, _, run01 = written
    s = inference.scene_outputs(out, run01, "s0")
    fig = vi.plot_coarse_vs_refined(s["image"], s["coarse"], s["refined"], s["instances"], s["truth"], "t")
    assert len(fig.axes) == 5 and vi.save(fig, tmp_path, "a").stat().st_size > 0
    fig = vi.plot_malformed({"magseg-sft": pd.read_csv(out / "tiles.csv")})
    assert fig.axes[0].get_ylabel() == "answers"
    assert vi.class_rgb(np.array([[0, NODATA]], np.uint8))[0, 1].tolist() == [255, 255, 255]
    assert vi.changed_fraction(s["coarse"], s["refined"]) == 0.0


@pytest.mark.slow
def test_predict_tile_with_the_tiny_model(tiny_model):
    """The random tiny model writes nonsense: every answer is decoded and counted, none raises."""
    from magseg_nb import models

    model, processor = models.load_model_and_processor(tiny_model, device="cpu")
    image = COLORS[blocky_semantic(32, 32)]
    budget = inference.answer_budget(processor, SPEC)
    assert budget > SPEC.grid * SPEC.grid
    pred = inference.predict_tile(
        model, processor, image, "magseg", 4, 2, "rle", batch_size=4, max_new_tokens=24
    )
    assert pred.mask.shape == (32, 32) and pred.mask.dtype == np.uint8
    assert len(pred.answers) == len(pred.reports) == 4
    assert 0 <= pred.n_malformed <= 4 and set(np.unique(pred.mask)) <= {0, 1, 2, 3}


# --- the smoke chain's outputs ----------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_chain_outputs_read_back(smoke_run):
    """05 in the smoke chain: scene masks on the scene grids, known classes, valid polygons."""
    from .conftest import stage_dir

    run05 = stage_dir(smoke_run, "05_inference")
    run01 = smoke_run / "01_dataset_prep"
    state = json.loads((run05 / "state.json").read_text())
    variants = state["summary"]["variants"]
    assert "magseg-sft" in variants
    import torch

    from magseg_nb import side_by_side

    # on a CPU with a core per process the variants ran side by side, each process's summary kept
    lanes = sorted((run05 / "side_by_side").glob("lane*.summary.json"))
    cores = side_by_side.cpu_cores()
    assert len(lanes) == (0 if cores < 2 or torch.cuda.is_available() else min(cores, len(variants)))
    assert sorted(v for lane in lanes for v in json.loads(lane.read_text())) == sorted(variants)
    for name in variants:
        vdir = run05 / name
        tiles = pd.read_csv(vdir / "tiles.csv")
        assert len(tiles) and tiles.n_answers.gt(0).all()
        assert state["summary"][f"{name}_malformed"] == int(tiles.n_malformed.sum())
        for path in sorted((vdir / "coarse").glob("*.tif")):
            with rasterio.open(path) as src, rasterio.open(run01 / "scenes" / path.stem / "image.tif") as ref:
                assert src.crs == ref.crs and src.bounds == ref.bounds and src.nodata == NODATA
                coarse = src.read(1)
            assert set(np.unique(coarse)) <= {0, 1, 2, 3, NODATA} and (coarse != NODATA).any()
            with rasterio.open(vdir / "refined" / path.name) as src:
                refined = src.read(1)
                assert src.crs == ref.crs and np.array_equal(refined == NODATA, coarse == NODATA)
            with rasterio.open(vdir / "instances" / path.name) as src:
                assert src.dtypes[0] == "int32" and src.crs == ref.crs
                inst = src.read(1)
            assert (refined[inst > 0] == 1).all()
        gdf = gpd.read_file(vdir / "fields.gpkg", layer="fields")
        assert {"class", "area_m2", "scene_id", "tile_id", "confidence", "instance_id"} <= set(gdf.columns)
        assert gdf.geometry.is_valid.all() and (gdf.area_m2 > 0).all()
        assert len(gpd.read_parquet(vdir / "fields.parquet")) == len(gdf)
