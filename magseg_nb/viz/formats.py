"""Figures for notebook 02: tiles with the patch layout, example conversations, the token budget."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle

from magseg_nb.labels import CLASS_COLORS, CLASSES
from magseg_nb.prompts import DEFAULT_VARIANT, patch_bounds, row_layout, row_patch

CMAP = ListedColormap([np.array(CLASS_COLORS[c]) / 255 for c in CLASSES])


def draw_layout(ax, image, patch_layout: int, highlight=None, title: str = ""):
    """The tile with its P x P patch layout; the highlighted patch is outlined in red."""
    image = np.asarray(image)
    ax.imshow(image)
    h, w = image.shape[:2]
    for k in range(1, patch_layout):
        ax.axhline(k * h / patch_layout, color="white", lw=0.8, alpha=0.8)
        ax.axvline(k * w / patch_layout, color="white", lw=0.8, alpha=0.8)
    if highlight is not None:
        top, bottom, left, right = patch_bounds(image.shape, highlight, patch_layout)
        ax.add_patch(
            Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, ec="red", lw=2.5)
        )
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def draw_grid(ax, grid, title: str = ""):
    """A label grid in the class colours."""
    ax.imshow(np.asarray(grid), cmap=CMAP, vmin=0, vmax=len(CLASSES) - 1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def class_legend(fig):
    handles = [Patch(color=np.array(CLASS_COLORS[c]) / 255, label=c) for c in CLASSES]
    fig.legend(handles=handles, loc="lower center", ncol=len(CLASSES), frameon=False, fontsize=9)


def show_conversation(row: dict, images: list, max_answer_lines: int = 8):
    """One conversation: its images, the target grid, and the prompt and answer text."""
    n = len(images)
    fig, axes = plt.subplots(
        1, n + 2, figsize=(3.2 * (n + 2), 3.6), gridspec_kw={"width_ratios": [1] * (n + 1) + [2.2]}
    )
    draw_layout(axes[0], images[0], row_layout(row), row_patch(row), "image 1: the whole tile")
    for k in range(1, n):
        axes[k].imshow(np.asarray(images[k]))
        axes[k].set_title(f"image {k + 1}: {row.get('variant', '')}", fontsize=9)
        axes[k].axis("off")
    draw_grid(axes[n], row["gt_mask"], f"target {row['grid']}x{row['grid']}")
    prompt = row["prompt"][0]["content"][-1]["text"]
    answer = row["completion"][0]["content"][0]["text"].splitlines()
    shown = "\n".join(answer[:max_answer_lines]) + (
        f"\n... ({len(answer)} lines)" if len(answer) > max_answer_lines else ""
    )
    text = "USER:\n" + textwrap.fill(prompt, 60) + "\n\nMODEL:\n" + shown
    axes[-1].text(0, 1, text, va="top", ha="left", family="monospace", fontsize=6.5, wrap=True)
    axes[-1].axis("off")
    fig.suptitle(f"{row['format']} · {row['id']} · {row['encoding']}", fontsize=10)
    fig.tight_layout()
    return fig


def show_patch_mosaic(image, tile_mask_grids, patch_layout: int, whole_grid, title: str = ""):
    """MAgSeg's P x P patch answers stitched, beside Text4Seg's one answer at the same resolution."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    draw_layout(axes[0], image, patch_layout, None, "tile and patch layout")
    stitched = np.block([[np.asarray(g) for g in row] for row in tile_mask_grids])
    draw_grid(
        axes[1],
        stitched,
        f"MAgSeg: {patch_layout}x{patch_layout} answers -> {stitched.shape[0]}x{stitched.shape[1]}",
    )
    whole = np.asarray(whole_grid)
    draw_grid(axes[2], whole, f"Text4Seg: 1 answer -> {whole.shape[0]}x{whole.shape[1]}")
    class_legend(fig)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_token_budget(df, variant: str = DEFAULT_VARIANT, title: str = ""):
    """Answer tokens per conversation and tokens per tile against the tile's effective resolution."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"plain": "-", "rle": "--"}
    magseg = df[(df["format"] == "magseg") & (df["variant"] == variant)]
    colors = dict(
        zip(
            sorted(magseg["grid"].unique()),
            ["tab:blue", "tab:green", "tab:purple", "tab:orange"],
            strict=False,
        )
    )
    for (grid, enc), part in magseg.groupby(["grid", "encoding"], sort=True):
        part = part.sort_values("effective")
        label = f"MAgSeg {grid}x{grid} per patch ({enc})"
        for ax, column in zip(axes, ("answer_tokens_mean", "gemma3_tile_tokens"), strict=True):
            ax.plot(part["effective"], part[column], styles[enc], marker="o", color=colors[grid], label=label)
    t4s = df[df["format"] == "text4seg"]
    for enc, part in t4s.groupby("encoding"):
        part = part.sort_values("effective")
        for ax, column in zip(axes, ("answer_tokens_mean", "gemma3_tile_tokens"), strict=True):
            ax.plot(
                part["effective"],
                part[column],
                styles[enc],
                marker="s",
                color="tab:red",
                label=f"Text4Seg ({enc})",
            )
    axes[0].set_ylabel("answer tokens per conversation")
    axes[1].set_ylabel("tokens per tile (gemma-3: 256 per image)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("effective resolution of the tile (cells per side)")
        ax.set_xticks(sorted(df["effective"].unique()))
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title or f"Token budget (MAgSeg variant: {variant})", 130), fontsize=9)
    fig.tight_layout()
    return fig
