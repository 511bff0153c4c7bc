"""The classical baseline of notebook 01: marker-based watershed on the image gradient (scikit-image).

It is a fair, ordinary recipe for delineating fields in very-high-resolution imagery: smooth the
image, take the colour gradient (Sobel, strongest band), seed one marker per gradient basin deeper
than h (h-minima, so noisy flat fields are not shattered), flood with watershed, and keep segments of
field size. Notebook 01 picks sigma x h_rel for each run by a grid search on the validation tiles
(``tune_on_tiles``), the same tiles the model pipeline is chosen on; never on test. On the
``Difficulty.easy()`` landscape it reaches field F1 ~0.75-0.89, so a low score on the default one
reflects the landscape, not a crippled method.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import rasterio
from skimage.segmentation import watershed

from magseg_nb import geo, landscape, layout
from magseg_nb.instances import basin_markers, image_gradient, quantise_relief
from magseg_nb.labels import NODATA
from magseg_nb.metrics import instance_counts, instance_scores_from_counts, match_instances

# sigma x h_rel searched on the validation tiles (the F1 peak is sharp in h_rel: see docs/experiments.md)
TUNE_GRID = {"sigma": (1.0, 2.0, 3.0), "h_rel": (0.02, 0.025, 0.03, 0.035, 0.04, 0.05, 0.065)}
TUNE_MARGIN_PX = 32  # context around each validation block when it is segmented on its own


@dataclass
class WatershedSettings:
    sigma: float = 2.0  # Gaussian smoothing (px) before the gradient: suppresses crop rows and noise
    h_rel: float = 0.05  # marker depth: gradient minima shallower than h_rel x (99th pct gradient) merge
    min_area_px: int = 150  # smaller segments are not fields
    compactness: float = 0.0  # 0 = classic watershed


def watershed_baseline(
    image: np.ndarray, settings: WatershedSettings | None = None, **overrides
) -> np.ndarray:
    """Field instances (H, W) int32 of an RGB uint8 image (H, W, 3); 0 = no field, nodata (all 0) excluded."""
    s = settings or WatershedSettings()
    if overrides:
        s = WatershedSettings(**{**asdict(s), **overrides})
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    valid = image[..., :3].any(axis=2)
    if not valid.any():
        return np.zeros(image.shape[:2], np.int32)
    return _flood(_relief(image, s.sigma, valid), valid, s)


def _relief(image: np.ndarray, sigma: float, valid: np.ndarray) -> np.ndarray:
    """The colour gradient quantised to uint16 levels, scaled by its 99th percentile over ``valid``."""
    grad = image_gradient(image, sigma)
    levels = quantise_relief(grad, 0.0, max(float(np.quantile(grad[valid], 0.99)), 1e-9))
    levels[~valid] = 65535
    return levels


def _flood(levels: np.ndarray, valid: np.ndarray, s: WatershedSettings) -> np.ndarray:
    # h-minima markers: one per basin deeper than h, so a noisy but flat field gets one marker.
    markers = basin_markers(levels, s.h_rel, valid, connectivity=1)
    seg = watershed(levels, markers, mask=valid, compactness=s.compactness)
    areas = np.bincount(seg.ravel())
    seg[areas[seg] < s.min_area_px] = 0
    return seg.astype(np.int32)


def score_scenes(
    images: list[np.ndarray], truths: list[np.ndarray], settings=None, scene_ids=None
) -> pd.DataFrame:
    """Field-instance scores (IoU >= 0.5) of the baseline, one row per scene."""

    rows = []
    for k, (image, truth) in enumerate(zip(images, truths, strict=True)):
        pred = watershed_baseline(image, settings)
        valid = image.any(axis=2)
        row = match_instances(truth, pred, iou_threshold=0.5, valid=valid)
        rows.append({"scene_id": scene_ids[k] if scene_ids else k, **row})
    return pd.DataFrame(rows)


def tune_on_tiles(
    run01, tiles: pd.DataFrame, grid: dict | None = None, margin_px: int = TUNE_MARGIN_PX
) -> tuple[WatershedSettings, pd.DataFrame]:
    """Grid search (``TUNE_GRID``) for the settings with the best field-instance F1 on ``tiles`` (rows of
    tiles.csv: pass the validation tiles, never test), scored per tile as notebook 06 scores test.

    The relief is quantised over the whole scene, as ``run_baseline`` does; markers and flooding run on
    each block of tiles (``block_id``) plus ``margin_px`` of context, which costs a fraction of whole
    scenes. Returns (best settings, table of every setting: tp, n_gt, n_pred, precision, recall, f1).
    """
    if tiles.empty:
        raise ValueError("tune_on_tiles got no tiles: pass the validation-split rows of tiles.csv")
    grid = grid or TUNE_GRID
    settings = [
        WatershedSettings(**dict(zip(grid, values, strict=True)))
        for values in itertools.product(*grid.values())
    ]
    counts = [[] for _ in settings]
    for scene_id, scene_tiles in tiles.groupby("scene_id", sort=True):
        paths = geo.scene_paths(run01, scene_id)
        with geo.open_raster(paths["image"]) as src:
            image = src.read().transpose(1, 2, 0)
        with rasterio.open(paths["semantic"]) as src:
            scored = src.read(1) != NODATA
        with rasterio.open(paths["instances"]) as src:
            truth = src.read(1)
        valid = image[..., :3].any(axis=2)
        reliefs = {sigma: _relief(image, sigma, valid) for sigma in {s.sigma for s in settings}}
        for _, block in scene_tiles.groupby("block_id", sort=True):
            r0, c0 = (
                max(int(block.row_off.min()) - margin_px, 0),
                max(int(block.col_off.min()) - margin_px, 0),
            )
            r1 = min(int((block.row_off + block.height).max()) + margin_px, image.shape[0])
            c1 = min(int((block.col_off + block.width).max()) + margin_px, image.shape[1])
            crop = np.s_[r0:r1, c0:c1]
            for k, s in enumerate(settings):
                pred = _flood(reliefs[s.sigma][crop], valid[crop], s)
                pred[~scored[crop]] = 0  # as run_baseline: nothing outside the labelled area
                for t in block.itertuples():
                    win = np.s_[
                        t.row_off - r0 : t.row_off - r0 + t.height, t.col_off - c0 : t.col_off - c0 + t.width
                    ]
                    gt_win = truth[crop][win]
                    counts[k].append(instance_counts(gt_win, pred[win], 0.5, valid=scored[crop][win]))
    rows = []
    for s, cs in zip(settings, counts, strict=True):
        total = pd.DataFrame(cs).sum()
        sc = instance_scores_from_counts(total)
        rows.append({**asdict(s), "tp": int(total.tp), "n_gt": int(total.n_gt), "n_pred": int(total.n_pred),
                     "precision": float(sc["inst_precision"]), "recall": float(sc["inst_recall"]),
                     "f1": float(sc["inst_f1"])})  # fmt: skip
    order = np.argsort([-r["f1"] for r in rows], kind="stable")  # ties: the earlier setting of the grid
    table = pd.DataFrame(rows).iloc[order].reset_index(drop=True)
    best = settings[int(order[0])]
    return best, table


def load_scenes(run01, scene_ids: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images (H, W, 3) and true instance masks of prepared scenes, e.g. to tune the baseline."""

    images, truths = [], []
    for scene_id in scene_ids:
        paths = geo.scene_paths(run01, scene_id)
        with geo.open_raster(paths["image"]) as src:
            images.append(src.read().transpose(1, 2, 0))
        with rasterio.open(paths["instances"]) as src:
            truths.append(src.read(1))
    return images, truths


