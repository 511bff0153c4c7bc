"""Semantic, boundary and instance metrics, and bootstrap intervals over tiles.

Instance metrics are computed from one sparse label contingency table (ground-truth id x predicted
id -> overlapping pixels), so a scene with thousands of fields costs one pass over its pixels and no
Python loop over pairs of instances.

Instance protocols (ids are field instances, 0 = no field):

* one-to-one: a prediction matches a ground-truth field when their IoU >= 0.5; each is used once.
* ALU-style merge ("several predictions overlapping one field are merged before matching"), made
  exact here: each prediction is assigned to the field it overlaps most, if at least half of the
  prediction's own pixels lie in that field (``min_inside=0.5``); all predictions assigned to one
  field become one object; then one-to-one matching at IoU >= 0.5. Predictions not assigned stay
  as they are (and count as false positives unless they match on their own).
* over-segmentation rate: share of fields that received two or more predictions under that rule;
  under-segmentation rate: share of fields of which one prediction covers >= half while also
  covering >= half of another field; plus Persello et al. (2019) per-field OS/US errors.
* intervals: percentile bootstrap over tiles, resampling tiles and recomputing pooled scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse
from scipy.ndimage import distance_transform_edt
from scipy.optimize import linear_sum_assignment
from skimage.segmentation import find_boundaries

from magseg_nb.labels import CLASSES, NODATA

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


def _dense_labels(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted ids with 0 first, index of each pixel into them, pixels per id): ids relabelled 0..n-1.

    A lookup table (linear time) when the largest id is moderate, np.unique (a sort) otherwise.
    """
    top = int(x.max()) if x.size else 0
    if top < max(1 << 22, 4 * x.size):
        try:
            counts = np.bincount(x, minlength=1)
        except ValueError as err:  # bincount refuses negative values
            raise ValueError("instance labels must be >= 0 (0 = background)") from err
        present = counts > 0
        present[0] = True
        ids = np.flatnonzero(present)
        return ids, (np.cumsum(present) - 1)[x], counts[ids]
    if x.min() < 0:
        raise ValueError("instance labels must be >= 0 (0 = background)")
    ids, inv = np.unique(np.concatenate([[0], x]), return_inverse=True)
    inv = inv[1:]
    return ids, inv, np.bincount(inv, minlength=ids.size)


def contingency(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray | None = None) -> Contingency:
    """The sparse overlap table of two instance label images (0 = no instance).

    ``valid`` (bool, same shape) restricts the count to pixels that were evaluated, e.g. the tiles a
    model was run on; instances are clipped to it. The background/background cell is left empty
    (it is never used); the areas are exact.
    """
    g, p = _check_pair(gt, pred, valid)
    gt_ids, g_idx, gt_area = _dense_labels(g)
    pred_ids, p_idx, pred_area = _dense_labels(p)
    fg = (g_idx > 0) | (p_idx > 0)  # background on both sides says nothing about instances
    # COO -> CSR sums the duplicate (gt, pred) pairs: that sum is the overlap in pixels.
    shape = (gt_ids.size, pred_ids.size)
    table = scipy.sparse.coo_matrix((np.ones(int(fg.sum()), np.int64), (g_idx[fg], p_idx[fg])), shape=shape)
    return Contingency(table.tocsr(), gt_ids, pred_ids, gt_area, pred_area)


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


def merge_groups(ct: Contingency, min_inside: float = 0.5) -> np.ndarray:
    """ALU-style grouping of predictions: for each pred column, the gt row it is merged into (0 = none).

    Rule: a prediction is assigned to the ground-truth field it overlaps most, provided at least
    ``min_inside`` of the prediction's own pixels lie inside that field. Every prediction assigned
    to the same field is then merged into one object; unassigned predictions stay alone.
    """
    coo = ct.table.tocoo()
    real = (coo.row > 0) & (coo.col > 0)
    best_row = np.zeros(ct.pred_ids.size, np.int64)
    best_px = np.zeros(ct.pred_ids.size, np.int64)
    # Largest overlap per column (ties: the lower gt id): sort by (col, overlap, -row), keep each
    # column's last entry.
    order = np.lexsort((-coo.row[real], coo.data[real], coo.col[real]))
    cols, rows, data = coo.col[real][order], coo.row[real][order], coo.data[real][order]
    last = np.r_[cols[1:] != cols[:-1], True] if cols.size else np.zeros(0, bool)
    best_row[cols[last]], best_px[cols[last]] = rows[last], data[last]
    inside = best_px >= min_inside * np.maximum(ct.pred_area, 1)
    return np.where(inside, best_row, 0)


