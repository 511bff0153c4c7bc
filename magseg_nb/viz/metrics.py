"""Figures for notebook 06: per-class bars with intervals, the worst tiles, recall by field size."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import rasterio
from rasterio.windows import Window

from magseg_nb import layout
from magseg_nb.evaluation import read_raster
from magseg_nb.labels import CLASS_COLORS, CLASSES, NODATA
from magseg_nb.metrics import worst_tiles
from magseg_nb.viz import save  # noqa: F401  (re-exported: notebooks call viz.<module>.save)


def _yerr(df):
    return np.vstack([(df["value"] - df["lo"]).clip(lower=0), (df["hi"] - df["value"]).clip(lower=0)])


def _grouped_bars(table, metrics, labels, methods, ax, figsize, rotation=0):
    """One group of bars per metric, one bar per method, with the bootstrap intervals."""
    methods = list(methods or dict.fromkeys(table["method"]))
    ax = ax or plt.subplots(figsize=figsize)[1]
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(metrics))
    for k, method in enumerate(methods):
        sub = table[table["method"] == method].set_index("metric").reindex(list(metrics))
        offset = (k - (len(methods) - 1) / 2) * width
        ax.bar(x + offset, sub["value"], width, yerr=_yerr(sub), capsize=3, label=method)
    ax.set_xticks(x, labels, rotation=rotation)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return ax


def per_class_bars(table, metric: str = "iou", methods=None, ax=None):
    """Grouped bars: ``metric`` per class for each method, with bootstrap intervals as error bars.

    ``table`` has columns method, metric, value, lo, hi (rows such as metric == "iou_field").
    """
    metrics = [f"{metric}_{c}" for c in CLASSES]
    ax = _grouped_bars(table, metrics, CLASSES, methods, ax, figsize=(9, 3.8))
    ax.set_ylabel(f"{metric} (95% bootstrap CI over tiles)")
    return ax.figure


def headline_bars(table, metrics, methods=None, ax=None):
    """Bars of a few headline metrics (columns) for every method, with their intervals."""
    return _grouped_bars(table, metrics, metrics, methods, ax, figsize=(10, 3.8), rotation=20).figure


def _colour(mask):
    lut = np.zeros((256, 3), np.uint8)
    for i, name in enumerate(CLASSES):
        lut[i] = CLASS_COLORS[name]
    lut[NODATA] = (255, 255, 255)
    return lut[np.asarray(mask, np.uint8)]


def error_gallery(run01, tiles, scores, method: dict, by: str = "error_share", n: int = 4):
    """Image, ground truth and prediction of the ``n`` tiles with the largest ``by`` error.

    ``tiles`` is the tile table and ``scores`` :func:`metrics.per_tile_scores` (indexed by tile_id);
    ``method`` is an entry of :func:`evaluation.discover_methods` (its semantic rasters are shown). The
    ranking is :func:`metrics.worst_tiles`: by an error defined on every tile, never by an undefined IoU.
    """

    order, _ = worst_tiles(scores, n=n, by=by)
    tiles = tiles.set_index(tiles["tile_id"].astype(str))
    fig, axes = plt.subplots(len(order), 3, figsize=(7.5, 2.5 * max(1, len(order))), squeeze=False)
    for row, idx in zip(axes, order, strict=False):
        t = tiles.loc[idx]
        scene = Path(run01) / "scenes" / str(t["scene_id"])
        win = Window(t["col_off"], t["row_off"], t["width"], t["height"])
        with rasterio.open(scene / "image.tif") as src:
            image = np.moveaxis(src.read([1, 2, 3], window=win), 0, -1)
        sl = np.s_[t["row_off"] : t["row_off"] + t["height"], t["col_off"] : t["col_off"] + t["width"]]
        gt = read_raster(scene / layout.SCENE_FILES["semantic"])[0][sl]
        pred = read_raster(method["semantic"][t["scene_id"]])[0][sl] if method.get("semantic") else None
        panels = [(image, str(idx)), (_colour(gt), "ground truth")]
        panels.append(
            (_colour(pred), f"{method['name']}: {by} {scores.loc[idx, by]:.2f}")
            if pred is not None
            else (np.zeros_like(image), "no semantic output")
        )
        for ax, (img, title) in zip(row, panels, strict=True):
            ax.imshow(img)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig


def recall_vs_size(curves: dict, ax=None):
    """Field recall per size bin (x: field area, log scale) for each method, with intervals."""
    ax = ax or plt.subplots(figsize=(6, 3.8))[1]
    for name, df in curves.items():
        if df.empty:
            continue
        mid = np.sqrt(df["area_lo"].clip(lower=1e-3) * df["area_hi"])
        ax.errorbar(
            mid,
            df["recall"],
            yerr=_yerr(df.rename(columns={"recall": "value"})),
            marker="o",
            capsize=3,
            label=name,
        )
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("ground-truth field area (m², per tile)")
    ax.set_ylabel("recall at IoU ≥ 0.5")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax.figure
