"""The strong classical baseline: a per-pixel classifier trained on the train split's tiles only.

Each pixel of a tile is described by its raw colour and by scikit-image's
``multiscale_basic_features`` of the RGB tile (per band, at a few Gaussian sigmas: smoothed intensity,
edge strength and two Hessian texture eigenvalues). A ``HistGradientBoostingClassifier`` learns the
class (``labels``: others, field, tree, water) from pixels sampled in every training tile; it predicts
every pixel of a tile, 255 where the image is nodata (all bands 0).

It is scored like the language model: the predicted tile mask goes through exactly the rule that built
the conversation targets (``prompts.patch_target``: majority vote of the pixels of each cell), so the
baseline and the model are compared on the same cells (``conversation_cells``, ``score_conversations``).

Sampling: ``samples_per_tile`` pixels per training tile, **uniform over the tile's valid pixels**
(stratified by tile, so every scene, country and block of the train split counts in proportion to its
area). Not class-balanced: balancing shifts the classifier's prior towards the rare classes (tree,
water) and the cell majority vote then paints their edges too wide; it scored lower on validation.

Tuning is on train/validation only, never on test. The defaults were chosen on the demo's validation
split (seed 0; 62 tiles, cell Dice at 16x16 cells per tile; fit on the 419 train tiles, one thread on a
loaded 2-core machine, so seconds are wall time and approximate):

| samples/tile | max_iter | learning_rate | other | others | field | tree | water | mean | fit s |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| 600 | 100 | 0.1 | | 0.919 | 0.955 | 0.947 | 0.891 | 0.928 | 52 |
| 300 | 50 | 0.1 | | 0.914 | 0.949 | 0.938 | 0.861 | 0.915 | 18 |
| 300 | 50 | 0.1 | num_sigma 3 | 0.910 | 0.947 | 0.934 | 0.855 | 0.911 | 16 |
| 300 | 50 | 0.1 | balanced sampling | 0.889 | 0.935 | 0.925 | 0.869 | 0.905 | 14 |
| 200 | 40 | 0.1 | 15 leaves | 0.891 | 0.938 | 0.917 | 0.796 | 0.885 | 9 |
| 300 | 50 | 0.2 | | 0.921 | 0.956 | 0.949 | 0.895 | 0.930 | 8 |
| **300** | **50** | **0.2** | **stretch** | 0.928 | 0.965 | 0.955 | 0.961 | **0.952** | 8 |

``stretch`` (the default since 2026-12-07): each tile's bands are stretched from their 2nd to 98th
percentile onto 1..255 before the features (``geo.stretched_tile``), which undoes most of the contrast
a haze veil takes away. Measured on the other landscapes too (validation mean cell Dice, raw -> stretch,
the same settings otherwise; notebook 01 of each check profile): check-seed1 0.841 -> 0.923 (water 0.580 ->
0.879, its hazy blocks), check-seed2 0.858 -> 0.888, check-hard 0.934 -> 0.918 (others 0.919 -> 0.900). The choice was
made on the demo's validation, as every row here; ``{"stretch": False}`` is one of the tuning candidates.

``tune_pixel_classifier`` repeats such a choice on any run (fit each candidate on train, pick the best
mean cell Dice on val); the record's ``tuned_on`` says which was done. Validation scores of tuned
settings are optimistic by the selection; test tiles are predicted (for notebook 06) but never scored
here.

Overlapping tiles in a scene mosaic: each scene pixel takes the prediction of the tile whose centre is
nearest (Chebyshev distance; ties to the first tile in ``tile_id`` order), so every pixel comes from
the tile where it sits furthest from a tile edge and the filters saw the most context.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from magseg_nb import files, geo, prompts
from magseg_nb.labels import CLASSES, NODATA

SCORE_GRID = 16  # cells per tile side when scoring whole tiles: 8 px cells on 128 px tiles, as in the demo
DEFAULTS_TUNED_ON = (
    "demo validation split (seed 0), mean cell Dice at 16x16 cells; see pixel_baseline's docstring"
)
# Candidates for tune_pixel_classifier (overrides of PixelSettings): the defaults and three neighbours.
TUNE_CANDIDATES = ({}, {"learning_rate": 0.1}, {"sampling": "balanced"}, {"stretch": False})


@dataclass
class PixelSettings:
    """The single source of the baseline's defaults (chosen on the demo's validation split, see above)."""

    samples_per_tile: int = 300  # training pixels drawn per train tile
    sampling: str = "uniform"  # "uniform" over valid pixels, or "balanced" (equal per class present)
    sigma_min: float = 1.0  # smallest Gaussian sigma of the features (px)
    sigma_max: float = 8.0  # largest sigma (px)
    num_sigma: int = 4  # sigmas between them (log-spaced)
    max_iter: int = 50  # boosting iterations (prediction time grows with them)
    learning_rate: float = 0.2
    max_leaf_nodes: int = 31
    stretch: bool = True  # each tile's bands stretched 2-98 % (geo.stretched_tile) before the features
    seed: int = 0  # pixel sampling and the classifier's random state


@dataclass
class PixelModel:
    """A fitted classifier and the feature settings it needs at prediction time."""

    classifier: object
    settings: PixelSettings


def make_settings(**overrides) -> PixelSettings:
    """``PixelSettings`` with the given values; ``None`` keeps the dataclass default (notebook parameters)."""
    return PixelSettings(**{k: v for k, v in overrides.items() if v is not None})


# --- features and prediction ------------------------------------------------------------------------


def pixel_features(image: np.ndarray, settings: PixelSettings | None = None) -> np.ndarray:
    """(H, W, F) float32 features of an RGB uint8 image: raw colour + multiscale intensity/edges/texture."""
    from skimage.feature import multiscale_basic_features

    s = settings or PixelSettings()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    if s.stretch:  # per tile: undoes much of a haze veil's contrast loss (see the docstring's table)
        image = geo.stretched_tile(image)
    rgb = image[..., :3].astype(np.float32) / 255.0
    multi = multiscale_basic_features(
        rgb, intensity=True, edges=True, texture=True, sigma_min=s.sigma_min, sigma_max=s.sigma_max,
        num_sigma=s.num_sigma, channel_axis=-1,
    )  # fmt: skip
    return np.concatenate([rgb, multi.astype(np.float32, copy=False)], axis=-1)


def predict_tile(model: PixelModel, image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 class ids of a tile; NODATA (255) where the image is nodata."""
    image = np.asarray(image)
    valid = geo.valid_pixels(image)
    out = np.full(image.shape[:2], NODATA, np.uint8)
    if valid.any():
        feats = pixel_features(image, model.settings)
        out[valid] = model.classifier.predict(feats[valid]).astype(np.uint8)
    return out


