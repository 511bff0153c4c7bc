"""Rewards for GRPO (and the scores of the evaluation): mean Dice and answer format.

Both reward functions have TRL's reward-function signature ``f(prompts, completions, **columns)``:
completions are conversational (``[[{"role": "assistant", "content": str}], ...]``) or plain strings,
and the dataset's ``gt_mask`` column arrives as a keyword argument (one grid per completion).
Every completion is decoded with the shared :mod:`magseg_nb.textgrid` decoder, which never raises
and reports what it had to repair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from magseg_nb import textgrid
from magseg_nb.labels import CLASSES, NODATA

# Format reward for an answer the decoder had to repair: at most this much, scaled by the share of
# cells it recovered as written; a well-formed answer gets 1.0, so a repaired one always scores less.
REPAIRED_MAX = 0.5


def per_class_dice(gt, pred, n_classes: int = len(CLASSES), ignore: int = NODATA) -> np.ndarray:
    """Dice of each class (length ``n_classes``), cells where ``gt == ignore`` left out.

    A class absent from both masks gets Dice 1.0 (nothing to find, nothing wrongly found).
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"gt shape {gt.shape} and prediction shape {pred.shape} differ")
    keep = gt != ignore
    gt, pred = gt[keep], pred[keep]
    out = np.ones(n_classes, dtype=float)
    for c in range(n_classes):
        g, p = gt == c, pred == c
        total = int(g.sum() + p.sum())
        if total:
            out[c] = 2.0 * int((g & p).sum()) / total
    return out


def present_classes(gt, pred, n_classes: int = len(CLASSES), ignore: int = NODATA) -> np.ndarray:
    """Boolean (n_classes,): classes present in the ground truth or the prediction (ignored cells left out)."""
    gt = np.asarray(gt)
    keep = gt != ignore
    found = np.union1d(gt[keep], np.asarray(pred)[keep])
    return np.isin(np.arange(n_classes), found)


def mean_dice(gt, pred, n_classes: int = len(CLASSES), ignore: int = NODATA) -> float:
    """Dice per class averaged over the classes present in either mask.

    Classes absent from both masks are left out of the average (their Dice would be 1.0 by
    definition and would inflate the score); a mask pair with no valid cell scores 1.0.
    """
    dice = per_class_dice(gt, pred, n_classes, ignore)
    present = present_classes(gt, pred, n_classes, ignore)
    return float(dice[present].mean()) if present.any() else 1.0


def completion_text(completion) -> str:
    """The answer text of a TRL completion: conversational (list of messages) or a plain string."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion or []:
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
        parts.append(str(content))
    return "".join(parts)


def decode_completion(completion, gt) -> textgrid.Decoded:
    """Decode a completion onto the ground truth's grid shape (never raises)."""
    shape = tuple(np.asarray(gt).shape)
    return textgrid.decode(completion_text(completion), shape=shape)


def format_score(report) -> float:
    """1.0 for a well-formed answer; a repaired one gets at most REPAIRED_MAX; unparseable 0.0."""
    if report.valid:
        return 1.0
    if not report.parsed:
        return 0.0
    return REPAIRED_MAX * (1.0 - float(report.repaired_fraction))


def _check_lengths(completions: Sequence, gt_mask: Sequence | None) -> None:
    if gt_mask is None:
        raise ValueError(
            "the reward needs the dataset column 'gt_mask' (keep it in the GRPO dataset; "
            "TRL passes extra columns to reward functions as keyword arguments)"
        )
    if len(gt_mask) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(gt_mask)} gt_mask values")


def dice_reward(prompts=None, completions=(), gt_mask=None, **kwargs) -> list[float]:
    """TRL reward: mean Dice (see :func:`mean_dice`) of each decoded completion against its gt_mask."""
    _check_lengths(completions, gt_mask)
    return [mean_dice(gt, decode_completion(c, gt).mask) for c, gt in zip(completions, gt_mask, strict=True)]


def format_reward(prompts=None, completions=(), gt_mask=None, **kwargs) -> list[float]:
    """TRL reward from the decoder's repair report: 1 well-formed, <= REPAIRED_MAX repaired, 0 unparseable."""
    _check_lengths(completions, gt_mask)
    return [format_score(decode_completion(c, gt).report) for c, gt in zip(completions, gt_mask, strict=True)]


# TRL names the logged reward columns after the functions' __name__ ("rewards/dice_reward/mean").
REWARD_FUNCS = {"dice": dice_reward, "format": format_reward}