def _merged_contingency(ct: Contingency, groups: np.ndarray) -> Contingency:
    """The table after merging the predictions of each group (a sparse column-summing product)."""
    n_pred = ct.pred_ids.size
    # Column 0 stays the background; then one column per field that received predictions (merged),
    # then one per unassigned prediction (kept alone).
    assigned = groups > 0
    assigned[0] = False
    new_col = np.zeros(n_pred, np.int64)
    fields, inv = np.unique(groups[assigned], return_inverse=True)
    new_col[assigned] = 1 + inv
    alone = np.flatnonzero(~assigned)[1:]
    new_col[alone] = 1 + fields.size + np.arange(alone.size)
    assign = scipy.sparse.csr_matrix(
        (np.ones(n_pred, np.int64), (np.arange(n_pred), new_col)),
        shape=(n_pred, 1 + fields.size + alone.size),
    )
    table = (ct.table @ assign).tocsr()
    pred_area = assign.T @ ct.pred_area
    return Contingency(table, ct.gt_ids, np.arange(table.shape[1]), ct.gt_area, pred_area)


def _best_overlap(ct: Contingency) -> tuple[np.ndarray, np.ndarray]:
    """For each gt row: the pred column with the largest overlap (0 = none) and that overlap."""
    fg = ct.table[:, 1:]
    if fg.shape[1] == 0:  # no predicted instance at all
        return np.zeros(fg.shape[0], np.int64), np.zeros(fg.shape[0])
    best = np.asarray(fg.argmax(axis=1)).ravel() + 1
    px = np.asarray(fg.max(axis=1).todense()).ravel()
    return np.where(px > 0, best, 0), px


def field_table(
    gt: np.ndarray,
    pred: np.ndarray,
    iou_threshold: float = 0.5,
    valid: np.ndarray | None = None,
    pixel_area_m2: float | None = None,
    min_inside: float = 0.5,
    min_cover: float = 0.5,
) -> tuple:
    """Per ground-truth field and per prediction tables (pandas), from one contingency table.

    Field columns: ``gt_id, area_px, area_m2, pred_id`` (one-to-one match, 0 = none), ``iou``,
    ``matched``, ``alu_matched, alu_iou, n_merged`` (predictions merged into it under the ALU rule),
    ``over_segmented`` (n_merged >= 2), ``under_segmented`` (a prediction covers >= ``min_cover``
    of this field and of another field), ``os_error, us_error`` (Persello et al. 2019:
    1 - |g & p*| / |g| and 1 - |g & p*| / |p*|, p* = the prediction overlapping g most).
    Prediction columns: ``pred_id, area_px, area_m2, gt_id, iou, matched``.
    """
    ct = contingency(gt, pred, valid)
    rows, cols, inter, iou = _pairs(ct)
    mr, mc, miou = _one_to_one(rows, cols, iou, iou_threshold)
    n_g, n_p = ct.gt_ids.size, ct.pred_ids.size
    g_pred, g_iou = np.zeros(n_g, np.int64), np.zeros(n_g)
    g_pred[mr], g_iou[mr] = ct.pred_ids[mc], miou
    p_gt, p_iou = np.zeros(n_p, np.int64), np.zeros(n_p)
    p_gt[mc], p_iou[mc] = ct.gt_ids[mr], miou

    groups = merge_groups(ct, min_inside)
    n_merged = np.bincount(groups[1:], minlength=n_g)
    merged = _merged_contingency(ct, groups)
    ar, ac, _, aiou = _pairs(merged)
    amr, _, amiou = _one_to_one(ar, ac, aiou, iou_threshold)
    a_iou = np.zeros(n_g)
    a_iou[amr] = amiou
    a_matched = np.zeros(n_g, bool)
    a_matched[amr] = True

    # Under-segmentation: predictions covering >= min_cover of two or more fields.
    covers = inter >= min_cover * ct.gt_area[rows]
    n_covered = np.bincount(cols[covers], minlength=n_p)
    under = np.zeros(n_g, bool)
    under[rows[covers & (n_covered[cols] >= 2)]] = True

    best, best_px = _best_overlap(ct)
    os_err = 1 - best_px / np.maximum(ct.gt_area, 1)
    us_err = np.where(best > 0, 1 - best_px / np.maximum(ct.pred_area[best], 1), 1.0)

    px_m2 = pixel_area_m2 if pixel_area_m2 is not None else np.nan
    fields = pd.DataFrame(
        {
            "gt_id": ct.gt_ids,
            "area_px": ct.gt_area,
            "area_m2": ct.gt_area * px_m2,
            "pred_id": g_pred,
            "iou": g_iou,
            "matched": g_pred > 0,
            "alu_matched": a_matched,
            "alu_iou": a_iou,
            "n_merged": n_merged,
            "over_segmented": n_merged >= 2,
            "under_segmented": under,
            "os_error": os_err,
            "us_error": us_err,
        }
    ).iloc[1:]
    preds = pd.DataFrame(
        {
            "pred_id": ct.pred_ids,
            "area_px": ct.pred_area,
            "area_m2": ct.pred_area * px_m2,
            "gt_id": p_gt,
            "iou": p_iou,
            "matched": p_gt > 0,
        }
    ).iloc[1:]
    return fields.reset_index(drop=True), preds.reset_index(drop=True)