# --- training ---------------------------------------------------------------------------------------


def sample_pixels(semantic: np.ndarray, valid: np.ndarray, n: int, mode: str, rng) -> np.ndarray:
    """Flat indices of up to ``n`` labelled, valid pixels of one tile (``mode``: uniform / balanced)."""
    ok = (semantic != NODATA) & valid
    idx = np.flatnonzero(ok)
    if len(idx) <= n:
        return idx
    if mode == "uniform":
        return rng.choice(idx, n, replace=False)
    if mode != "balanced":
        raise ValueError(f"sampling={mode!r}: use 'uniform' or 'balanced'")
    labels = semantic.ravel()[idx]
    present = np.unique(labels)
    per_class = n // len(present)
    picked = [rng.choice(idx[labels == k], min(per_class, int((labels == k).sum())), replace=False)
              for k in present]  # fmt: skip
    picked = np.concatenate(picked)
    rest = np.setdiff1d(idx, picked, assume_unique=True)
    fill = rng.choice(rest, min(n - len(picked), len(rest)), replace=False)
    return np.concatenate([picked, fill])


def split_tiles(run01, split: str) -> pd.DataFrame:
    """The rows of notebook 01's tiles.csv in one split, in tile_id order."""
    tiles = geo.read_tiles_table(run01)
    return tiles[tiles["split"] == split].sort_values("tile_id", kind="stable").reset_index(drop=True)