def run_baseline(run01, scene_ids: list[str], settings: WatershedSettings | None = None) -> pd.DataFrame:
    """Run the baseline on each prepared scene of notebook 01, save ``baseline/<scene_id>_instances.tif``
    (int32, scene CRS) and return the per-scene field-instance scores (IoU >= 0.5)."""

    settings = settings or WatershedSettings()
    rows = []
    for scene_id in scene_ids:
        paths = geo.scene_paths(run01, scene_id)
        with geo.open_raster(paths["image"]) as src:
            image = src.read().transpose(1, 2, 0)
            crs, transform = src.crs, src.transform
        with rasterio.open(paths["instances"]) as src:
            truth = src.read(1)
        with rasterio.open(paths["semantic"]) as src:
            valid = src.read(1) != 255
        pred = watershed_baseline(image, settings)
        pred[~valid] = 0
        geo.write_geotiff(layout.baseline_instances(run01, scene_id), pred, crs, transform)
        rows.append({"scene_id": scene_id, **match_instances(truth, pred, iou_threshold=0.5, valid=valid)})
    return pd.DataFrame(rows)


def compare_difficulty(
    country: str, difficulty, size: int = 384, res_m: float = 0.8, seed: int = 0, settings=None
) -> tuple[pd.DataFrame, dict]:
    """The baseline on one scene generated twice: ``Difficulty.easy()`` vs ``difficulty``.

    Shows that the watershed is a working method (it does well on crisp, distinct fields) and that the
    difficulty knobs are what make the default landscape hard. Returns (scores table, scenes by name).
    """

    scenes = {
        "easy": landscape.generate_scene("cmp", country, size, res_m, seed, landscape.Difficulty.easy()),
        "this run": landscape.generate_scene("cmp", country, size, res_m, seed, difficulty),
    }
    rows, preds = [], {}
    for name, scene in scenes.items():
        preds[name] = watershed_baseline(scene.image, settings)
        valid = scene.image.any(axis=2)  # fields under a nodata edge are not scored
        rows.append({"landscape": name, **match_instances(scene.fields, preds[name], 0.5, valid=valid)})
    return pd.DataFrame(rows), {k: (s.image, s.fields, preds[k]) for k, s in scenes.items()}
