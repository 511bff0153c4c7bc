"""Validation scores of notebooks 03 and 04, per class, with spatial-block bootstrap intervals.

The trained model, the all-field baseline and the per-pixel classifier of notebook 01 are scored on
the *same cells* of the same validation conversations: each conversation's ``gt_mask`` against the
model's decoded answer, a grid of "field", and the classifier's tile prediction cut into the
conversation's cells by the rule that built ``gt_mask``. Every row carries its tile's spatial block
(``01_dataset_prep/tiles.csv``), so intervals resample whole blocks (see ``metrics.bootstrap_scores``):
the patches of one tile, and the overlapping tiles of one block, are not independent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from magseg_nb import evaluation, geo, layout, metrics, pixel_baseline, prompts, textgrid
from magseg_nb.labels import CLASS_IDS, CLASSES, NODATA

MODEL, ALL_FIELD, PIXEL = "model", "all-field baseline", "pixel classifier baseline"
METRICS = tuple(f"dice_{c}" for c in CLASSES) + ("mdice", "pixel_accuracy")


def cell_counts(gt, pred) -> dict:
    """Confusion-matrix counts ``cm_i_j`` of one answer's cells (NODATA cells skipped)."""
    cm = metrics.confusion_matrix(np.asarray(gt), np.asarray(pred), len(CLASSES), ignore=NODATA)
    return {f"cm_{i}_{j}": int(cm[i, j]) for i in range(len(CLASSES)) for j in range(len(CLASSES))}


