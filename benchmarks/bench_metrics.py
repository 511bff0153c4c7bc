"""Vectorised instance matching (one sparse contingency table) vs straightforward per-instance loops.

    .venv/bin/python benchmarks/bench_metrics.py                  # 1536 px scene, ~2300 fields
    .venv/bin/python benchmarks/bench_metrics.py --size 2048 --field-px 32

The scene is a grid of rectangular fields of jittered size separated by 2 px bunds; the prediction
shifts every field by a few pixels, splits some and merges some neighbours. Three implementations
give the same true positives, timed side by side in this run (best of ``--repeats``):

* ``vectorised``: ``metrics.match_instances`` (one pass over the pixels, no loop over instances);
* ``loop_full``: for each ground-truth field, compare masks over the whole image (the textbook loop);
* ``loop_bbox``: the same loop restricted to each field's bounding box (``scipy.ndimage.find_objects``),
  a fairer loop.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from magseg_nb import metrics


def make_scene(size: int, field_px: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(gt, pred) int32 instance labels with about (size / field_px)^2 fields."""
    rng = np.random.default_rng(seed)
    cuts = lambda: np.unique(np.r_[0, np.cumsum(rng.integers(field_px // 2, field_px * 3 // 2, size)), size])  # noqa: E731
    rows, cols = cuts(), cuts()
    rows, cols = rows[rows <= size], cols[cols <= size]
    gt = np.zeros((size, size), np.int32)
    pred = np.zeros_like(gt)
    k = 0
    for r0, r1 in zip(rows[:-1], rows[1:], strict=True):
        for c0, c1 in zip(cols[:-1], cols[1:], strict=True):
            k += 1
            gt[r0 : r1 - 2, c0 : c1 - 2] = k
            dr, dc = rng.integers(-2, 3, 2)
            pr0, pr1 = max(r0 + dr, 0), max(r1 - 2 + dr, 0)
            pc0, pc1 = max(c0 + dc, 0), max(c1 - 2 + dc, 0)
            pred[pr0:pr1, pc0:pc1] = k
            if rng.random() < 0.1:  # over-segmentation: split in two
                pred[pr0:pr1, (pc0 + pc1) // 2 : pc1] = k + 1_000_000
            elif rng.random() < 0.1:  # under-segmentation: swallow the bund to the right
                pred[pr0:pr1, pc0 : min(pc1 + 2, size)] = k
    return gt, pred


def loop_full(gt: np.ndarray, pred: np.ndarray, thr: float = 0.5) -> int:
    """True positives by looping over ground-truth fields and their overlapping predictions."""
    tp = 0
    for g in np.unique(gt[gt > 0]):
        gm = gt == g
        for p in np.unique(pred[gm]):
            if p == 0:
                continue
            pm = pred == p
            if (gm & pm).sum() / (gm | pm).sum() >= thr:
                tp += 1
                break  # one match per field (a field split in exact halves has two at 0.5)
    return tp


def loop_bbox(gt: np.ndarray, pred: np.ndarray, thr: float = 0.5) -> int:
    """The same loop, looking only inside each field's and each prediction's bounding box."""
    pred_area = np.bincount(pred.ravel())
    tp = 0
    for g, sl in enumerate(ndimage.find_objects(gt), start=1):
        if sl is None:
            continue
        gm = gt[sl] == g
        ids, inter = np.unique(pred[sl][gm], return_counts=True)
        iou = inter / (gm.sum() + pred_area[ids] - inter)
        tp += bool(((ids > 0) & (iou >= thr)).any())  # one match per field
    return tp


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1536, help="scene side in pixels")
    ap.add_argument("--field-px", type=int, default=32, help="typical field side in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--skip-full-loop", action="store_true", help="the whole-image loop is slow on big scenes"
    )
    args = ap.parse_args()
    gt, pred = make_scene(args.size, args.field_px)
    n_gt, n_pred = len(np.unique(gt)) - 1, len(np.unique(pred)) - 1
    print(f"scene {args.size}x{args.size} px, {n_gt} ground-truth fields, {n_pred} predicted instances")
    t_vec, res = best_of(lambda: metrics.match_instances(gt, pred), args.repeats)
    t_box, tp_box = best_of(lambda: loop_bbox(gt, pred), args.repeats)
    rows = [
        ("vectorised (contingency table)", t_vec, res["tp"]),
        ("loop over fields, bounding boxes", t_box, tp_box),
    ]
    if not args.skip_full_loop:
        t_full, tp_full = best_of(lambda: loop_full(gt, pred), 1)
        rows.append(("loop over fields, whole image", t_full, tp_full))
    print(f"{'implementation':34s} {'seconds':>9s} {'tp':>6s} {'x slower than vectorised':>26s}")
    for name, t, tp in rows:
        print(f"{name:34s} {t:9.3f} {tp:6d} {t / t_vec:26.1f}")
    assert len({tp for _, _, tp in rows}) == 1, "the implementations disagree"
    t_tab, _ = best_of(lambda: metrics.field_table(gt, pred), args.repeats)
    print(f"full field table (one-to-one + ALU merge + over/under-segmentation): {t_tab:.3f} s")


if __name__ == "__main__":
    main()