def instance_counts(gt, pred, iou_threshold: float = 0.5, valid=None, **kw) -> dict:
    """Additive counts for one tile (sum over tiles, then :func:`instance_scores_from_counts`)."""
    return counts_from_tables(*field_table(gt, pred, iou_threshold, valid, **kw))


def counts_from_tables(fields, preds) -> dict:
    """Additive instance counts from the tables of :func:`field_table`."""
    n_alu_pred = int(preds.shape[0] - (fields["n_merged"].clip(lower=1) - 1).sum())
    return {
        "n_gt": len(fields),
        "n_pred": len(preds),
        "tp": int(fields["matched"].sum()),
        "iou_sum": float(fields["iou"].sum()),
        "alu_tp": int(fields["alu_matched"].sum()),
        "alu_n_pred": n_alu_pred,
        "n_over": int(fields["over_segmented"].sum()),
        "n_under": int(fields["under_segmented"].sum()),
        "os_sum": float(fields["os_error"].sum()),
        "us_sum": float(fields["us_error"].sum()),
    }


def instance_scores(gt, pred, iou_threshold: float = 0.5, valid=None, **kw) -> dict:
    """Instance scores of one image: one-to-one and ALU-style P/R/F1, over/under-segmentation rates."""
    c = instance_counts(gt, pred, iou_threshold, valid, **kw)
    return {k: float(v) for k, v in instance_scores_from_counts(c).items()}


def instance_scores_from_counts(c) -> dict:
    """Scores from (summed) instance counts; works elementwise on numpy arrays (for the bootstrap)."""
    n_gt, n_pred, tp = (np.asarray(c[k], float) for k in ("n_gt", "n_pred", "tp"))
    alu_tp, alu_np = np.asarray(c["alu_tp"], float), np.asarray(c["alu_n_pred"], float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "inst_precision": _safe(tp, n_pred, n_gt == 0),
            "inst_recall": _safe(tp, n_gt, n_pred == 0),
            "inst_f1": _safe(2 * tp, n_gt + n_pred, True),
            "inst_mean_iou": _safe(np.asarray(c["iou_sum"], float), tp, False),
            "alu_precision": _safe(alu_tp, alu_np, n_gt == 0),
            "alu_recall": _safe(alu_tp, n_gt, alu_np == 0),
            "alu_f1": _safe(2 * alu_tp, n_gt + alu_np, True),
            "over_seg_rate": _safe(np.asarray(c["n_over"], float), n_gt, False),
            "under_seg_rate": _safe(np.asarray(c["n_under"], float), n_gt, False),
            "os_error": _safe(np.asarray(c["os_sum"], float), n_gt, False),
            "us_error": _safe(np.asarray(c["us_sum"], float), n_gt, False),
        }
    return out