def read_answers(path) -> dict[str, dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the training stage writes it after evaluating")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["id"]): r for r in rows}


def tile_blocks(run01) -> dict[str, str]:
    """tile_id -> block_id from notebook 01's tile table."""
    tiles = pd.read_csv(Path(run01) / layout.TILES_CSV, usecols=["tile_id", "block_id"])
    return dict(zip(tiles["tile_id"].astype(str), tiles["block_id"].astype(str), strict=True))


def answer_frames(val_jsonl, answers_jsonl, run01) -> dict[str, pd.DataFrame]:
    """scorer -> one row per answered validation conversation: id, tile_id, block_id, valid, cm_*.

    The scorers are the model (its answer decoded by the tolerant decoder: a repaired answer is
    scored as what was recovered), the all-field baseline and, when notebook 01 wrote it, the pixel
    classifier. ``valid`` is the model answer's well-formedness, on every scorer's rows, so that the
    well-formed subset selects the same rows for all of them.
    """

    answers = read_answers(answers_jsonl)
    blocks = tile_blocks(run01)
    pixel_dir = Path(run01) / "pixel_baseline"
    has_pixel = (pixel_dir / "tiles").is_dir()
    tiles: dict[str, np.ndarray] = {}
    frames: dict[str, list] = {MODEL: [], ALL_FIELD: []} | ({PIXEL: []} if has_pixel else {})
    for row in prompts.read_jsonl(val_jsonl):
        ans = answers.get(str(row["id"]))
        if ans is None:  # a seeded subset was scored
            continue
        gt = np.asarray(row["gt_mask"])
        meta = {
            "id": str(row["id"]),
            "tile_id": str(row["tile_id"]),
            "block_id": blocks.get(str(row["tile_id"]), str(row["tile_id"])),
            "valid": bool(ans["valid"]),
        }
        decoded = textgrid.decode(ans["answer"], shape=gt.shape)
        frames[MODEL].append({**meta, **cell_counts(gt, decoded.mask)})
        frames[ALL_FIELD].append({**meta, **cell_counts(gt, np.full_like(gt, CLASS_IDS["field"]))})
        if has_pixel:
            if row["tile_id"] not in tiles:
                tiles[row["tile_id"]] = pixel_baseline.read_tile_prediction(pixel_dir, row["tile_id"])
            cells = pixel_baseline.conversation_cells(tiles[row["tile_id"]], row)
            frames[PIXEL].append({**meta, **cell_counts(gt, cells)})
    return {k: pd.DataFrame(v) for k, v in frames.items()}


def score_frames(
    frames: dict[str, pd.DataFrame],
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    cluster: str | None = "block_id",
    well_formed_only: bool = False,
) -> pd.DataFrame:
    """Long table (scorer, answers, metric, value, lo, hi, ...): pooled cell scores with intervals."""
    parts = []
    for name, df in frames.items():
        sub = df[df["valid"]] if well_formed_only else df
        table = metrics.bootstrap_scores(
            sub, n_boot, ci, seed, metrics=METRICS, cluster=cluster, row_unit="answers"
        )
        parts.append(table.assign(scorer=name, answers="well-formed" if well_formed_only else "all"))
    return pd.concat(parts, ignore_index=True)


def compare(
    frames_a: pd.DataFrame,
    frames_b: pd.DataFrame,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    cluster: str | None = "block_id",
) -> pd.DataFrame:
    """Paired B - A on the same answers (by ``id``), resampling whole blocks."""
    return metrics.compare_methods(frames_a, frames_b, METRICS, n_boot, ci, seed, cluster=cluster, key="id")


def wide(long: pd.DataFrame, index=("scorer",), digits: int = 3) -> pd.DataFrame:
    """One row per scorer, one column per metric: "value [lo, hi]"."""
    return evaluation.wide_table(
        long.rename(columns={"scorer": "method"}), METRICS, index=["method"], digits=digits
    )


def valid_share(frames: dict[str, pd.DataFrame]) -> float:
    df = frames[MODEL]
    return float(df["valid"].mean()) if len(df) else float("nan")


def claims(diff: pd.DataFrame, name_a: str, name_b: str, metrics_=METRICS) -> list[str]:
    """Sentences generated from a paired table: each says better only where the interval excludes zero."""
    rows = diff.set_index("metric").reindex(list(metrics_)).dropna(subset=["diff"]).reset_index()
    return [metrics.describe_difference(r, name_a, name_b) for _, r in rows.iterrows()]


def verdict(diff: pd.DataFrame, metric: str) -> str:
    """'higher', 'lower' or 'not resolved' for B - A on ``metric`` (interval excludes zero or not)."""
    row = diff.set_index("metric").loc[metric]
    if np.isnan(row["lo"]) or row["lo"] <= 0 <= row["hi"]:
        return "not resolved"
    return "higher" if row["lo"] > 0 else "lower"


SHORT = {MODEL: "val", ALL_FIELD: "all_field", PIXEL: "pixel"}
_CLASS_METRICS = tuple(f"dice_{c}" for c in CLASSES)


def class_verdicts(diff: pd.DataFrame) -> dict[str, list[str]]:
    """The classes of a paired B - A table by :func:`verdict` ('higher', 'lower', 'not resolved'), each as
    "tree +0.012 [+0.003, +0.020]"; classes without a difference (absent on both sides) left out."""
    groups: dict[str, list[str]] = {"higher": [], "lower": [], "not resolved": []}
    rows = diff.set_index("metric")
    for metric in _CLASS_METRICS:
        if metric in rows.index and not np.isnan(rows.loc[metric, "diff"]):
            r = rows.loc[metric]
            groups[verdict(diff, metric)].append(
                f"{metric.removeprefix('dice_')} {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"
            )
    return groups


def conclusions(versus: dict, notes: list[str] = ()) -> list[str]:
    """Sentences stating what the paired tables show, generated from their intervals.

    ``versus`` maps (run, baseline name) -> :func:`compare` table (baseline = A, model = B). For each
    run and baseline: the classes where the model is ahead, behind, or not resolved; a claim that
    the model "learned the landscape" is made only for classes where it beats the strongest simple
    baseline (the pixel classifier) with an interval above zero, and never without that baseline. ``notes`` (cut or unequal runs)
    come first, so no conclusion is read without them.
    """
    lines = list(notes)
    for (run, baseline), diff in versus.items():
        groups = class_verdicts(diff)
        n = diff.iloc[0]
        where = f"{int(n['n_tiles'])} answers in {int(n['n_units'])} blocks"
        parts = [
            f"ahead on {', '.join(groups['higher'])}" if groups["higher"] else "ahead on no class",
            f"behind on {', '.join(groups['lower'])}" if groups["lower"] else "",
            f"not resolved on {', '.join(groups['not resolved'])}" if groups["not resolved"] else "",
        ]
        lines.append(
            f"**{run} vs the {baseline}** (Dice B - A, 95% block intervals, {where}): "
            + "; ".join(p for p in parts if p)
            + "."
        )
    for run in dict.fromkeys(r for r, _ in versus):
        if (run, PIXEL) not in versus:
            lines.append(
                f"{run}: the pixel classifier (the strongest simple baseline) was not run, so no claim "
                "that the model learned the landscape is made."
            )
            continue
        won = [m.removeprefix("dice_") for m in _CLASS_METRICS if verdict(versus[run, PIXEL], m) == "higher"]
        if won:
            lines.append(
                f"{run} beats the strongest simple baseline ({PIXEL}) on {', '.join(won)}: for "
                f"{'that class' if len(won) == 1 else 'those classes'} the model learned the landscape."
            )
        else:
            lines.append(
                f"{run} beats the strongest simple baseline ({PIXEL}) on no class: this run does not "
                "show that the model learned more of the landscape than the baseline gets from the pixels."
            )
    return lines


def change_sentences(
    diff: pd.DataFrame, name_b: str, name_a: str, words: tuple[str, str] = ("improved", "worsened")
) -> list[str]:
    """One sentence per metric of a paired B - A table: ``words`` ('improved' / 'worsened') only where
    the block interval excludes zero, otherwise 'no change this data can resolve'."""
    out = []
    for _, r in diff.dropna(subset=["diff"]).iterrows():  # a class absent on both sides says nothing
        v = verdict(diff, r["metric"])
        word = {"higher": words[0], "lower": words[1], "not resolved": "no change this data can resolve"}[v]
        out.append(
            f"{r['metric']}: {name_b} {r['b']:.3f} vs {name_a} {r['a']:.3f}, change {r['diff']:+.3f} "
            f"[{r['lo']:+.3f}, {r['hi']:+.3f}] ({metrics.units_text(r)}): {word}."
        )
    return out


def model_changes(
    ref_frames: dict,
    frames: dict,
    name: str,
    ref_name: str,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> list[str]:
    """The change sentences of the model's answers in ``frames`` against those in ``ref_frames`` (both
    from :func:`answer_frames` on the same validation conversations), paired by block."""
    return change_sentences(compare(ref_frames[MODEL], frames[MODEL], n_boot, ci, seed), name, ref_name)


def repair_kinds(answers_jsonl) -> pd.Series:
    """Share of answers with each kind of repair the decoder made (numbers and labels replaced by N,
    e.g. "row N: N cells, expected N"), most frequent first: why answers are not well-formed."""

    answers = list(read_answers(answers_jsonl).values())
    kinds: dict[str, int] = {}
    for a in answers:
        for kind in {re.sub(r"\[.*?\]|'[^']*'|\d+", "N", r) for r in a.get("repairs", [])}:
            kinds[kind] = kinds.get(kind, 0) + 1
    share = pd.Series(kinds, dtype=float) / max(len(answers), 1)
    return share.sort_values(ascending=False).rename("share of answers")


def by_tile(frame: pd.DataFrame) -> pd.DataFrame:
    """An answer frame summed per tile (so formats with different conversations per tile pair up)."""
    cm = [c for c in frame.columns if c.startswith("cm_")]
    return frame.groupby(["tile_id", "block_id"], as_index=False)[cm].sum()


def compare_formats(
    frame_a: pd.DataFrame, frame_b: pd.DataFrame, n_boot=1000, ci=0.95, seed=0
) -> pd.DataFrame:
    """Paired B - A of two formats' models on the validation tiles both answered (cells summed per
    tile; whole blocks resampled). Meaningful when both label the same cells (same resolution)."""
    a, b = by_tile(frame_a), by_tile(frame_b)
    common = sorted(set(a["tile_id"]) & set(b["tile_id"]))
    a, b = (x[x["tile_id"].isin(common)] for x in (a, b))
    return metrics.compare_methods(a, b, METRICS, n_boot, ci, seed, cluster="block_id")


def answer_diversity(answers_jsonl) -> dict:
    """How many different answers the model gave, and the share of the most common one.

    A model that reads the image writes about as many different grids as there are different
    targets; one that collapsed to its prior writes a handful (e.g. "all field") whatever it sees.
    """
    answers = [a["answer"] for a in read_answers(answers_jsonl).values()]
    counts = pd.Series(answers, dtype=object).value_counts()
    return {
        "answers": len(answers),
        "distinct answers": int(counts.size),
        "most common answer share": float(counts.iloc[0] / len(answers)) if len(answers) else float("nan"),
    }


def sft_table(run02, run03, run01, formats, n_boot: int, ci: float, seed: int):
    """Notebook 03's validation table: every format's answers, all and well-formed only, beside the
    all-field and pixel baselines on the same cells. Returns (frames per format, long table)."""
    frames = {
        fmt: answer_frames(Path(run02) / f"{fmt}_val.jsonl", Path(run03) / fmt / layout.ANSWERS, run01)
        for fmt in formats
    }
    table = pd.concat(
        [
            score_frames(frames[fmt], n_boot, ci, seed, well_formed_only=wf).assign(format=fmt)
            for fmt in formats
            for wf in (False, True)
        ],
        ignore_index=True,
    )
    return frames, table


def grpo_table(run02, run04, run03, run01, formats, n_boot: int, ci: float, seed: int):
    """Notebook 04's validation table (SFT and GRPO answers beside the baselines) and the paired
    GRPO - SFT change per format. Returns (long table, changes per format)."""
    frames, frames_sft, changes = {}, {}, {}
    for fmt in formats:
        val = Path(run02) / f"{fmt}_val.jsonl"
        frames[fmt] = answer_frames(val, Path(run04) / fmt / layout.ANSWERS, run01)
        frames_sft[fmt] = answer_frames(val, Path(run03) / fmt / layout.ANSWERS, run01)
        changes[fmt] = compare(frames_sft[fmt][MODEL], frames[fmt][MODEL], n_boot, ci, seed)
    table = pd.concat(
        [
            score_frames({"SFT": frames_sft[fmt][MODEL]}, n_boot, ci, seed).assign(format=fmt)
            for fmt in formats
        ]
        + [score_frames(frames[fmt], n_boot, ci, seed).assign(format=fmt) for fmt in formats],
        ignore_index=True,
    ).replace({"scorer": {MODEL: "GRPO"}})
    return table, changes


PURITY_EDGES = (0.6, 0.8)  # errors_by_purity's bins: < 0.6, 0.6-0.8, 0.8 to under 1, pure


def errors_by_purity(val_jsonl, answers_jsonl, run01, read_semantic=None) -> pd.DataFrame:
    """Error rates of the model and of the pixel classifier per true class and cell purity.

    A cell's purity is the share of its valid pixels holding its majority label
    (:func:`prompts.patch_purity`): a pure cell holds one class, a mixed one is labelled by counting
    pixels. One row per (purity bin, class): cells, model error, pixel classifier error (the share of
    those cells labelled otherwise). ``read_semantic(tile_id)`` gives a tile's pixel labels (default:
    notebook 01's tile)."""
    answers = read_answers(answers_jsonl)
    pixel_dir = Path(run01) / "pixel_baseline"
    read_semantic = read_semantic or (lambda tid: geo.read_tile(run01, tid).semantic)
    sems: dict[str, np.ndarray] = {}
    preds: dict[str, np.ndarray] = {}
    rows = []
    for row in prompts.read_jsonl(val_jsonl):
        ans = answers.get(str(row["id"]))
        if ans is None:
            continue
        tid = str(row["tile_id"])
        if tid not in sems:
            sems[tid] = np.asarray(read_semantic(tid))
            preds[tid] = pixel_baseline.read_tile_prediction(pixel_dir, tid)
        gt = np.asarray(row["gt_mask"])
        purity = prompts.row_purity(row, sems[tid])
        model = textgrid.decode(ans["answer"], shape=gt.shape).mask
        pixel = pixel_baseline.conversation_cells(preds[tid], row)
        keep = (gt != NODATA) & ~np.isnan(purity)
        rows.append(
            pd.DataFrame(
                {"purity": purity[keep], "cls": gt[keep], "model": model[keep], "pixel": pixel[keep]}
            )
        )
    cells = pd.concat(rows, ignore_index=True)
    cells["bin"] = purity_bins(cells["purity"])
    out = (
        cells.assign(model_error=cells["model"] != cells["cls"], pixel_error=cells["pixel"] != cells["cls"])
        .groupby(["bin", "cls"], observed=True)
        .agg(cells=("cls", "size"), model_error=("model_error", "mean"), pixel_error=("pixel_error", "mean"))
        .reset_index()
    )
    out["class"] = [CLASSES[c] for c in out.pop("cls")]
    return out[["bin", "class", "cells", "model_error", "pixel_error"]]


def purity_bins(purity: pd.Series) -> pd.Series:
    """Each cell's purity bin (``PURITY_EDGES``): < 0.6, 0.6-0.8, 0.8-1, pure."""
    lo, hi = PURITY_EDGES
    labels = [f"< {lo}", f"{lo}-{hi}", f"{hi}-1", "pure"]
    edges = [-np.inf, lo, hi, 1.0 - 1e-9, np.inf]  # a pure cell's purity is 1 up to rounding
    return pd.cut(purity, edges, right=False, labels=labels)


def proxy_code_cells(jsonl, run01, rule: str, limit: int | None = None, read_semantic=None) -> pd.DataFrame:
    """One row per labelled cell of MAgSeg conversations: its label, purity and proxy code read by
    ``rule`` (``pretraining.cell_codes``) from the tile image the conversation shows.
    ``read_semantic(tile_id)`` gives a tile's pixel labels (default: notebook 01's tile)."""
    from magseg_nb import pretraining  # here: pretraining imports training, which imports this module

    read_semantic = read_semantic or (lambda tid: geo.read_tile(run01, tid).semantic)
    sems: dict[str, np.ndarray] = {}
    frames = []
    for row in prompts.load_conversations(jsonl, limit=limit):
        tid = str(row["tile_id"])
        if tid not in sems:
            sems[tid] = np.asarray(read_semantic(tid))
        gt = np.asarray(row["gt_mask"])
        purity = prompts.row_purity(row, sems[tid])
        codes = pretraining.row_codes(row, rule)
        keep = (gt != NODATA) & ~np.isnan(purity)
        frames.append(pd.DataFrame({"cls": gt[keep], "purity": purity[keep], "code": codes[keep]}))
    return pd.concat(frames, ignore_index=True)


def proxy_code_accuracy(train: pd.DataFrame, val: pd.DataFrame) -> pd.DataFrame:
    """How much a proxy code says about the label: each code's commonest label on the training cells
    (``proxy_code_cells``), scored on the validation cells per purity bin (unseen codes: field)."""
    lookup = train.groupby("code")["cls"].agg(lambda s: s.value_counts().idxmax())
    guess = val["code"].map(lookup).fillna(CLASS_IDS["field"]).astype(int)
    right = (guess == val["cls"]).rename("accuracy")
    out = right.groupby(purity_bins(val["purity"]), observed=True).agg(["size", "mean"])
    out.loc["all"] = [len(right), right.mean()]
    return out.rename(columns={"size": "cells", "mean": "accuracy"}).rename_axis("bin").reset_index()


def confusions_by_block(frames: dict[str, pd.DataFrame], true: str, pred: str) -> pd.DataFrame:
    """Per spatial block: the cells of class ``true`` that each scorer labelled ``pred`` (one column per
    scorer, blocks with the model's most first), to see whether a class's errors are spread or sit in a
    few blocks. ``frames`` as :func:`answer_frames` returns them."""
    for name in (true, pred):
        if name not in CLASS_IDS:
            raise ValueError(f"unknown class {name!r}: use one of {', '.join(CLASSES)}")
    col = f"cm_{CLASS_IDS[true]}_{CLASS_IDS[pred]}"
    table = pd.DataFrame({name: df.groupby("block_id")[col].sum() for name, df in frames.items()})
    table[f"{true} cells"] = (
        next(iter(frames.values()))
        .groupby("block_id")[[f"cm_{CLASS_IDS[true]}_{j}" for j in range(len(CLASSES))]]
        .sum()
        .sum(axis=1)
    )
    return table.sort_values(MODEL, ascending=False, kind="stable").rename_axis("block_id").reset_index()
