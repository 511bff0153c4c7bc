"""Figures of notebook 01: a tile with its masks, the split map, class balance, the baseline."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle

from magseg_nb import geo, layout
from magseg_nb.labels import CLASS_COLORS, CLASSES
from magseg_nb.viz import save  # noqa: F401  (re-exported: notebooks call viz.<module>.save)

SPLIT_COLORS = {"train": "#4c72b0", "val": "#dd8452", "test": "#c44e52"}


def class_rgb(semantic: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 in the shared class colours; nodata white."""
    lut = np.full((256, 3), 255, np.uint8)
    for cid, name in enumerate(CLASSES):
        lut[cid] = CLASS_COLORS[name]
    return lut[semantic]


def instance_cmap(n: int, seed: int = 0) -> ListedColormap:
    """Random colours for instance ids, black for 0."""
    colors = np.random.default_rng(seed).uniform(0.2, 1.0, (max(n, 1) + 1, 3))
    colors[0] = 0
    return ListedColormap(colors)


def _legend(ax):
    handles = [Patch(color=np.array(CLASS_COLORS[c]) / 255, label=c) for c in CLASSES]
    ax.legend(
        handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.28), ncol=4, fontsize=7, frameon=False
    )


def _instances_to_show(inst: np.ndarray) -> np.ndarray:
    """Relabel instance ids to 0..n so neighbouring fields get distinct random colours."""
    return np.unique(inst, return_inverse=True)[1].reshape(inst.shape) + (0 if (inst == 0).any() else 1)


def plot_tile(tile, title: str | None = None) -> plt.Figure:
    """Image, semantic mask, boundary mask and instances of one ``geo.Tile``."""
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.8))
    inst = _instances_to_show(tile.instance)
    panels = [
        (tile.image, "image", None),
        (class_rgb(tile.semantic), "semantic", None),
        (tile.boundary, "boundary (field edges)", "gray"),
        (
            inst,
            f"instances ({len(np.unique(tile.instance[tile.instance > 0]))} fields)",
            instance_cmap(inst.max()),
        ),
    ]
    for ax, (img, name, cmap) in zip(axes, panels, strict=True):
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    _legend(axes[1])
    fig.suptitle(title or tile.tile_id, fontsize=10)
    fig.tight_layout()
    return fig


def plot_split_map(tiles: pd.DataFrame, scenes: pd.DataFrame, images: dict | None = None) -> plt.Figure:
    """Every scene with its kept tiles coloured by split (overlapping tiles overlap on the map)."""
    scenes = scenes.reset_index(drop=True)
    n = len(scenes)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    for ax, scene in zip(axes.ravel(), scenes.itertuples(), strict=False):
        if images and scene.scene_id in images:
            ax.imshow(images[scene.scene_id], alpha=0.6, extent=(0, scene.width, scene.height, 0))
        else:
            ax.imshow(np.full((scene.height, scene.width), 0.95), cmap="gray", vmin=0, vmax=1)
        for t in tiles[tiles.scene_id == scene.scene_id].itertuples():
            ax.add_patch(Rectangle((t.col_off, t.row_off), t.width, t.height, facecolor=SPLIT_COLORS[t.split],
                                   alpha=0.35, edgecolor=SPLIT_COLORS[t.split], lw=0.6))  # fmt: skip
        ax.set_title(f"{scene.scene_id} ({scene.country})", fontsize=9)
        ax.set_xlim(0, scene.width)
        ax.set_ylim(scene.height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=c, alpha=0.5, label=s) for s, c in SPLIT_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(
        "spatial split by block (white gaps: tiles dropped because they straddle two splits)", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return fig


def class_balance(tiles: pd.DataFrame, by: str = "country") -> pd.DataFrame:
    """Pixel share of each class per group (weighted by each tile's valid pixels)."""
    t = tiles.copy()
    valid = t.height * t.width * (1 - t.nodata_frac)
    for c in CLASSES:
        t[c] = t[f"frac_{c}"] * valid
    sums = t.groupby(by)[list(CLASSES)].sum()
    return sums.div(sums.sum(axis=1), axis=0)


def plot_class_balance(tiles: pd.DataFrame) -> plt.Figure:
    """Stacked bars: class shares per country and split."""
    t = tiles.assign(group=tiles.country + " / " + tiles.split)
    table = class_balance(t, by="group")
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(table) + 1.5))
    left = np.zeros(len(table))
    for c in CLASSES:
        ax.barh(table.index, table[c], left=left, color=np.array(CLASS_COLORS[c]) / 255, label=c)
        left += table[c].to_numpy()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of valid pixels")
    ax.invert_yaxis()
    ax.legend(ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def _show_panel(ax, img: np.ndarray, title: str) -> None:
    """An RGB image as it is, an instance raster (2-D) in distinct colours."""
    if img.ndim == 2:
        img = _instances_to_show(img)
        ax.imshow(img, cmap=instance_cmap(img.max()), interpolation="nearest")
    else:
        ax.imshow(img)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def plot_baseline(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, title: str = "") -> plt.Figure:
    """The image, the true field instances and the watershed baseline's instances (a crop)."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.9))
    for ax, (img, name) in zip(
        axes, [(image, "image"), (truth, "true fields"), (pred, "watershed")], strict=True
    ):
        _show_panel(ax, img, name)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def scene_preview(image_path, max_side: int = 256) -> np.ndarray:
    """A decimated (H', W', 3) read of a scene image for maps (rasterio reads an overview-sized array)."""
    import rasterio

    with rasterio.open(image_path) as src:
        scale = max(src.height, src.width) / max_side
        shape = (3, max(1, int(src.height / scale)), max(1, int(src.width / scale)))
        img = src.read([1, 2, 3], out_shape=shape).transpose(1, 2, 0)
    return img


def plot_baseline_scene(run01, scene_id: str, crop: int = 384) -> plt.Figure:
    """The top-left ``crop`` px of a scene: image, true fields, the watershed baseline's fields."""
    import rasterio

    paths = geo.scene_paths(run01, scene_id)
    win = rasterio.windows.Window(0, 0, crop, crop)
    with rasterio.open(paths["image"]) as src:
        image = src.read(window=win).transpose(1, 2, 0)
    with rasterio.open(paths["instances"]) as src:
        truth = src.read(1, window=win)
    with rasterio.open(layout.baseline_instances(run01, scene_id)) as src:
        pred = src.read(1, window=win)
    return plot_baseline(
        image, truth, pred, f"{scene_id}: true fields vs watershed baseline ({crop} px crop)"
    )


def plot_difficulty(examples: dict, scores: pd.DataFrame) -> plt.Figure:
    """Rows of (image, true fields, watershed) for each landscape of ``baseline.compare_difficulty``."""
    fig, axes = plt.subplots(len(examples), 3, figsize=(10, 3.4 * len(examples)), squeeze=False)
    for row, (name, (image, truth, pred)) in zip(axes, examples.items(), strict=True):
        f1 = float(scores.loc[scores.landscape == name, "f1"].iloc[0])
        for ax, (img, title) in zip(row, [(image, f"{name}: image"), (truth, "true fields"),
                                          (pred, f"watershed (field F1 {f1:.2f})")], strict=True):  # fmt: skip
            _show_panel(ax, img, title)
    fig.tight_layout()
    return fig
