"""Test data builders shared by the test files (in the spirit of torchgeo's data generators).

``make_synthetic_run`` writes 01_dataset_prep and 05_inference folders in the documented layout
(two 128 px scenes, four 64 px tiles each, three model variants and the baselines);
``write_state`` writes a finished stage's state.json; ``small_scene`` is one generated landscape.
conftest.py builds each once per session (fixtures ``synthetic_run`` and ``small_scene``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio.features
from rasterio.crs import CRS
from rasterio.transform import from_origin
from shapely.geometry import shape
from skimage.measure import label

from magseg_nb import geo, landscape, prompts
from magseg_nb.labels import CLASS_IDS, CLASSES

SCENES = {"vn0": ("Vietnam", (500000.0, 1200000.0)), "kh0": ("Cambodia", (450000.0, 1300000.0))}
SIZE, TILE, RES = 128, 64, 0.5
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


def write_state(folder: Path, summary: dict, params=None, started=100.0, finished=160.0, fingerprint="x"):
    """A finished stage's state.json (the keys chain.read_state and the report read)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text(
        json.dumps(
            {
                "stage": folder.name,
                "params": {"profile": "demo", "seed": 0} if params is None else params,
                "summary": summary,
                "outputs": {},
                "versions": {"torch": "2.14.1", "transformers": "5.23.0", "trl": "1.16.0"},
                "started": started,
                "finished": finished,
                "fingerprint": fingerprint,
            }
        )
    )


@lru_cache(maxsize=1)
def small_scene():
    """One generated 256 px Vietnamese landscape at 0.8 m (seed 3); shared, so do not modify it."""
    return landscape.generate_scene("vn0", "vietnam", 256, 0.8, seed=3)


def _synthetic_scene(rng):
    """Semantic + instances: 14 px fields on a 16 px grid (2 px bunds), a pond and a tree block."""
    sem = np.zeros((SIZE, SIZE), np.uint8)
    inst = np.zeros((SIZE, SIZE), np.int32)
    k = 0
    for r in range(0, SIZE, 16):
        for c in range(0, SIZE, 16):
            k += 1
            sem[r : r + 14, c : c + 14], inst[r : r + 14, c : c + 14] = 1, k
    sem[96:128, 0:32], inst[96:128, 0:32] = 3, 0
    sem[0:16, 96:128], inst[0:16, 96:128] = 2, 0
    return sem, inst