def _safe(num, den, empty_value):
    """num / den, and ``empty_value`` (1.0 if true, else 0.0) where den == 0."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    res = np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)
    res = np.where(den > 0, res, np.where(empty_value, 1.0, 0.0))
    return res if res.ndim else float(res)


# --- semantic ---------------------------------------------------------------------------------------


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, n_classes: int = 4, ignore: int = 255) -> np.ndarray:
    """(n, n) int64 counts, rows = ground truth, columns = prediction.

    Pixels equal to ``ignore`` in either mask are skipped (NODATA in the labels, or outside the
    tiles a model was run on).
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} must have the same shape")
    keep = (gt != ignore) & (pred != ignore)
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    bad = (g < 0) | (g >= n_classes) | (p < 0) | (p >= n_classes)
    if bad.any():
        vals = np.unique(np.r_[g[(g < 0) | (g >= n_classes)], p[(p < 0) | (p >= n_classes)]])
        raise ValueError(f"class ids {vals.tolist()} outside 0..{n_classes - 1} (and not ignore={ignore})")
    return np.bincount(g * n_classes + p, minlength=n_classes**2).reshape(n_classes, n_classes)


def semantic_scores(cm: np.ndarray, classes=None):
    """Per-class IoU, Dice, precision, recall, support (pandas); NaN where a class is absent on both sides.

    The frame's ``attrs`` hold ``miou`` and ``mdice`` (means over classes that are present) and
    ``pixel_accuracy``.
    """
    cm = np.asarray(cm, float)
    classes = list(classes or CLASSES[: cm.shape[0]])
    s = semantic_from_cm(cm)
    df = pd.DataFrame(
        {
            "iou": s["iou"],
            "dice": s["dice"],
            "precision": s["precision"],
            "recall": s["recall"],
            "support": cm.sum(axis=1).astype(np.int64),
        },
        index=pd.Index(classes, name="class"),
    )
    df.attrs.update(miou=float(s["miou"]), mdice=float(s["mdice"]), pixel_accuracy=float(s["pixel_accuracy"]))
    return df


def semantic_from_cm(cm: np.ndarray) -> dict:
    """IoU/Dice/precision/recall per class from a confusion matrix (..., n, n); batched for the bootstrap."""
    cm = np.asarray(cm, float)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    gt, pr = cm.sum(axis=-1), cm.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(gt + pr - tp > 0, tp / (gt + pr - tp), np.nan)
        dice = np.where(gt + pr > 0, 2 * tp / (gt + pr), np.nan)
        precision = np.where(pr > 0, tp / pr, np.where(gt > 0, 0.0, np.nan))
        recall = np.where(gt > 0, tp / gt, np.where(pr > 0, 0.0, np.nan))
        total = cm.sum(axis=(-2, -1))
        present = ~np.isnan(iou)
        miou = np.where(present.any(-1), np.nansum(iou, -1) / np.maximum(present.sum(-1), 1), np.nan)
        mdice = np.where(present.any(-1), np.nansum(dice, -1) / np.maximum(present.sum(-1), 1), np.nan)
        acc = np.where(total > 0, tp.sum(-1) / total, np.nan)
    return {
        "iou": iou,
        "dice": dice,
        "precision": precision,
        "recall": recall,
        "miou": miou,
        "mdice": mdice,
        "pixel_accuracy": acc,
    }


