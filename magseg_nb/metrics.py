"""Semantic, boundary and instance metrics, and bootstrap intervals over tiles.

Instance metrics are computed from one sparse label contingency table (ground-truth id x predicted
id -> overlapping pixels), so a scene with thousands of fields costs one pass over its pixels and no
Python loop over pairs of instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy.optimize import linear_sum_assignment

# --- instance matching ------------------------------------------------------------------------------


@dataclass
class Contingency:
    """Overlaps between ground-truth and predicted instances (label 0 = background, kept as row/col 0).

    ``table[i, j]`` counts pixels with ground-truth id ``gt_ids[i]`` and predicted id ``pred_ids[j]``;
    ``gt_ids[0] == pred_ids[0] == 0`` always, so row/column 0 is the background.
    """

    table: scipy.sparse.csr_matrix
    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_area: np.ndarray  # pixels of each ground-truth id (index as gt_ids)
    pred_area: np.ndarray


def _check_pair(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} must have the same shape")
    if not (np.issubdtype(gt.dtype, np.integer) and np.issubdtype(pred.dtype, np.integer)):
        raise ValueError(f"instance masks must be integer label images, got {gt.dtype} and {pred.dtype}")
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != gt.shape:
            raise ValueError(f"valid mask {valid.shape} must have the masks' shape {gt.shape}")
        gt, pred = gt[valid], pred[valid]
    return gt.ravel(), pred.ravel()


def contingency(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray | None = None) -> Contingency:
    """The sparse overlap table of two instance label images (0 = no instance).

    ``valid`` (bool, same shape) restricts the count to pixels that were evaluated, e.g. the tiles a
    model was run on; instances are clipped to it.
    """
    g, p = _check_pair(gt, pred, valid)
    # Prepend a background pixel to each so that index 0 is always label 0, whether present or not.
    gt_ids, g_idx = np.unique(np.concatenate([[0], g]), return_inverse=True)
    pred_ids, p_idx = np.unique(np.concatenate([[0], p]), return_inverse=True)
    if gt_ids[0] != 0 or pred_ids[0] != 0:
        raise ValueError("instance labels must be >= 0 (0 = background)")
    ones = np.ones(g_idx.size - 1, dtype=np.int64)
    # COO -> CSR sums the duplicate (gt, pred) pairs: that sum is the overlap in pixels.
    table = scipy.sparse.coo_matrix(
        (ones, (g_idx[1:], p_idx[1:])), shape=(gt_ids.size, pred_ids.size)
    ).tocsr()
    gt_area = np.asarray(table.sum(axis=1)).ravel()
    pred_area = np.asarray(table.sum(axis=0)).ravel()
    return Contingency(table, gt_ids, pred_ids, gt_area, pred_area)


def _pairs(ct: Contingency) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gt index, pred index, overlap px, IoU) for every overlapping pair of real instances."""
    coo = ct.table.tocoo()
    keep = (coo.row > 0) & (coo.col > 0)
    rows, cols, inter = coo.row[keep], coo.col[keep], coo.data[keep].astype(np.int64)
    union = ct.gt_area[rows] + ct.pred_area[cols] - inter
    return rows, cols, inter, inter / union


def _one_to_one(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray, threshold: float):
    """Match pairs with IoU >= threshold, each instance at most once; returns (rows, cols, iou) matched.

    At a threshold above 0.5 an instance can have at most one partner (two disjoint predictions
    cannot both cover more than half of the union with one field), so every candidate is a match.
    At exactly 0.5 ties are possible (a field split into two exact halves): mutual best wins.
    Below 0.5 the matching that maximises the summed IoU is found with ``linear_sum_assignment``.
    """
    cand = iou >= threshold
    rows, cols, iou = rows[cand], cols[cand], iou[cand]
    if rows.size == 0:
        return rows, cols, iou
    if threshold >= 0.5:
        # Sort by IoU descending (stable on ids), keep the first pair of each gt and of each pred.
        order = np.lexsort((cols, rows, -iou))
        rows, cols, iou = rows[order], cols[order], iou[order]
        first_g = np.zeros(rows.size, bool)
        first_g[np.unique(rows, return_index=True)[1]] = True
        first_p = np.zeros(cols.size, bool)
        first_p[np.unique(cols, return_index=True)[1]] = True
        keep = first_g & first_p
        return rows[keep], cols[keep], iou[keep]
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    score = np.zeros((ur.size, uc.size))
    score[ri, ci] = iou
    r, c = linear_sum_assignment(score, maximize=True)
    ok = score[r, c] >= threshold
    return ur[r[ok]], uc[c[ok]], score[r[ok], c[ok]]


def _prf(tp: int, n_gt: int, n_pred: int) -> dict[str, float]:
    """Precision, recall, F1; 0/0 counts as perfect only when both sides are empty."""
    both_empty = n_gt == 0 and n_pred == 0
    precision = tp / n_pred if n_pred else float(both_empty)
    recall = tp / n_gt if n_gt else float(both_empty)
    f1 = 2 * tp / (n_gt + n_pred) if (n_gt + n_pred) else 1.0
    return {"precision": precision, "recall": recall, "f1": f1}


def match_instances(
    gt: np.ndarray,
    pred: np.ndarray,
    iou_threshold: float = 0.5,
    valid: np.ndarray | None = None,
) -> dict:
    """One-to-one matching of field instances at IoU >= ``iou_threshold``.

    ``gt`` and ``pred`` are integer label images (0 = no field, k > 0 = instance k). A predicted
    instance matches a ground-truth one when their IoU (pixels) reaches the threshold; each instance
    is used at most once. Returns plain numbers (ready for a table row):
    ``tp, fp, fn, n_gt, n_pred, precision, recall, f1, mean_matched_iou`` and ``panoptic_quality``
    (= F1 x mean matched IoU). Precision/recall of an empty side is 0, or 1 when both are empty.
    ``valid`` restricts scoring to some pixels (instances are clipped to it).
    """
    ct = contingency(gt, pred, valid)
    rows, cols, _, iou = _pairs(ct)
    _, _, miou = _one_to_one(rows, cols, iou, iou_threshold)
    n_gt, n_pred = int((ct.gt_area[1:] > 0).sum()), int((ct.pred_area[1:] > 0).sum())
    tp = int(miou.size)
    out = {"tp": tp, "fp": n_pred - tp, "fn": n_gt - tp, "n_gt": n_gt, "n_pred": n_pred}
    out.update(_prf(tp, n_gt, n_pred))
    out["mean_matched_iou"] = float(miou.mean()) if tp else 0.0
    out["panoptic_quality"] = out["f1"] * out["mean_matched_iou"]
    return out
