"""Notebook 07: accuracy against effective resolution (MAgSeg vs Text4Seg) and the context ablation.

Every run of the study trains a LoRA adapter with notebook 03's recipe (``training.sft_settings`` on
03's parameters, only the steps changed and equal for every run) on conversations written by
``prompts.write_conversations`` into the study's own folder, and answers the same validation tiles.
Scores are per tile: the cells of every answer summed per tile (``validation.answer_frames`` /
``validation.by_tile``) plus boundary counts of the stitched answer against the tile's *pixel* mask,
so MAgSeg's patches and Text4Seg's single answer are scored on the same cells and the same pixels.
Intervals resample whole spatial blocks (``metrics.bootstrap_scores`` / ``compare_methods`` with
``cluster="block_id"``); the sentences stating a finding are generated from those intervals.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from magseg_nb import geo, layout, metrics, prompts, textgrid, training, validation
from magseg_nb.labels import NODATA

METRICS = (*validation.METRICS, "boundary_px_f1")
BASELINE_METRICS = validation.METRICS  # baselines give cells, not a stitched mask
HEADLINE = ("mdice", "boundary_px_f1")


@dataclass(frozen=True)
class Setting:
    """One trained run: format, effective resolution (cells per tile side), layout, grid, variant."""

    fmt: str
    resolution: int
    patch_layout: int
    grid: int
    variant: str

    @property
    def name(self) -> str:
        tail = f"_{self.variant}" if self.fmt == "magseg" else ""
        return f"{self.fmt}_r{self.resolution}{tail}"

    @property
    def conversations_per_tile(self) -> int:
        return self.patch_layout**2


def _magseg(resolution: int, magseg_grid: int, variant: str) -> Setting:
    if resolution % magseg_grid or resolution // magseg_grid < 2:
        raise ValueError(
            f"resolution {resolution} must be a multiple of magseg_grid ({magseg_grid}) with at least "
            f"2 patches per side (MAgSeg writes {magseg_grid}x{magseg_grid} cells a patch)"
        )
    if variant not in prompts.ALL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {prompts.ALL_VARIANTS}")
    return Setting("magseg", resolution, resolution // magseg_grid, magseg_grid, variant)


def resolution_settings(resolutions, magseg_grid: int, variant: str = "crop") -> list[Setting]:
    """Both formats at each effective resolution E: Text4Seg one E x E answer, MAgSeg (E/g)^2 patches
    of g x g cells (the patch grid stays fixed, as in the paper; the layout grows)."""
    if len(set(resolutions)) != len(resolutions) or not resolutions:
        raise ValueError(f"resolutions must be distinct and non-empty, got {resolutions}")
    out = []
    for res in sorted(resolutions):
        out.append(_magseg(res, magseg_grid, variant))
        out.append(Setting("text4seg", res, 1, res, "tile"))
    return out


def context_settings(variants, resolution: int, magseg_grid: int) -> list[Setting]:
    """MAgSeg at one resolution with each way of showing the patch (the context ablation)."""
    return [_magseg(resolution, magseg_grid, v) for v in variants]


def unique_settings(*groups) -> list[Setting]:
    """Settings in order, each once (the resolution study's MAgSeg run is also an ablation arm)."""
    return list(dict.fromkeys(s for g in groups for s in g))


# --- tiles ------------------------------------------------------------------------------------------


def select_tiles(table: pd.DataFrame, split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` tile ids of ``split`` taken round-robin over its spatial blocks in a seeded order, so a
    small subset still spans many blocks (the unit of the intervals); 0 or more than there are: all."""
    sub = table[table["split"] == split]
    ids = sub["tile_id"].astype(str).tolist()
    if n == 0 or n >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    blocks = list(dict.fromkeys(sub["block_id"].astype(str)))
    queues = {}
    for b in (blocks[i] for i in rng.permutation(len(blocks))):
        members = sub.loc[sub["block_id"].astype(str) == b, "tile_id"].astype(str).tolist()
        queues[b] = [members[i] for i in rng.permutation(len(members))]
    out: list[str] = []
    while len(out) < n:
        for q in queues.values():
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def study_tiles(run01, n_train: int, n_val: int, seed: int = 0) -> list[prompts.TileRecord]:
    """The training and validation tiles every run of the study uses (see :func:`select_tiles`)."""

    table = geo.read_tiles_table(run01)
    chosen = select_tiles(table, "train", n_train, seed) + select_tiles(table, "val", n_val, seed)
    if not chosen:
        raise ValueError(f"{run01}/tiles.csv has no train or val tiles")
    scenes = dict(zip(table["tile_id"], table["scene_id"], strict=True))
    splits = dict(zip(table["tile_id"], table["split"], strict=True))
    out = []
    for tile_id in chosen:
        tile = geo.read_tile(run01, tile_id)
        out.append(prompts.TileRecord(tile_id, scenes[tile_id], splits[tile_id], tile.image, tile.semantic))
    return out


def budget_note(steps: int, batch_size: int, tiles, run01, reference_steps) -> str:
    """The run's training budget in words, shown with its tables (a reduced budget is never silent).

    ``reference_steps``: this run's notebook 03 ``max_steps`` (an int, or format -> steps). A run whose
    03 trained less than the demo's recipe (the study profile runs it for one step) is compared with
    the recipe, and says so."""

    table = geo.read_tiles_table(run01)
    if isinstance(reference_steps, dict):
        reference_steps = max(reference_steps.values())
    recipe = training.SFTSettings.max_steps
    n = {s: sum(t.split == s for t in tiles) for s in ("train", "val")}
    total = {s: int((table["split"] == s).sum()) for s in ("train", "val")}
    reduced = steps < max(reference_steps, recipe) or n["train"] < total["train"] or n["val"] < total["val"]
    head = "REDUCED BUDGET: " if reduced else "Budget: "
    ref = (
        f"notebook 03 trains {reference_steps}"
        if reference_steps >= recipe
        else f"this run's notebook 03 trained {reference_steps}, the demo's {recipe}"
    )
    text = (
        f"{head}{steps} optimizer steps per run (batch {batch_size}; {ref}), "
        f"{n['train']} of {total['train']} training tiles, {n['val']} of {total['val']} validation tiles."
    )
    if reduced:
        text += " Short runs measure the machinery and early learning, not what the formats reach."
    return text


# --- training ---------------------------------------------------------------------------------------


def sft_params(params03: dict, max_steps: int, seed: int) -> dict:
    """Notebook 03's SFT parameters with the study's equal step count: no time budget (a cut run
    would break equal steps), one checkpoint at the end, every validation conversation answered, and
    the warmup at most a tenth of the run (03's 20 warmup steps would be half of a 40-step run)."""
    warmup = min(int(params03.get("warmup_steps", 0)), max(1, int(max_steps) // 10))
    return {
        **params03,
        "warmup_steps": warmup,
        "max_steps": int(max_steps),
        "seed": seed,
        "save_steps": int(max_steps),
        "time_budget_s": None,
        "max_train_examples": None,
        "eval_max_examples": None,
    }


def write_setting(tiles, conv_root, s: Setting, encoding: str) -> Path:
    """Write the conversations of one setting into ``conv_root/<name>/`` (JSONL + images)."""
    folder = Path(conv_root) / s.name
    variant = s.variant if s.fmt == "magseg" else "index"
    prompts.write_conversations(tiles, folder, s.fmt, s.grid, encoding, s.patch_layout, variant)
    return folder


def train(params: dict, s: Setting, base, conv_dir, out_dir) -> dict:
    """LoRA SFT of one setting with notebook 03's code, then its greedy validation answers."""
    return training.run_sft(training.sft_settings(params, s.fmt, base, conv_dir, out_dir))


# --- scoring ----------------------------------------------------------------------------------------


def cell_index(length: int, cells: int) -> np.ndarray:
    """For each of ``length`` pixels, the cell it falls in under ``prompts.downsample_mask``'s rule."""
    if length >= cells:
        starts = np.arange(cells) * length // cells
        return np.searchsorted(starts, np.arange(length), side="right") - 1
    return np.arange(length) * cells // length


def paint(grid, shape) -> np.ndarray:
    """A (cells x cells) grid spread over ``shape`` pixels (nearest, the cells of downsample_mask)."""
    grid = np.asarray(grid)
    return grid[np.ix_(cell_index(shape[0], grid.shape[0]), cell_index(shape[1], grid.shape[1]))]


def pixel_predictions(val_rows, answers: dict, shapes: dict) -> dict[str, np.ndarray]:
    """tile_id -> the answers of its conversations decoded and stitched at pixel resolution.

    Each answer fills its patch's pixel bounds (``prompts.patch_bounds``), the rule that built its
    target; Text4Seg's single answer fills the tile. Pixels of unanswered patches stay NODATA.
    """
    out: dict[str, np.ndarray] = {}
    for row in val_rows:
        ans = answers.get(str(row["id"]))
        tile_id = str(row["tile_id"])
        if ans is None or tile_id not in shapes:
            continue
        shape = shapes[tile_id]
        pred = out.setdefault(tile_id, np.full(shape, NODATA, np.uint8))
        gt = np.asarray(row["gt_mask"])
        mask = textgrid.decode(ans["answer"], shape=gt.shape).mask
        top, bottom, left, right = prompts.row_bounds(row, shape)
        pred[top:bottom, left:right] = paint(mask, (bottom - top, right - left))
    return out


def boundary_frame(preds: dict, semantics: dict, tolerance_px: float) -> pd.DataFrame:
    """tile_id + boundary counts ``b_*`` of each stitched prediction against the tile's pixel mask."""
    rows = []
    for tile_id, pred in preds.items():
        gt = np.asarray(semantics[tile_id])
        counts = metrics.boundary_counts(gt, pred, tolerance_px, valid=gt != NODATA)
        rows.append({"tile_id": tile_id, **counts})
    return pd.DataFrame(rows)


def tile_frames(val_jsonl, answers_jsonl, run01, semantics: dict, tolerance_px: float) -> dict:
    """scorer -> one row per validation tile (tile_id, block_id, cm_*; the model also b_*), and
    ``answers``: the per-answer model frame (well-formed share)."""
    frames = validation.answer_frames(val_jsonl, answers_jsonl, run01)
    out = {name: validation.by_tile(df) for name, df in frames.items()}
    rows = prompts.read_jsonl(val_jsonl)
    shapes = {t: np.asarray(s).shape for t, s in semantics.items()}
    preds = pixel_predictions(rows, validation.read_answers(answers_jsonl), shapes)
    bounds = boundary_frame(preds, semantics, tolerance_px)
    out[validation.MODEL] = out[validation.MODEL].merge(bounds, on="tile_id", how="left")
    out["answers"] = frames[validation.MODEL]
    return out


def run_record(s: Setting, result: dict, frames: dict, tokenizer, conv_dir: Path) -> dict:
    """One row of the runs table: the setting, steps, time, well-formed share and answer tokens."""
    lengths = prompts.answer_lengths(tokenizer, Path(conv_dir) / f"{s.fmt}_val.jsonl")
    n_tiles = len(frames[validation.MODEL])
    gen = (result.get("eval") or {}).get("generate_seconds")
    return {
        "run": s.name,
        **asdict(s),
        "conversations_per_tile": s.conversations_per_tile,
        "steps_planned": result.get("steps_planned"),
        "steps": result.get("steps"),
        "stopped_early": result.get("stopped_early"),
        "tokens_seen": result.get("tokens_seen"),
        "train_seconds": result.get("train_seconds"),
        "generate_seconds_per_tile": None if gen is None or not n_tiles else round(gen / n_tiles, 3),
        "well_formed": validation.valid_share({validation.MODEL: frames["answers"]}),
        "answer_tokens": round(float(lengths.mean()), 1),
        "answer_tokens_per_tile": round(float(lengths.mean()) * s.conversations_per_tile, 1),
        "val_tiles": n_tiles,
    }


def score_table(frames: dict, s: Setting, n_boot=1000, ci=0.95, seed=0) -> pd.DataFrame:
    """Long table (run, fmt, resolution, variant, scorer, metric, value, lo, hi, ...) of one run:
    the model with boundary F1, the baselines on the same cells; whole blocks resampled."""
    parts = []
    for scorer, df in frames.items():
        if scorer == "answers":
            continue
        names = METRICS if scorer == validation.MODEL else BASELINE_METRICS
        table = metrics.bootstrap_scores(df, n_boot, ci, seed, metrics=names, cluster="block_id")
        parts.append(table.assign(scorer=scorer))
    out = pd.concat(parts, ignore_index=True)
    return out.assign(run=s.name, fmt=s.fmt, resolution=s.resolution, variant=s.variant)


def compare_runs(frames_a: dict, frames_b: dict, n_boot=1000, ci=0.95, seed=0) -> pd.DataFrame:
    """Paired B - A of two runs' models on the validation tiles both answered, blocks resampled."""
    a, b = frames_a[validation.MODEL], frames_b[validation.MODEL]
    common = sorted(set(a["tile_id"]) & set(b["tile_id"]))
    a, b = (x[x["tile_id"].isin(common)] for x in (a, b))
    return metrics.compare_methods(a, b, METRICS, n_boot, ci, seed, cluster="block_id")


def run_setting(
    s: Setting,
    tiles,
    stage_dir,
    params,
    base,
    run01,
    semantics,
    tokenizer,
    encoding,
    boundary_tol_px=2.0,
    n_boot=1000,
    ci=0.95,
    seed=0,
) -> dict:
    """Write, train, answer and score one setting; returns result, frames, record and scores."""
    conv = write_setting(tiles, Path(stage_dir) / "conversations", s, encoding)
    out = Path(stage_dir) / "runs" / s.name
    result = train(params, s, base, conv, out)
    frames = tile_frames(conv / f"{s.fmt}_val.jsonl", out / layout.ANSWERS, run01, semantics, boundary_tol_px)
    record = run_record(s, result, frames, tokenizer, conv)
    return {
        "result": result,
        "frames": frames,
        "record": record,
        "scores": score_table(frames, s, n_boot, ci, seed),
    }


def format_diffs(done: dict, settings, n_boot=1000, ci=0.95, seed=0) -> dict[int, pd.DataFrame]:
    """resolution -> paired MAgSeg - Text4Seg table (``done``: run name -> :func:`run_setting`)."""
    by = {(s.fmt, s.resolution): s.name for s in settings}
    out = {}
    for res in sorted({s.resolution for s in settings}):
        if ("magseg", res) in by and ("text4seg", res) in by:
            a, b = done[by["text4seg", res]]["frames"], done[by["magseg", res]]["frames"]
            out[res] = compare_runs(a, b, n_boot, ci, seed)
    return out


def context_diffs(done: dict, settings, reference="crop", n_boot=1000, ci=0.95, seed=0) -> dict:
    """variant -> paired variant - ``reference`` table on the same tiles (the context ablation)."""
    ref = [s for s in settings if s.variant == reference]
    if not ref:
        raise ValueError(f"the context ablation needs the {reference!r} variant as its reference")
    base = done[ref[0].name]["frames"]
    return {
        s.variant: compare_runs(base, done[s.name]["frames"], n_boot, ci, seed)
        for s in settings
        if s.variant != reference
    }


def diff_table(diffs: dict, metrics_=HEADLINE) -> pd.DataFrame:
    """The paired tables side by side: key (resolution or variant), metric, a, b, diff, lo, hi."""
    parts = [d[d["metric"].isin(metrics_)].assign(key=k) for k, d in diffs.items()]
    cols = ["key", "metric", "a", "b", "diff", "lo", "hi", "n_tiles", "n_units"]
    return pd.concat(parts, ignore_index=True)[cols]


# --- findings ---------------------------------------------------------------------------------------


def _interval(r) -> str:
    return f"{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"


def crossing_sentence(diffs: dict[int, pd.DataFrame], metric: str = "mdice") -> str:
    """Where MAgSeg and Text4Seg cross on ``metric``, from the paired MAgSeg - Text4Seg tables per
    resolution: a crossing is claimed only between resolutions whose intervals both exclude zero
    with opposite signs; a sign change of the point estimates alone is called unresolved."""
    res = sorted(diffs)
    rows = {e: diffs[e].set_index("metric").loc[metric] for e in res}
    verdicts = {e: validation.verdict(diffs[e], metric) for e in res}
    each = "; ".join(f"{e} cells {_interval(rows[e])} ({verdicts[e]})" for e in res)
    head = f"{metric}, MAgSeg - Text4Seg per effective resolution: {each}. "
    resolved = [(e, verdicts[e]) for e in res if verdicts[e] != "not resolved"]
    for (e1, v1), (e2, v2) in zip(resolved, resolved[1:], strict=False):
        if v1 != v2:
            ahead = {"higher": "MAgSeg", "lower": "Text4Seg"}
            return head + (
                f"The formats cross between {e1} and {e2} cells per tile side: {ahead[v1]} is ahead at "
                f"{e1}, {ahead[v2]} at {e2} (both intervals exclude zero)."
            )
    signs = [np.sign(rows[e]["diff"]) for e in res if not np.isnan(rows[e]["diff"])]
    flips = any(a * b < 0 for a, b in zip(signs, signs[1:], strict=False))
    if not resolved:
        tail = "No resolution shows a difference this data can resolve, so no crossing is claimed"
        return head + tail + (" (the point estimates change sign)." if flips else ".")
    directions = {v for _, v in resolved}
    who = "MAgSeg" if directions == {"higher"} else "Text4Seg"
    where = ", ".join(str(e) for e, _ in resolved)
    tail = f"{who} is ahead wherever the interval excludes zero ({where} cells); the formats do not cross"
    tail += f" between {res[0]} and {res[-1]} cells per tile side"
    return head + tail + (" (the point estimates elsewhere change sign, unresolved)." if flips else ".")


def context_sentence(diff: pd.DataFrame, variant: str = "crop_only", reference: str = "crop") -> str:
    """Whether the whole tile helps: ``variant`` (no tile) against ``reference`` on mean Dice."""
    r = diff.set_index("metric").loc["mdice"]
    v = validation.verdict(diff, "mdice")
    where = metrics.units_text(r)
    if v == "lower":
        return (
            f"Without the tile ({variant}) mean Dice is {_interval(r)} against {reference} ({where}): "
            "the whole-tile context helps at this budget."
        )
    if v == "higher":
        return (
            f"Without the tile ({variant}) mean Dice is {_interval(r)} against {reference} ({where}): "
            "the whole-tile context did not help at this budget (it scored lower)."
        )
    return (
        f"Without the tile ({variant}) mean Dice changes {_interval(r)} against {reference} ({where}), "
        "not a difference this data can resolve: this run does not show that the whole-tile context helps."
    )


def wide(long: pd.DataFrame, metrics_=METRICS, index=("run", "scorer"), digits: int = 3) -> pd.DataFrame:
    """One row per (run, scorer), one column per metric: "value [lo, hi]"."""
    text = long.assign(
        cell=[
            "n/a" if np.isnan(v) else f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
            for v, lo, hi in zip(long["value"], long["lo"], long["hi"], strict=True)
        ]
    )
    out = text.pivot_table(index=list(index), columns="metric", values="cell", aggfunc="first", sort=False)
    return out.reindex(columns=[m for m in metrics_ if m in out.columns]).fillna("")


def summary(runs: pd.DataFrame, scores: pd.DataFrame, findings: list[str]) -> dict:
    """state.json summary: per run steps, mean Dice, boundary F1, well-formed share; the findings."""
    out: dict = {"runs": len(runs), "steps": sorted(set(runs["steps"].dropna().astype(int)))}
    model = scores[scores["scorer"] == validation.MODEL].set_index(["run", "metric"])["value"]
    for r in runs.itertuples():
        out[f"{r.run}_mdice"] = round(float(model.get((r.run, "mdice"), np.nan)), 4)
        out[f"{r.run}_boundary_f1"] = round(float(model.get((r.run, "boundary_px_f1"), np.nan)), 4)
        out[f"{r.run}_well_formed"] = round(float(r.well_formed), 4)
        out[f"{r.run}_stopped_early"] = bool(r.stopped_early)
    out["findings"] = list(findings)
    return json.loads(json.dumps(out, default=float))
