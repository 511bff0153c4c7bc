"""Figures of notebook 05: coarse vs refined masks, field instances, malformed answers."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch
from skimage.segmentation import find_boundaries

from magseg_nb.labels import CLASS_COLORS, CLASSES, NODATA
from magseg_nb.viz import save  # noqa: F401  (re-exported: notebooks call viz.<module>.save)

NODATA_RGB = (255, 255, 255)


def class_rgb(mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 picture of a class mask in the shared class colours (NODATA white)."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:] = NODATA_RGB
    for i, name in enumerate(CLASSES):
        lut[i] = CLASS_COLORS[name]
    return lut[np.asarray(mask, np.uint8)]


def instance_rgb(instances: np.ndarray, image: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Each instance in a random colour with black outlines, over the (dimmed) image when given."""
    instances = np.asarray(instances)
    base = (np.asarray(image[..., :3], np.float32) * 0.5).astype(np.uint8) if image is not None else None
    rng = np.random.default_rng(seed)
    colors = rng.integers(60, 255, size=(int(instances.max()) + 1, 3), dtype=np.uint8)
    out = colors[instances] if base is None else np.where(instances[..., None] > 0, colors[instances], base)
    out[find_boundaries(instances, mode="inner")] = 0
    if base is None:
        out[instances == 0] = 255
    return out


def _legend(ax) -> None:
    handles = [Patch(color=np.array(CLASS_COLORS[c]) / 255, label=c) for c in CLASSES]
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)


def plot_coarse_vs_refined(
    image: np.ndarray,
    coarse: np.ndarray,
    refined: np.ndarray,
    instances: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    title: str = "",
):
    """Image | ground truth | coarse (model) | refined (SAM) | field instances, one row."""
    panels = [("image", image[..., :3])]
    if truth is not None:
        panels.append(("ground truth", class_rgb(truth)))
    panels += [("coarse (model grid)", class_rgb(coarse)), ("refined (SAM)", class_rgb(refined))]
    if instances is not None:
        panels.append(
            (f"fields ({int(np.unique(instances[instances > 0]).size)})", instance_rgb(instances, image))
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (name, pic) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(pic, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    _legend(np.atleast_1d(axes)[-2 if instances is not None else -1])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def changed_fraction(coarse: np.ndarray, refined: np.ndarray) -> float:
    """Share of valid pixels whose class SAM changed."""
    valid = (np.asarray(coarse) != NODATA) & (np.asarray(refined) != NODATA)
    return float((coarse[valid] != refined[valid]).mean()) if valid.any() else 0.0


def plot_malformed(tables: dict[str, pd.DataFrame]):
    """Per variant: well-formed, repaired and unparsed answers (bars, counts on top)."""
    rows = []
    for name, t in tables.items():
        n, bad, unparsed = int(t.n_answers.sum()), int(t.n_malformed.sum()), int(t.n_unparsed.sum())
        rows.append((name, n - bad, bad - unparsed, unparsed))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.2))
    names = [r[0] for r in rows]
    bottom = np.zeros(len(rows))
    for k, (label, color) in enumerate(
        [("well-formed", "#4c9a2a"), ("repaired", "#e0a030"), ("no grid (filled)", "#c03030")], start=1
    ):
        vals = np.array([r[k] for r in rows], float)
        ax.bar(names, vals, bottom=bottom, color=color, label=label)
        bottom += vals
    for i, total in enumerate(bottom):
        ax.text(i, total, f"{int(total)}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("answers")
    ax.set_title("model answers on the test tiles", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