# --- boundary ---------------------------------------------------------------------------------------


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Boundary pixels of a label image (instance or semantic): pixels next to a different label."""
    return find_boundaries(np.asarray(labels), mode="inner")


def boundary_counts(
    gt: np.ndarray,
    pred: np.ndarray,
    tolerance_px: float | None = 2.0,
    tolerance_m: float | None = None,
    pixel_size: float | None = None,
    valid: np.ndarray | None = None,
) -> dict:
    """Additive boundary counts: predicted boundary pixels within the tolerance of a true one, and back.

    ``gt``/``pred`` are label images (boundaries are derived) or bool boundary masks. Give the
    tolerance in pixels, or in metres with ``pixel_size`` (metres per pixel).
    """
    if tolerance_m is not None:
        if not pixel_size:
            raise ValueError("tolerance_m needs pixel_size (metres per pixel, e.g. the scene's res_m)")
        tolerance_px = tolerance_m / pixel_size
    if tolerance_px is None or tolerance_px < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance_px}")
    return _boundary_counts_at(gt, pred, {"b": tolerance_px}, valid)


def _boundary_counts_at(gt, pred, tolerances_px: dict, valid=None) -> dict:
    """Boundary counts at several tolerances (prefix -> pixels) from one pair of distance maps."""
    gb = np.asarray(gt) if np.asarray(gt).dtype == bool else boundaries(gt)
    pb = np.asarray(pred) if np.asarray(pred).dtype == bool else boundaries(pred)
    if gb.shape != pb.shape:
        raise ValueError(f"ground truth {gb.shape} and prediction {pb.shape} must have the same shape")
    if valid is not None:
        gb, pb = gb & valid, pb & valid
    # Distance from each boundary pixel to the nearest boundary pixel of the other mask (inf: none).
    d_pred = distance_transform_edt(~gb)[pb] if gb.any() else np.full(int(pb.sum()), np.inf)
    d_gt = distance_transform_edt(~pb)[gb] if pb.any() else np.full(int(gb.sum()), np.inf)
    out = {}
    for prefix, tol in tolerances_px.items():
        out.update(
            {
                f"{prefix}_pred": int(pb.sum()),
                f"{prefix}_pred_hit": int((d_pred <= tol).sum()),
                f"{prefix}_gt": int(gb.sum()),
                f"{prefix}_gt_hit": int((d_gt <= tol).sum()),
            }
        )
    return out


def boundary_scores_from_counts(c, prefix: str = "boundary") -> dict:
    """Boundary precision, recall, F-score from (summed) counts; elementwise on arrays."""
    with np.errstate(invalid="ignore", divide="ignore"):
        p = _safe(c["b_pred_hit"], c["b_pred"], np.asarray(c["b_gt"]) == 0)
        r = _safe(c["b_gt_hit"], c["b_gt"], np.asarray(c["b_pred"]) == 0)
        f = _safe(2 * np.asarray(p) * r, np.asarray(p) + r, False)
    return {f"{prefix}_precision": p, f"{prefix}_recall": r, f"{prefix}_f1": f}


def boundary_f1(
    gt, pred, tolerance_px: float | None = 2.0, tolerance_m=None, pixel_size=None, valid=None
) -> dict:
    """Boundary precision/recall/F-score of one image at a tolerance in pixels or metres."""
    c = boundary_counts(gt, pred, tolerance_px, tolerance_m, pixel_size, valid)
    s = boundary_scores_from_counts(c)
    return {
        "precision": float(s["boundary_precision"]),
        "recall": float(s["boundary_recall"]),
        "f1": float(s["boundary_f1"]),
    }


# --- per-tile counts, pooled scores, bootstrap ------------------------------------------------------


def tile_counts(
    gt_semantic: np.ndarray,
    pred_semantic: np.ndarray | None,
    gt_instances: np.ndarray,
    pred_instances: np.ndarray,
    pixel_size: float,
    boundary_tol_px: float = 2.0,
    boundary_tol_m: float = 1.0,
    iou_threshold: float = 0.5,
    n_classes: int = 4,
    return_tables: bool = False,
):
    """Every additive count of one tile: confusion matrix cells ``cm_i_j``, boundary counts at a
    tolerance in pixels (``b_*``) and in metres (``bm_*``), and instance counts.

    ``pred_semantic=None`` (an instance-only method such as the watershed baseline) gives NaN
    semantic counts. Pixels where ``gt_semantic`` is NODATA are not scored. With
    ``return_tables`` also the per-field and per-prediction tables of :func:`field_table`.
    """
    out = {}
    if pred_semantic is None:
        cm = np.full((n_classes, n_classes), np.nan)
    else:
        cm = confusion_matrix(gt_semantic, pred_semantic, n_classes, ignore=NODATA)
    for i in range(n_classes):
        for j in range(n_classes):
            out[f"cm_{i}_{j}"] = cm[i, j]
    valid = np.asarray(gt_semantic) != NODATA
    tolerances = {"b": boundary_tol_px, "bm": boundary_tol_m / pixel_size}
    out.update(_boundary_counts_at(gt_instances, pred_instances, tolerances, valid))
    fields, preds = field_table(
        gt_instances, pred_instances, iou_threshold, valid, pixel_area_m2=pixel_size**2
    )
    out.update(counts_from_tables(fields, preds))
    if return_tables:
        return out, fields, preds
    return out


def scores_from_counts(sums, n_classes: int = 4) -> dict:
    """Headline scores from counts summed over tiles (scalars, or arrays of bootstrap replicates)."""
    cm = np.stack(
        [
            np.stack([np.asarray(sums[f"cm_{i}_{j}"], float) for j in range(n_classes)], -1)
            for i in range(n_classes)
        ],
        -2,
    )
    sem = semantic_from_cm(cm)
    out = {"miou": sem["miou"], "mdice": sem["mdice"], "pixel_accuracy": sem["pixel_accuracy"]}
    for k, name in enumerate(CLASSES[:n_classes]):
        for m in ("iou", "dice", "precision", "recall"):
            out[f"{m}_{name}"] = sem[m][..., k]
    for prefix, label in (("b", "boundary_px"), ("bm", "boundary_m")):
        c = {"b" + k[len(prefix) :]: sums[k] for k in sums if k.startswith(prefix + "_")}
        if c:  # cell-level scores (validation answers) have no boundary or instance counts
            out.update(boundary_scores_from_counts(c, label))
    if "n_gt" in sums:
        out.update(instance_scores_from_counts(sums))
    return out


PER_CLASS = ("dice_others", "dice_field", "dice_tree", "dice_water", "mdice", "pixel_accuracy")

HEADLINE = (
    "miou",
    "iou_field",
    "boundary_px_f1",
    "boundary_m_f1",
    "inst_f1",
    "alu_f1",
    "over_seg_rate",
    "under_seg_rate",
)


def bootstrap_ci(values, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, statistic=np.mean):
    """(estimate, low, high): percentile bootstrap of ``statistic`` over the items of ``values``."""
    values = np.asarray(values, float)
    if values.size == 0:
        return (np.nan, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    reps = statistic(values[idx], axis=1)
    lo, hi = np.nanpercentile(reps, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return (float(statistic(values)), float(lo), float(hi))


def _count_columns(counts) -> list[str]:
    return [c for c in counts.columns if c.startswith(("cm_", "b_", "bm_")) or c in _INSTANCE_KEYS]


def resampling_units(counts, cols, cluster: str | None = None):
    """(units x cols) counts to resample: one row per tile, or summed per ``cluster`` (e.g. block_id).

    Tiles that share a spatial block (overlapping tiles, the same fields and haze) are not
    independent; resampling whole blocks keeps that dependence inside each replicate, so the interval
    is not made too narrow by counting one place several times. Returns (array, unit labels).
    """
    x = counts[cols].to_numpy(float)
    if cluster is None:
        return x, np.asarray(counts["tile_id"] if "tile_id" in counts else counts.index).astype(str)
    if cluster not in counts:
        raise ValueError(f"no column {cluster!r} to resample by; have {sorted(counts.columns)}")
    labels, inv = np.unique(counts[cluster].astype(str).to_numpy(), return_inverse=True)
    out = np.zeros((labels.size, len(cols)))
    np.add.at(out, inv, x)  # NaN (no semantic output) stays NaN, as in the point estimate
    return out, labels


def bootstrap_scores(
    counts,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    metrics=None,
    cluster: str | None = None,
    row_unit: str = "tiles",
):
    """Pooled scores with percentile bootstrap intervals (one row per metric).

    ``counts`` has one row per tile (the dicts of :func:`tile_counts`) or per validation answer.
    Each replicate resamples units with replacement (multinomial weights): tiles, or whole spatial
    blocks with ``cluster="block_id"``; it sums their counts and recomputes the scores, so ratios
    such as F1 are pooled the same way as the estimate. Returns columns
    ``metric, value, lo, hi, n_tiles, n_units, resampled, row_unit`` (``n_tiles`` counts the rows,
    which are ``row_unit``: tiles, or validation answers).
    """
    cols = _count_columns(counts)
    x, _ = resampling_units(counts, cols, cluster)
    n = x.shape[0]
    point = scores_from_counts(dict(zip(cols, x.sum(0), strict=True)))
    if n:
        rng = np.random.default_rng(seed)
        weights = rng.multinomial(n, np.full(n, 1 / n), size=n_boot)  # (n_boot, n_units)
        # NaN counts (no semantic output) become zeros here, which score NaN again (empty classes).
        reps = scores_from_counts(dict(zip(cols, (weights @ np.nan_to_num(x, nan=0.0)).T, strict=True)))
    rows = []
    for name in metrics or point:
        val = float(point[name])
        if n and not np.isnan(val):
            lo, hi = np.nanpercentile(reps[name], [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
        else:
            lo = hi = np.nan
        rows.append(
            {
                "metric": name,
                "value": val,
                "lo": float(lo),
                "hi": float(hi),
                "n_tiles": len(counts),
                "n_units": n,
                "resampled": cluster or "tile",
                "row_unit": row_unit,
            }
        )
    return pd.DataFrame(rows)


_INSTANCE_KEYS = (
    "n_gt",
    "n_pred",
    "tp",
    "iou_sum",
    "alu_tp",
    "alu_n_pred",
    "n_over",
    "n_under",
    "os_sum",
    "us_sum",
)


def compare_methods(
    counts_a,
    counts_b,
    metrics=HEADLINE,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    cluster: str | None = None,
    key: str = "tile_id",
):
    """Paired bootstrap of B - A over the same units (one row per metric: a, b, diff, lo, hi).

    Both frames must hold the same rows (column ``key``: tiles, or validation answers); each replicate
    resamples units once (tiles, or whole blocks with ``cluster``) and scores both methods on that
    sample, so the difficulty of a place cancels out of the interval.
    """
    a = counts_a.set_index(key).sort_index()
    b = counts_b.set_index(key).sort_index()
    if not a.index.equals(b.index):
        raise ValueError(f"compare_methods needs the same rows on both sides (see the {key} columns)")
    if cluster is not None and not a[cluster].astype(str).equals(b[cluster].astype(str)):
        raise ValueError(f"the two methods put the same {key} in different {cluster} groups")
    cols = [c for c in _count_columns(a) if c in b.columns]
    a, b = a.reset_index(), b.reset_index()
    (xa, _), (xb, _) = resampling_units(a, cols, cluster), resampling_units(b, cols, cluster)
    n = xa.shape[0]
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1 / n), size=n_boot) if n else np.zeros((n_boot, 0))
    pa, pb = (scores_from_counts(dict(zip(cols, x.sum(0), strict=True))) for x in (xa, xb))
    ra, rb = (scores_from_counts(dict(zip(cols, (w @ np.nan_to_num(x)).T, strict=True))) for x in (xa, xb))
    rows = []
    for m in metrics:
        d = rb[m] - ra[m]
        ok = ~np.isnan(d)
        lo, hi = np.percentile(d[ok], [100 * (1 - ci) / 2, 100 * (1 + ci) / 2]) if ok.any() else (np.nan,) * 2
        rows.append(
            {
                "metric": m,
                "a": float(pa[m]),
                "b": float(pb[m]),
                "diff": float(pb[m] - pa[m]),
                "lo": float(lo),
                "hi": float(hi),
                "n_tiles": len(a),
                "n_units": n,
                "resampled": cluster or key,
                "row_unit": "tiles" if key == "tile_id" else "answers",
            }
        )
    return pd.DataFrame(rows)


def units_text(row) -> str:
    """ "65 tiles" or "65 tiles in 14 blocks" for a table row."""
    text = f"{int(row['n_tiles'])} {row.get('row_unit', 'tiles')}"
    if str(row.get("resampled", "tile")) not in ("tile", "tile_id", "id"):
        text += f" in {int(row['n_units'])} blocks"
    return text


def describe_difference(row, name_a: str, name_b: str) -> str:
    """One sentence reading a row of :func:`compare_methods`, worded from the interval only."""
    m, d, lo, hi = row["metric"], row["diff"], row["lo"], row["hi"]
    if np.isnan(d):
        return f"{m}: not available for both {name_a} and {name_b}."
    head = f"{m}: {name_b} {row['b']:.3f} vs {name_a} {row['a']:.3f} (difference {d:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f}"
    head += f", {units_text(row)})"
    lower_better = m in ("over_seg_rate", "under_seg_rate", "os_error", "us_error")
    if np.isnan(lo) or (lo <= 0 <= hi):
        return head + ": the interval includes zero, so this data cannot tell them apart."
    better = (lo > 0) != lower_better
    return head + f": {name_b if better else name_a} is better on this data."


def scene_tables(
    gt_instances, pred_instances, pred_semantic=None, iou_threshold: float = 0.5, pixel_area_m2=None
):
    """Scene-wide field and prediction tables (for map popups), scored where the model was run."""
    valid = None if pred_semantic is None else np.asarray(pred_semantic) != 255
    return field_table(gt_instances, pred_instances, iou_threshold, valid, pixel_area_m2=pixel_area_m2)


def per_tile_scores(counts, metrics=HEADLINE):
    """The scores of each tile on its own, indexed by tile_id, plus ``error_share``: the share of
    labelled pixels given the wrong class (defined on every tile with a semantic output, unlike IoU,
    which is undefined on a tile with no field in truth or prediction)."""
    cols = _count_columns(counts)
    scores = scores_from_counts({c: counts[c].to_numpy(float) for c in cols})
    index = counts["tile_id"] if "tile_id" in counts else counts.index
    out = pd.DataFrame({m: np.asarray(scores[m], float) for m in metrics}, index=index)
    out["error_share"] = 1.0 - np.asarray(scores["pixel_accuracy"], float)
    return out


def worst_tiles(scores, n: int = 4, by: str = "error_share", undefined: str = "iou_field"):
    """(the ``n`` tiles with the largest ``by`` error, the tiles where ``undefined`` is NaN).

    Ranking by an error defined on every tile: a tile with no field in truth or prediction has no
    field IoU, and must not be called "worst" for that; it is listed apart instead.
    """
    ranked = scores[by].dropna().sort_values(ascending=False, kind="stable")
    missing = scores.index[scores[undefined].isna()] if undefined in scores else scores.index[:0]
    return list(ranked.index[:n]), list(missing)


def recall_by_size(fields, bins=None, n_boot: int = 500, seed: int = 0, matched: str = "matched"):
    """Recall of ground-truth fields per field-size bin (m^2), with bootstrap intervals over fields."""
    area = fields["area_m2"].to_numpy(float)
    if bins is None:
        lo, hi = np.nanmin(area) if area.size else 1.0, np.nanmax(area) if area.size else 10.0
        bins = np.unique(np.geomspace(max(lo, 1e-3), max(hi, lo * 1.001, 1e-3), 6))
    cut = pd.cut(fields["area_m2"], bins, include_lowest=True)
    rows = []
    for interval, grp in fields.groupby(cut, observed=True):
        est, lo, hi = bootstrap_ci(grp[matched].astype(float), n_boot=n_boot, seed=seed)
        rows.append(
            {
                "area_lo": interval.left,
                "area_hi": interval.right,
                "n_fields": len(grp),
                "recall": est,
                "lo": lo,
                "hi": hi,
            }
        )
    return pd.DataFrame(rows)
