"""Figures of training logs (log.csv from magseg_nb.training) and validation scores."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from magseg_nb.labels import CLASS_COLORS, CLASSES
from magseg_nb.viz import save  # noqa: F401  (re-exported: notebooks call viz.<module>.save)


def _read(log) -> pd.DataFrame:
    return pd.read_csv(log) if isinstance(log, str | Path) else log


def _plot(ax, df: pd.DataFrame, col: str, label: str, std: str | None = None) -> bool:
    if col not in df or df[col].isna().all():
        return False
    d = df.dropna(subset=[col])
    ax.plot(d["step"], d[col], marker=".", label=label)
    if std and std in d:
        ax.fill_between(d["step"], d[col] - d[std], d[col] + d[std], alpha=0.2)
    return True


def plot_sft_logs(logs: dict[str, pd.DataFrame | str | Path]):
    """Loss and token accuracy per step, one line per run (e.g. per format)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, log in logs.items():
        df = _read(log)
        _plot(ax_loss, df, "loss", name)
        _plot(ax_acc, df, "mean_token_accuracy", name)
    ax_loss.set(xlabel="step", ylabel="training loss (answer tokens)", yscale="log", title="SFT loss")
    ax_acc.set(xlabel="step", ylabel="token accuracy", ylim=(0, 1.02), title="SFT token accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return fig


def plot_grpo_logs(logs: dict[str, pd.DataFrame | str | Path]):
    """Reward mean +- std, Dice reward, format validity and completion length per step."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    panels = [
        ("reward", "reward_std", "total reward (mean +- std)"),
        ("rewards/dice_reward/mean", "rewards/dice_reward/std", "Dice reward"),
        ("rewards/format_reward/mean", None, "format reward (1 = well-formed)"),
        ("completions/mean_length", None, "completion length (tokens)"),
    ]
    for ax, (col, std, title) in zip(axes.ravel(), panels, strict=True):
        for name, log in logs.items():
            _plot(ax, _read(log), col, name, std)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return fig


def plot_dice_bars(table: pd.DataFrame, title: str = "validation Dice per class"):
    """Grouped bars with interval whiskers: Dice of each class for every (run, scorer) of a long table
    (columns run or format, scorer, metric, value, lo, hi; from ``validation.score_frames``)."""
    run_col = "run" if "run" in table else "format"
    groups = list(dict.fromkeys(zip(table[run_col], table["scorer"], strict=True)))
    x = np.arange(len(groups))
    width = 0.8 / len(CLASSES)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(groups)), 3.8))
    idx = table.set_index([run_col, "scorer", "metric"])
    for i, name in enumerate(CLASSES):
        rows = [idx.loc[(r, s, f"dice_{name}")] for r, s in groups]
        vals = np.array([row["value"] for row in rows], float)
        err = np.array([[v - row["lo"], row["hi"] - v] for v, row in zip(vals, rows, strict=True)]).T
        ax.bar(
            x + (i - 1.5) * width,
            np.nan_to_num(vals),
            width,
            yerr=np.nan_to_num(err),
            capsize=2,
            label=name,
            color=np.array(CLASS_COLORS[name]) / 255,
        )
    means = [idx.loc[(r, s, "mdice"), "value"] for r, s in groups]
    ax.plot(x, means, "k_", markersize=22, mew=2, label="mean Dice")
    ax.set_xticks(x, [f"{r}\n{s}" for r, s in groups], fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="Dice", title=title)
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