def training_pixels(run01, settings: PixelSettings) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X float32 (N, F), y uint8 (N,), train tile ids): sampled pixels of the train split's tiles only."""
    rng = np.random.default_rng(settings.seed)
    xs, ys, used = [], [], []
    for tile_id in split_tiles(run01, "train")["tile_id"]:
        tile = geo.read_tile(run01, tile_id)
        valid = geo.valid_pixels(tile.image)
        idx = sample_pixels(tile.semantic, valid, settings.samples_per_tile, settings.sampling, rng)
        if len(idx) == 0:
            continue
        feats = pixel_features(tile.image, settings)
        xs.append(feats.reshape(-1, feats.shape[-1])[idx])
        ys.append(tile.semantic.ravel()[idx])
        used.append(tile_id)
    if not xs:
        raise ValueError(f"{run01}: no labelled pixels in train tiles; rerun notebook 01 with more scenes")
    return np.concatenate(xs), np.concatenate(ys).astype(np.uint8), used


def fit(x: np.ndarray, y: np.ndarray, settings: PixelSettings) -> PixelModel:
    """Fit the gradient-boosting classifier (fixed iterations, no early stopping: a predictable cost)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    clf = HistGradientBoostingClassifier(
        max_iter=settings.max_iter, learning_rate=settings.learning_rate,
        max_leaf_nodes=settings.max_leaf_nodes, early_stopping=False, random_state=settings.seed,
    )  # fmt: skip
    clf.fit(x, y)
    return PixelModel(clf, settings)


def train_pixel_classifier(
    run01, settings: PixelSettings | None = None, tuned_on: str = DEFAULTS_TUNED_ON
) -> tuple[PixelModel, dict]:
    """Train on notebook 01's train tiles; returns (model, record of settings, data and time)."""
    settings = settings or PixelSettings()
    t0 = time.perf_counter()
    x, y, used = training_pixels(run01, settings)
    t1 = time.perf_counter()
    model = fit(x, y, settings)
    t2 = time.perf_counter()
    record = {
        "method": "per-pixel HistGradientBoostingClassifier on colour + multiscale_basic_features",
        "settings": asdict(settings),
        "tuned_on": tuned_on,
        "train_split": "train",
        "train_tiles": used,
        "n_train_tiles": len(used),
        "n_train_pixels": int(len(y)),
        "n_features": int(x.shape[1]),
        "train_pixels_per_class": {c: int((y == k).sum()) for k, c in enumerate(CLASSES)},
        "classes_learned": [CLASSES[int(k)] for k in model.classifier.classes_],
        "features_seconds": round(t1 - t0, 2),
        "fit_seconds": round(t2 - t1, 2),
    }
    return model, record


# --- scoring on cells -------------------------------------------------------------------------------


def conversation_cells(pred_tile: np.ndarray, row: dict) -> np.ndarray:
    """The baseline's (grid, grid) label cells for one conversation row of notebook 02.

    The same rule that built the row's ``gt_mask`` (``prompts.patch_target``): the row's patch of the
    tile (MAgSeg) or the whole tile (Text4Seg, ``patch_row`` None), majority vote per cell.
    """
    return prompts.patch_target(pred_tile, prompts.row_patch(row), prompts.row_layout(row), int(row["grid"]))


def read_tile_prediction(pred_dir, tile_id: str) -> np.ndarray:
    """A tile's prediction written by ``write_predictions`` (``<pred_dir>/tiles/<tile_id>.tif``)."""
    path = Path(pred_dir) / "tiles" / f"{tile_id}.tif"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: the pixel baseline predicted no such tile (it predicts the val and "
            "test splits in notebook 01)"
        )
    with geo.open_raster(path) as src:
        return src.read(1)