def _degrade(sem, inst, rng, cell, n_split, n_merge):
    """A plausible prediction: blocky semantic (cell-sized majority), some fields split, some merged."""
    coarse = (
        sem.reshape(SIZE // cell, cell, SIZE // cell, cell).transpose(0, 2, 1, 3).reshape(-1, cell * cell)
    )
    coarse = np.array([np.bincount(v, minlength=4).argmax() for v in coarse], np.uint8)
    coarse = np.kron(coarse.reshape(SIZE // cell, SIZE // cell), np.ones((cell, cell), np.uint8))
    refined = sem.copy()
    ids = rng.permutation(np.unique(inst[inst > 0]))
    for g in ids[:n_merge]:  # erase the bund to the right: two fields merge
        rr, cc = np.nonzero(inst == g)
        refined[rr.min() : rr.max() + 1, cc.max() + 1 : min(cc.max() + 3, SIZE)] = 1
    pred_inst = label(refined == 1, connectivity=1).astype(np.int32)
    nxt = pred_inst.max() + 1
    for g in ids[n_merge : n_merge + n_split]:  # split a field in two halves
        rr, cc = np.nonzero((inst == g) & (pred_inst > 0))
        if rr.size:
            half = cc < cc.min() + (cc.max() - cc.min() + 1) // 2
            pred_inst[rr[half], cc[half]] = nxt
            nxt += 1
    return coarse, refined, pred_inst


def write_raster(path, arr, transform, nodata=None):
    geo.write_geotiff(path, arr, "EPSG:32648", transform, nodata=nodata)


def _polygons(inst, sem, transform, **cols):
    rows = [(int(v), shape(g)) for g, v in rasterio.features.shapes(inst, mask=inst > 0, transform=transform)]
    gdf = gpd.GeoDataFrame(
        {"field_id": [r[0] for r in rows]}, geometry=[r[1] for r in rows], crs="EPSG:32648"
    )
    gdf["class"] = [CLASSES[int(sem[inst == i].max())] for i in gdf["field_id"]]
    for k, v in cols.items():
        gdf[k] = v
    return gdf


def make_synthetic_run(run_dir: Path, variants=("magseg-sft", "magseg-grpo", "text4seg-sft")) -> Path:
    """01_dataset_prep and 05_inference folders in the documented layout, with finished state files."""
    rng = np.random.default_rng(0)
    run01, run05 = run_dir / "01_dataset_prep", run_dir / "05_inference"
    tiles, scenes = [], []
    for s_i, (sid, (country, (x0, y0))) in enumerate(SCENES.items()):
        transform = from_origin(x0, y0, RES, RES)
        sem, inst = _synthetic_scene(rng)
        inst = np.where(inst > 0, inst + 1000 * s_i, 0).astype(np.int32)
        palette = np.array([(150, 140, 120), (200, 180, 70), (30, 100, 40), (40, 80, 160)], np.uint8)
        image = (palette[sem] + rng.integers(0, 20, (SIZE, SIZE, 3))).astype(np.uint8).transpose(2, 0, 1)
        folder = run01 / "scenes" / sid
        write_raster(folder / "image.tif", image, transform)
        write_raster(folder / "semantic.tif", sem, transform, nodata=255)
        write_raster(folder / "instances.tif", inst, transform)
        _polygons(inst, sem, transform).to_file(folder / "labels.gpkg", layer="labels")
        _, _, base = _degrade(sem, inst, rng, 8, n_split=6, n_merge=6)
        write_raster(run01 / "baseline" / f"{sid}_instances.tif", base, transform)
        for r in range(0, SIZE, TILE):
            for c in range(0, SIZE, TILE):
                split = "train" if (r, c) == (0, 0) else "test"
                tiles.append(
                    {
                        "tile_id": f"{sid}_r{r // TILE}_c{c // TILE}",
                        "scene_id": sid,
                        "country": country,
                        "row_off": r,
                        "col_off": c,
                        "height": TILE,
                        "width": TILE,
                        "block_id": 0,
                        "split": split,
                    }
                )
        scenes.append(
            {
                "scene_id": sid,
                "country": country,
                "crs": "EPSG:32648",
                "res_m": RES,
                "width": SIZE,
                "height": SIZE,
                "n_fields": int(inst.max() > 0),
            }
        )
        inferred = np.zeros((SIZE, SIZE), bool)
        inferred[:, :] = True
        inferred[:TILE, :TILE] = False  # the train tile is not inferred
        for v_i, variant in enumerate(variants):
            cell = 16 if variant.startswith("text4seg") else 8
            coarse, refined, pinst = _degrade(sem, inst, rng, cell, n_split=4 - v_i, n_merge=3 - v_i)
            vdir = run05 / variant
            write_raster(
                vdir / "coarse" / f"{sid}.tif",
                np.where(inferred, coarse, 255).astype(np.uint8),
                transform,
                255,
            )
            write_raster(
                vdir / "refined" / f"{sid}.tif",
                np.where(inferred, refined, 255).astype(np.uint8),
                transform,
                255,
            )
            write_raster(
                vdir / "instances" / f"{sid}.tif", np.where(inferred, pinst, 0).astype(np.int32), transform
            )
            gdf = _polygons(
                np.where(inferred, pinst, 0).astype(np.int32),
                refined,
                transform,
                scene_id=sid,
                tile_id="",
                confidence=1.0,
            ).rename(columns={"field_id": "instance_id"})
            gdf["area_m2"] = gdf.geometry.area
            path = vdir / "fields.gpkg"
            if path.exists():
                old = gpd.read_file(path, layer="fields")
                gdf = pd.concat([old, gdf], ignore_index=True)
            gdf.to_file(path, layer="fields")
    tiles = pd.DataFrame(tiles)
    tiles.to_csv(run01 / "tiles.csv", index=False)
    pd.DataFrame(scenes).to_csv(run01 / "scenes.csv", index=False)
    for variant in variants:
        tiles[tiles["split"] == "test"][["tile_id", "scene_id"]].assign(n_answers=4, n_malformed=0).to_csv(
            run05 / variant / "tiles.csv", index=False
        )
    run02 = run_dir / "02_instruction_format"  # 06 reads 02's formats.json (MAgSeg 2x2 x 8, Text4Seg 16)
    prompts.record_format(run02, "magseg", 8, "rle", 2, "crop")
    prompts.record_format(run02, "text4seg", 16, "rle", 1, "crop")
    for folder in (run01, run02, run_dir / "03_sft", run_dir / "04_grpo", run05):
        write_state(folder, {}, params={}, fingerprint="synthetic")
    return run_dir
