"""Figures of notebook 07: accuracy and cost against effective resolution; the context ablation."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from magseg_nb.validation import MODEL, PIXEL

_SCORE_PANELS = (
    ("mdice", "mean Dice (cells)"),
    ("dice_field", "Dice field"),
    ("dice_tree", "Dice tree"),
    ("dice_water", "Dice water"),
    ("dice_others", "Dice others"),
    ("boundary_px_f1", "boundary F1 (pixels)"),
)
_RUN_PANELS = (
    ("well_formed", "well-formed answers"),
    ("answer_tokens_per_tile", "answer tokens per tile"),
    ("train_seconds", "training seconds"),
    ("generate_seconds_per_tile", "generation s per tile"),
)
_COLORS = {"magseg": "tab:blue", "text4seg": "tab:orange"}


def plot_resolution(scores: pd.DataFrame, runs: pd.DataFrame, title: str = ""):
    """Per format against cells per tile side: scores with 95 % block intervals (the pixel classifier
    dashed, on the same cells), then well-formed share, answer tokens, training and generation time."""
    fig, axes = plt.subplots(2, 5, figsize=(17, 6.4))
    axes = axes.ravel()
    res = sorted(runs["resolution"].unique())
    for ax, (metric, label) in zip(axes, _SCORE_PANELS, strict=False):
        for fmt, color in _COLORS.items():
            pick = (scores["scorer"] == MODEL) & (scores["fmt"] == fmt) & (scores["metric"] == metric)
            sub = scores[pick].sort_values("resolution")
            if sub.empty:
                continue
            err = np.nan_to_num([sub["value"] - sub["lo"], sub["hi"] - sub["value"]])
            ax.errorbar(
                sub["resolution"], sub["value"], yerr=err, marker="o", capsize=3, color=color, label=fmt
            )
        pick = (scores["scorer"] == PIXEL) & (scores["fmt"] == "text4seg") & (scores["metric"] == metric)
        pix = scores[pick]
        if not pix.empty:
            pix = pix.sort_values("resolution")
            ax.plot(pix["resolution"], pix["value"], "k--", lw=1, label="pixel classifier")
        ax.set(title=label, ylim=(0, 1.02))
    for ax, (col, label) in zip(axes[len(_SCORE_PANELS) :], _RUN_PANELS, strict=False):
        for fmt, color in _COLORS.items():
            sub = runs[(runs["fmt"] == fmt) & (runs["resolution"].isin(res))].sort_values("resolution")
            sub = sub.drop_duplicates("resolution")
            if not sub.empty:
                ax.plot(sub["resolution"], sub[col].astype(float), marker="o", color=color, label=fmt)
        ax.set(title=label)
        if col == "well_formed":
            ax.set_ylim(0, 1.02)
        elif col == "answer_tokens_per_tile":
            ax.set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(res, [str(r) for r in res])
        ax.set_xlabel("cells per tile side")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_context(
    scores: pd.DataFrame, diffs: dict[str, pd.DataFrame], reference: str = "crop", title: str = ""
):
    """Left: mean Dice and boundary F1 of each variant (95 % block intervals). Right: each variant minus
    ``reference``, paired on the same tiles."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
    model = scores[scores["scorer"] == MODEL]
    variants = list(dict.fromkeys(model["variant"]))
    x = np.arange(len(variants))
    for i, (metric, label) in enumerate((("mdice", "mean Dice"), ("boundary_px_f1", "boundary F1"))):
        rows = model[model["metric"] == metric].set_index("variant").reindex(variants)
        err = np.nan_to_num([rows["value"] - rows["lo"], rows["hi"] - rows["value"]])
        ax1.bar(x + (i - 0.5) * 0.38, rows["value"].fillna(0), 0.38, yerr=err, capsize=3, label=label)
    ax1.set_xticks(x, variants)
    ax1.set(ylim=(0, 1.02), title="score per variant")
    ax1.legend(fontsize=8)
    names = list(diffs)
    for i, metric in enumerate(("mdice", "boundary_px_f1")):
        rows = [d.set_index("metric").loc[metric] for d in diffs.values()]
        vals = np.array([r["diff"] for r in rows], float)
        err = np.nan_to_num(
            [
                [v - r["lo"] for v, r in zip(vals, rows, strict=True)],
                [r["hi"] - v for v, r in zip(vals, rows, strict=True)],
            ]
        )
        ax2.errorbar(
            np.arange(len(names)) + (i - 0.5) * 0.2, vals, yerr=err, fmt="o", capsize=3, label=metric
        )
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(np.arange(len(names)), names)
    ax2.set(title=f"variant - {reference} (paired, 95 % block intervals)")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