def score_conversations(pred_dir, jsonl_path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(gt_mask, baseline cells) for every row of a conversation JSONL, on the row's own cells."""
    cache: dict[str, np.ndarray] = {}
    pairs = []
    for row in prompts.read_jsonl(jsonl_path):
        tile_id = row["tile_id"]
        if tile_id not in cache:
            cache[tile_id] = read_tile_prediction(pred_dir, tile_id)
        pairs.append((np.asarray(row["gt_mask"], np.uint8), conversation_cells(cache[tile_id], row)))
    return pairs


def cell_scores(pairs) -> pd.DataFrame:
    """Per-class IoU/Dice/precision/recall/support over all cells of (truth, prediction) pairs."""
    from magseg_nb import metrics

    n = len(CLASSES)
    cm = sum((metrics.confusion_matrix(g, p, n_classes=n) for g, p in pairs), np.zeros((n, n), np.int64))
    return metrics.semantic_scores(cm)


def tile_cell_pairs(run01, predictions: dict[str, np.ndarray], grid: int = SCORE_GRID) -> list:
    """(truth cells, predicted cells) of whole tiles at ``grid x grid`` cells (the same vote rule)."""
    pairs = []
    for tile_id, pred in predictions.items():
        truth = geo.read_tile(run01, tile_id).semantic
        pairs.append((prompts.patch_target(truth, None, 1, grid), prompts.patch_target(pred, None, 1, grid)))
    return pairs


def dice_summary(scores: pd.DataFrame) -> dict:
    """{dice_<class>: ..., mean_dice: ...} rounded, from ``cell_scores``; None for a class absent on both sides."""
    out = {f"dice_{c}": None if np.isnan(v) else round(float(v), 4) for c, v in scores["dice"].items()}
    return {**out, "mean_dice": round(float(scores.attrs["mdice"]), 4)}


def validation_table(run01, pred_dir, grid: int = SCORE_GRID) -> pd.DataFrame:
    """Validation cell Dice per class (and the mean) of the saved predictions and of all-field."""
    preds = {t: read_tile_prediction(pred_dir, t) for t in split_tiles(run01, "val")["tile_id"]}
    pairs = tile_cell_pairs(run01, preds, grid)
    table = {}
    for name, pp in (("pixel classifier", pairs), ("all-field", [(g, np.ones_like(g)) for g, _ in pairs])):
        scores = cell_scores(pp)
        table[name] = {**scores["dice"].to_dict(), "mean": scores.attrs["mdice"]}
    out = pd.DataFrame(table)
    out["cells"] = [*cell_scores(pairs)["support"], int(sum(g.size for g, _ in pairs))]
    out.index.name = "validation Dice"
    return out


def predict_split(run01, model: PixelModel, split: str) -> dict[str, np.ndarray]:
    """{tile_id: prediction} for every tile of one split."""
    return {
        t: predict_tile(model, geo.read_tile(run01, t).image) for t in split_tiles(run01, split)["tile_id"]
    }


def tune_pixel_classifier(
    run01, candidates=TUNE_CANDIDATES, settings: PixelSettings | None = None, grid: int = SCORE_GRID
) -> tuple[PixelSettings, pd.DataFrame]:
    """Fit each candidate (overrides of ``settings``) on train, pick the best mean cell Dice on val."""
    base = settings or PixelSettings()
    rows = []
    for overrides in candidates:
        s = replace(base, **overrides)
        model, rec = train_pixel_classifier(run01, s)
        scores = cell_scores(tile_cell_pairs(run01, predict_split(run01, model, "val"), grid))
        rows.append({**overrides, **dice_summary(scores), "fit_seconds": rec["fit_seconds"]})
    table = pd.DataFrame(rows).sort_values("mean_dice", ascending=False, kind="stable").reset_index(drop=True)
    best = replace(base, **candidates[[r["mean_dice"] for r in rows].index(table["mean_dice"].iloc[0])])
    return best, table


# --- writing ----------------------------------------------------------------------------------------


def _centre_distance(height: int, width: int) -> np.ndarray:
    """(H, W) Euclidean distance of each pixel from the tile centre, in px."""
    yy = (np.arange(height) - (height - 1) / 2)[:, None]
    xx = (np.arange(width) - (width - 1) / 2)[None, :]
    return np.hypot(yy, xx).astype(np.float32)


def paste_nearest_centre(mosaic: np.ndarray, best: np.ndarray, row_off: int, col_off: int, pred) -> None:
    """Paste a tile prediction where its centre is nearer than any tile pasted before (ties: the earlier).

    ``best`` holds each mosaic pixel's distance to the centre of the tile it came from (inf: none yet);
    the tile's NODATA pixels never replace anything.
    """
    h, w = pred.shape
    win = (slice(row_off, row_off + h), slice(col_off, col_off + w))
    dist = np.where(pred != NODATA, _centre_distance(h, w), np.inf)
    better = dist < best[win]
    mosaic[win][better] = pred[better]
    best[win][better] = dist[better]


def field_instances(semantic: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Field instances of the classifier's mask by the model pipeline's own recipe (notebook 05's
    default): the watershed baseline's segments (``segments``) that the mask calls field, within the
    predicted area. So notebook 06 pits the model's field mask against the classifier's, with the same
    splitting step after both."""
    from magseg_nb import instances

    return instances.vote_predicted(semantic, segments)


def write_predictions(
    run01, model: PixelModel, out_dir, splits=("val", "test"), record: dict | None = None,
    grid: int = SCORE_GRID,
) -> dict:  # fmt: skip
    """Predict every tile of ``splits``; write per-tile and per-scene GeoTIFFs and ``record.json``.

    Layout of ``out_dir``: ``tiles/<tile_id>.tif`` (uint8 class ids, the tile's CRS and transform, 255
    nodata), ``semantic/<scene_id>.tif`` (uint8, scene CRS and transform, 255 outside predicted tiles;
    in overlaps the tile with the nearest centre wins), ``instances/<scene_id>.tif`` (int32 fields, see
    :func:`field_instances`), ``record.json`` (the training ``record``, the
    predicted tiles, prediction time and the validation cell scores at ``grid x grid`` cells per tile).
    Returns that record.
    """
    run01, out_dir = Path(run01), Path(out_dir)
    table = geo.read_tiles_table(run01)
    table = table[table["split"].isin(splits)].sort_values("tile_id", kind="stable")
    t0 = time.perf_counter()
    val_preds = {}
    for scene_id, group in table.groupby("scene_id", sort=True):
        with geo.open_raster(geo.scene_paths(run01, scene_id)["image"]) as src:
            shape, crs, transform = (src.height, src.width), src.crs, src.transform
        mosaic = np.full(shape, NODATA, np.uint8)
        best = np.full(shape, np.inf, np.float32)
        for row in group.itertuples():
            tile = geo.read_tile(run01, row.tile_id)
            pred = predict_tile(model, tile.image)
            geo.write_geotiff(out_dir / "tiles" / f"{row.tile_id}.tif", pred, tile.crs, tile.transform,
                              nodata=NODATA)  # fmt: skip
            if row.split == "val":
                val_preds[row.tile_id] = pred
            paste_nearest_centre(mosaic, best, row.row_off, row.col_off, pred)
        geo.write_geotiff(out_dir / "semantic" / f"{scene_id}.tif", mosaic, crs, transform, nodata=NODATA)
        from magseg_nb.instances import read_segments

        instances = field_instances(mosaic, read_segments(run01, scene_id))
        geo.write_geotiff(out_dir / "instances" / f"{scene_id}.tif", instances, crs, transform)
    out = {
        **(record or {}),
        "splits_predicted": list(splits),
        "n_tiles_predicted": len(table),
        "predict_seconds": round(time.perf_counter() - t0, 2),
        "score_grid": grid,
        "score_rule": "prompts.patch_target: majority vote of valid pixels per cell, whole tile",
    }
    if val_preds:
        scores = cell_scores(tile_cell_pairs(run01, val_preds, grid))
        out["val_cells"] = dice_summary(scores)
        out["val_cell_scores"] = scores.reset_index().to_dict(orient="records")
    files.write_json(out_dir / "record.json", out)
    return out
