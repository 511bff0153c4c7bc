"""Run-folder evaluation for notebook 06: find the methods in a run, score them on the same tiles,
and build the tables and the report.

Everything that reads paths lives here; :mod:`magseg_nb.metrics` stays pure (arrays and per-tile
counts in, scores out).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from skimage.measure import label as connected

from magseg_nb import files, layout, prompts
from magseg_nb.labels import CLASS_IDS, NODATA
from magseg_nb.metrics import (
    HEADLINE,
    PER_CLASS,
    bootstrap_scores,
    compare_methods,
    describe_difference,
    tile_counts,
    units_text,
)

# Every stage notebook 06 reads: 01 (truth, baselines), 02 (formats.json), 03/04 (training's eval.json),
# 05 (predictions). Declared so that a change in any of them reruns 06.
NEEDS = ("01_dataset_prep", "02_instruction_format", "03_sft", "04_grpo", "05_inference")
ALL_FIELD = "all-field"  # evaluate_method's semantic= for the trivial "field everywhere" baseline
WIRING = "wiring check, random weights"  # the label of every row computed with a random-weight model


def read_raster(path, what: str = "raster"):
    """(array of band 1, rasterio profile), with a clear error naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist: run the stage that writes it first")
    try:
        with rasterio.open(path) as src:
            return src.read(1), src.profile
    except rasterio.errors.RasterioIOError as err:
        raise ValueError(f"{what} {path} cannot be read ({err}); rerun the stage that writes it") from err


def _same_grid(gt_profile, pred_profile, path) -> None:
    same = (gt_profile["height"], gt_profile["width"]) == (pred_profile["height"], pred_profile["width"])
    if not same or not gt_profile["transform"].almost_equals(pred_profile["transform"]):
        raise ValueError(
            f"{path} is not on the scene grid (shape {pred_profile['height']}x{pred_profile['width']}, "
            f"transform {tuple(pred_profile['transform'])[:6]}; scene {gt_profile['height']}x{gt_profile['width']}, "
            f"{tuple(gt_profile['transform'])[:6]}): write predictions with the scene's transform"
        )


def evaluate_method(
    run01,
    tiles,
    semantic: dict | None,
    instances: dict | None,
    boundary_tol_px: float = 2.0,
    boundary_tol_m: float = 1.0,
    iou_threshold: float = 0.5,
):
    """Score one method on the given tiles; returns (counts, fields) DataFrames, one row per tile / field.

    ``semantic`` / ``instances`` map scene_id -> predicted GeoTIFF on the scene grid (semantic uint8
    with 255 outside inferred tiles; instances int32); ``semantic=ALL_FIELD`` scores "field" everywhere. ``instances=None`` takes connected components
    of the predicted field class as instances; ``semantic=None`` scores instances only. Instances are
    scored per tile: a field cut by a tile edge counts as its part inside each tile, on both sides.
    """
    run01 = Path(run01)
    counts, fields = [], []
    for scene_id, group in tiles.groupby("scene_id", sort=True):
        folder = run01 / "scenes" / str(scene_id)
        gt_sem, prof = read_raster(folder / layout.SCENE_FILES["semantic"], "ground-truth semantic mask")
        gt_inst, _ = read_raster(folder / "instances.tif", "ground-truth instance mask")
        pixel = abs(prof["transform"].a)
        pred_sem = pred_inst = None
        if semantic == ALL_FIELD:  # the trivial baseline: "field" on every labelled pixel
            pred_sem = np.where(gt_sem != NODATA, CLASS_IDS["field"], NODATA).astype(np.uint8)
        elif semantic is not None:
            pred_sem, p = read_raster(semantic[scene_id], "predicted semantic mask")
            _same_grid(prof, p, semantic[scene_id])
        if instances is not None:
            pred_inst, p = read_raster(instances[scene_id], "predicted instance mask")
            _same_grid(prof, p, instances[scene_id])
        for t in group.itertuples():
            win = np.s_[t.row_off : t.row_off + t.height, t.col_off : t.col_off + t.width]
            ps = None if pred_sem is None else pred_sem[win]
            pi = connected(ps == CLASS_IDS["field"], connectivity=1) if pred_inst is None else pred_inst[win]
            c, f, _ = tile_counts(
                gt_sem[win],
                ps,
                gt_inst[win],
                pi,
                pixel,
                boundary_tol_px,
                boundary_tol_m,
                iou_threshold,
                return_tables=True,
            )
            meta = {
                "tile_id": t.tile_id,
                "scene_id": scene_id,
                "country": getattr(t, "country", ""),
                "block_id": getattr(t, "block_id", t.tile_id),
            }
            counts.append({**meta, **c})
            fields.append(f.assign(**meta))
    fields = pd.concat(fields, ignore_index=True) if fields else pd.DataFrame()
    return pd.DataFrame(counts), fields


def discover_methods(run01, run05, random_weight_refinement: bool = False) -> list[dict]:
    """The methods to score: each 05_inference variant coarse and refined, and the baselines
    (all-field, the per-pixel classifier of notebook 01 when present, the watershed).

    Coarse masks get connected-component instances; refined masks come with 05's instances/ rasters.
    With ``random_weight_refinement`` (05 refined with a random-weight SAM) the refined rows are
    named and flagged as wiring checks (``wiring``), never results.
    Each entry: name, variant, format, training, refinement, semantic, instances, tile_ids (or None),
    wiring, baseline.
    """
    run01, run05 = Path(run01), Path(run05)
    methods = []
    for vdir in sorted(p for p in run05.iterdir() if p.is_dir()) if run05.exists() else []:
        fmt, _, training = vdir.name.rpartition("-")
        tiles_csv = vdir / layout.TILES_CSV
        ids = set(pd.read_csv(tiles_csv)["tile_id"].astype(str)) if tiles_csv.exists() else None
        for refinement in ("coarse", "refined"):
            sem = {p.stem: p for p in sorted((vdir / refinement).glob("*.tif"))}
            if not sem:
                continue
            inst = (
                {p.stem: p for p in sorted((vdir / "instances").glob("*.tif"))}
                if refinement == "refined"
                else None
            )
            wiring = random_weight_refinement and refinement == "refined"
            methods.append(
                {
                    "name": f"{vdir.name} {refinement}" + (f" ({WIRING})" if wiring else ""),
                    "variant": vdir.name,
                    "format": fmt or vdir.name,
                    "training": training,
                    "refinement": refinement,
                    "semantic": sem,
                    "instances": inst or None,
                    "tile_ids": ids,
                    "wiring": wiring,
                    "baseline": False,
                }
            )
    pixel = {p.stem: p for p in sorted((run01 / "pixel_baseline" / "semantic").glob("*.tif"))}
    if pixel:  # its instances: the model pipeline's watershed on its field mask (pixel_baseline)
        pixel_inst = {p.stem: p for p in sorted((run01 / "pixel_baseline" / "instances").glob("*.tif"))}
        methods.append(_baseline_method(PIXEL_BASELINE, "pixel classifier", pixel, pixel_inst or None))
    scenes = {p.name: p for p in sorted((run01 / "scenes").glob("*")) if p.is_dir()}
    if scenes:
        methods.append(_baseline_method(ALL_FIELD_BASELINE, "all-field", ALL_FIELD, None, scenes))
    base = {
        p.name.removesuffix("_instances.tif"): p
        for p in sorted((run01 / layout.BASELINE_DIR).glob("*_instances.tif"))
    }
    if base:
        methods.append(_baseline_method("watershed baseline", "watershed", None, base))
    return methods


PIXEL_BASELINE = "pixel classifier baseline"


ALL_FIELD_BASELINE = "all-field baseline"


def _baseline_method(name: str, kind: str, semantic, instances, scenes=None) -> dict:
    return {
        "name": name,
        "variant": "baseline",
        "format": kind,
        "training": "none",
        "refinement": kind,
        "semantic": semantic,
        "instances": instances,
        "scenes": set(scenes or semantic or instances),
        "tile_ids": None,
        "wiring": False,
        "baseline": True,
    }


def common_tiles(tiles, methods: list[dict], split: str = "test"):
    """The tiles of ``split`` that every method has predictions for (so all are scored on the same set)."""
    keep = tiles[tiles["split"] == split] if "split" in tiles else tiles
    keep = keep.assign(tile_id=keep["tile_id"].astype(str))
    for m in methods:
        scenes = m.get("scenes") or set((m["semantic"] or m["instances"]).keys())
        keep = keep[keep["scene_id"].astype(str).isin(scenes)]
        if m["tile_ids"] is not None:
            keep = keep[keep["tile_id"].isin(m["tile_ids"])]
    return keep.reset_index(drop=True)


def comparison_masks(choice: str, sam_backend: str | None) -> str:
    """Which masks the ablation compares models on: "coarse" or "refined".

    "auto" takes the coarse masks when notebook 05 refined with no SAM or with the random-weight tiny
    SAM (whose changes are noise), and the refined masks when a real SAM checkpoint was used.
    """
    if choice in ("coarse", "refined"):
        return choice
    if choice != "auto":
        raise ValueError(f"compare_masks must be 'auto', 'coarse' or 'refined', not {choice!r}")
    return "coarse" if sam_backend in (None, "", "none", "tiny") else "refined"


def main_method(methods: list[dict], masks: str = "refined") -> dict:
    """The method the figures focus on: MAgSeg after GRPO if present, else after SFT, else any model
    on ``masks``; never a wiring check."""
    by_name = {m["name"]: m for m in methods if not m.get("wiring")}
    for name in (f"magseg-grpo {masks}", f"magseg-sft {masks}"):
        if name in by_name:
            return by_name[name]
    usable = [m for m in by_name.values() if not m.get("baseline")] or list(by_name.values())
    return next((m for m in usable if m["refinement"] == masks), usable[0])


def score_table(
    results: dict,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    by: str | None = None,
    cluster: str | None = "block_id",
):
    """Long table (method, group, metric, value, lo, hi, n_tiles, n_units, resampled) for every method,
    overall or per ``by``; intervals resample whole spatial blocks unless ``cluster=None`` (tiles).

    ``results`` maps a method name to its per-tile counts (from :func:`evaluate_method`); ``by`` is a
    column of the counts such as "country" or "scene_id" (None = all tiles, group "all").
    """
    parts = []
    for name, counts in results.items():
        groups = [("all", counts)] if by is None else list(counts.groupby(by, sort=True))
        for group, sub in groups:
            table = bootstrap_scores(sub, n_boot, ci, seed, cluster=cluster)
            parts.append(table.assign(method=name, group=str(group)))
    cols = ["method", "group", "metric", "value", "lo", "hi", "n_tiles", "n_units", "resampled"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def wide_table(long, metrics=HEADLINE, index=("method",), digits: int = 3):
    """Readable pivot: one row per method (and group), one column per metric, "value [lo, hi]"."""
    df = long[long["metric"].isin(metrics)].copy()
    df["cell"] = [
        "n/a" if np.isnan(v) else f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
        for v, lo, hi in zip(df["value"], df["lo"], df["hi"], strict=True)
    ]
    out = df.pivot_table(index=list(index), columns="metric", values="cell", aggfunc="first", sort=False)
    return out.reindex(columns=[m for m in metrics if m in out.columns])


def ablation_pairs(methods: list[dict], masks: str = "refined") -> list[tuple[str, str, str]]:
    """(question, method A, method B) pairs that differ in one factor, among the methods present.

    Refinement (coarse -> refined, per variant: superpixels, self-trained or SAM), then on ``masks``
    ("coarse" or "refined"): GRPO after SFT (per format), the MAgSeg format vs the Text4Seg format (same
    training), and each model vs the watershed baseline.
    """
    names = {m["name"] for m in methods}
    wiring = {m["name"] for m in methods if m.get("wiring")}
    variants = sorted({m["variant"] for m in methods if m["variant"] != "baseline"})
    pairs = []
    for v in variants:
        refined = next((n for n in names if n.startswith(f"{v} refined")), None)
        if f"{v} coarse" in names and refined:
            question = "Refinement" + (f" ({WIRING})" if refined in wiring else "")
            pairs.append((question, f"{v} coarse", refined))
    for fmt in sorted({v.rpartition("-")[0] for v in variants}):
        if {f"{fmt}-sft {masks}", f"{fmt}-grpo {masks}"} <= names:
            pairs.append(("GRPO after SFT", f"{fmt}-sft {masks}", f"{fmt}-grpo {masks}"))
    for training in ("sft", "grpo"):
        if {f"text4seg-{training} {masks}", f"magseg-{training} {masks}"} <= names:
            pairs.append(
                ("MAgSeg vs Text4Seg format", f"text4seg-{training} {masks}", f"magseg-{training} {masks}")
            )
    for baseline, question in (
        (ALL_FIELD_BASELINE, "vs all-field"),
        (PIXEL_BASELINE, "vs pixel classifier"),
        ("watershed baseline", "vs classical watershed"),
    ):
        if baseline in names:
            for v in variants:
                if f"{v} {masks}" in names:
                    pairs.append((question, baseline, f"{v} {masks}"))
    return pairs


def ablation_table(
    results: dict,
    pairs,
    metrics=HEADLINE,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    cluster: str | None = "block_id",
):
    """Paired differences (B - A) with intervals (whole blocks resampled unless ``cluster=None``)
    for every ablation pair, plus a one-line reading each."""
    parts = []
    for question, a, b in pairs:
        diff = compare_methods(results[a], results[b], metrics, n_boot, ci, seed, cluster=cluster)
        diff["reading"] = [describe_difference(r, a, b) for _, r in diff.iterrows()]
        parts.append(diff.assign(question=question, method_a=a, method_b=b))
    cols = [
        "question",
        "method_a",
        "method_b",
        "metric",
        "a",
        "b",
        "diff",
        "lo",
        "hi",
        "n_tiles",
        "n_units",
        "resampled",
        "reading",
    ]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def ablation_reading(ablation, metrics=("iou_field", "inst_f1", "boundary_m_f1")) -> list[str]:
    """Short bullet points generated from the ablation numbers (nothing hard-coded about the result).

    A difference is reported only when its paired interval excludes zero; the metrics here are all
    "higher is better", so the sign of the interval says which method is better.
    """
    lines = []
    for (question, a, b), grp in ablation.groupby(["question", "method_a", "method_b"], sort=False):
        sub = grp.set_index("metric").reindex(list(metrics)).dropna(subset=["diff"])
        if sub.empty:
            continue
        if WIRING in question or WIRING in a or WIRING in b:
            lines.append(f"**{question}** ({a} → {b}): not a result (a {WIRING}); no conclusion is drawn.")
            continue
        clear = sub[(sub["lo"] > 0) | (sub["hi"] < 0)]
        verdict = (
            "no difference that this data can resolve"
            if clear.empty
            else "; ".join(
                f"{m} {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] ({b if r['lo'] > 0 else a} better)"
                for m, r in clear.iterrows()
            )
        )
        lines.append(f"**{question}** ({a} → {b}, {units_text(sub.iloc[0])}): {verdict}.")
    return lines


def effective_resolution(run02, tile_px: int, res_m: float):
    """Label cells per tile side and metres per cell of each instruction format (02's formats.json)."""
    rows = []
    for fmt, rec in sorted(prompts.read_formats(run02).items()):
        cells = rec["cells_per_tile_side"]
        rows.append(
            {
                "format": fmt,
                "grid": rec["grid"],
                "patch_layout": rec["patch_layout"],
                "cells_per_tile_side": cells,
                "metres_per_cell": tile_px * res_m / cells if cells else np.nan,
            }
        )
    return pd.DataFrame(rows)


def read_eval_jsons(run_dir) -> pd.DataFrame:
    """Scalar entries of 03_sft/<format>/eval.json and 04_grpo/<format>/eval.json, one row per file."""
    rows = []
    for path in sorted(Path(run_dir).glob("0[34]_*/*/eval.json")):
        data = json.loads(path.read_text())
        flat = pd.json_normalize(data, sep=".").iloc[0].to_dict() if isinstance(data, dict) else {}
        scalars = {k: v for k, v in flat.items() if isinstance(v, int | float | str | bool)}
        rows.append({"stage": path.parent.parent.name, "format": path.parent.name, **scalars})
    return pd.DataFrame(rows)


def markdown_table(df, index: bool = True) -> str:
    """A pandas frame as a GitHub markdown table (without the optional tabulate dependency)."""
    df = df.reset_index() if index else df
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _cell(v) -> str:
    if isinstance(v, float):
        return "n/a" if np.isnan(v) else f"{v:.3f}"
    return str(v).replace("|", "/")


def write_report(path, title: str, sections: list[tuple[str, object]]) -> Path:
    """report.md: a title, then (heading, DataFrame | text | list of lines) sections; atomic write."""
    parts = [f"# {title}", ""]
    for heading, content in sections:
        parts += [f"## {heading}", ""]
        if isinstance(content, pd.DataFrame):
            has_index = any(name is not None for name in content.index.names)  # a row number is not shown
            parts.append(markdown_table(content, index=has_index) if len(content) else "(none)")
        elif isinstance(content, list | tuple):
            parts += [f"- {line}" for line in content]
        else:
            parts.append(str(content))
        parts.append("")
    return files.write_text(path, "\n".join(parts))


def interval_comparison(by_tile, by_block, metric_names) -> pd.DataFrame:
    """Side by side, per method and metric: the tile-resampled and the block-resampled interval and
    their widths (``score_table`` with ``cluster=None`` and with ``cluster="block_id"``)."""
    keys = ["method", "group", "metric"]
    a = by_tile[by_tile["metric"].isin(metric_names)].set_index(keys)
    b = by_block.set_index(keys).reindex(a.index)
    out = pd.DataFrame(
        {
            "value": a["value"],
            "tile_lo": a["lo"],
            "tile_hi": a["hi"],
            "block_lo": b["lo"],
            "block_hi": b["hi"],
            "n_tiles": a["n_tiles"],
            "n_blocks": b["n_units"],
        }
    )
    out["width_ratio"] = (out["block_hi"] - out["block_lo"]) / (out["tile_hi"] - out["tile_lo"])
    return out.reset_index()


# --- notebook 06, one call per step ------------------------------------------------------------------


def methods_and_tiles(run01, run05, compare_masks: str, sam_backend: str | None):
    """(masks the models are compared on, the methods to score, the test tiles every method covers),
    with a clear error when there is nothing to score."""
    run01, run05 = Path(run01), Path(run05)
    masks = comparison_masks(compare_masks, sam_backend)
    methods = discover_methods(run01, run05, random_weight_refinement=sam_backend == "tiny")
    if not methods:
        raise RuntimeError(
            f"no predictions in {run05} and no baseline in {run01 / 'baseline'}: run notebooks 01 and 05"
        )
    tiles = common_tiles(pd.read_csv(run01 / layout.TILES_CSV), methods)
    if tiles.empty:
        raise RuntimeError(
            f"no test tile is covered by every method: check {run01 / 'tiles.csv'} and 05's tiles.csv"
        )
    return masks, methods, tiles


def methods_table(methods: list[dict]) -> pd.DataFrame:
    """One row per method: name, format, training, refinement, wiring."""
    return pd.DataFrame(
        [{k: m[k] for k in ("name", "format", "training", "refinement", "wiring")} for m in methods]
    )


def evaluate_methods(run01, tiles, methods: list[dict], **tolerances) -> tuple[dict, pd.DataFrame]:
    """(per-tile counts by method name, the per-field table of every method with a ``method`` column)."""
    evaluated = {
        m["name"]: evaluate_method(run01, tiles, m["semantic"], m["instances"], **tolerances) for m in methods
    }
    results = {name: counts for name, (counts, _) in evaluated.items()}
    fields = pd.concat([f.assign(method=name) for name, (_, f) in evaluated.items()], ignore_index=True)
    return results, fields


def scene_resolution(run01) -> float:
    """Metres per pixel of the prepared scenes (the first row of scenes.csv; NaN without it)."""
    path = Path(run01) / layout.SCENES_CSV
    return float(pd.read_csv(path)["res_m"].iloc[0]) if path.exists() else float("nan")


def n_blocks(tiles) -> int:
    """Spatial blocks among the scored tiles (each tile its own block without a block_id column)."""
    return int(tiles["block_id"].nunique() if "block_id" in tiles else len(tiles))


def reading(ablation, resolution, tiles, metrics=("iou_field", "inst_f1", "boundary_m_f1")) -> list[str]:
    """06's "what the numbers say": the ablation reading, a warning when the two formats ran at
    different effective resolutions, and how many tiles and blocks the intervals rest on."""
    lines = ablation_reading(ablation, metrics)
    same_res = resolution["cells_per_tile_side"].nunique() == 1 if len(resolution) == 2 else None
    if same_res is False:
        lines.append(
            "The two formats were **not** run at the same effective resolution (see the table above): read the format comparison with that in mind."
        )
    lines.append(
        f"All intervals rest on {len(tiles)} test tiles in {n_blocks(tiles)} spatial blocks; with few blocks they are wide, and a null result means 'not resolved', not 'equal'."
    )
    return lines


def save_tables(out, params: dict, overall, by_country, by_scene, fields, ablation, reading, tiles) -> Path:
    """metrics.csv (overall, per country, per scene), fields.csv, ablation.csv and metrics.json."""
    out = Path(out)
    long = pd.concat(
        [overall, by_country, by_scene.assign(group="scene:" + by_scene["group"])], ignore_index=True
    )
    long.to_csv(out / "metrics.csv", index=False)
    fields.to_csv(out / "fields.csv", index=False)
    ablation.to_csv(out / "ablation.csv", index=False)
    summary = {
        "params": params,
        "n_tiles": len(tiles),
        "n_blocks": n_blocks(tiles),
        "overall": overall.to_dict("records"),
        "ablation": ablation.to_dict("records"),
        "reading": reading,
    }
    return files.write_text(out / "metrics.json", json.dumps(summary, indent=2, default=str))


def write_metrics_report(
    out, profile: str, overall, by_country, interval_check, ablation, reading, resolution
) -> Path:
    """06's report.md: the tables, the reading, the effective resolution, the figures and the map."""
    out = Path(out)
    shown = ablation[["question", "method_a", "method_b", "metric", "a", "b", "diff", "lo", "hi"]]
    shown = shown[shown["metric"].isin(HEADLINE[:5]) | shown["metric"].isin(PER_CLASS)]
    return write_report(
        out / "report.md",
        f"MAgSeg metrics ({profile})",
        [
            ("Per class (value [95% interval, whole blocks resampled])", wide_table(overall, PER_CLASS)),
            ("Headline scores (value [95% interval, whole blocks resampled])", wide_table(overall)),
            ("Tile or block intervals (main method)", interval_check.round(3)),
            ("Per country", wide_table(by_country, index=("group", "method"))),
            ("Ablation (B - A, paired bootstrap over blocks)", shown),
            ("Reading", reading),
            ("Effective resolution", resolution),
            ("Figures", [f"![{p.stem}](figures/{p.name})" for p in sorted((out / "figures").glob("*.png"))]),
            ("Map", "map.html (offline, one file)"),
        ],
    )


def stage_summary(overall, tiles, methods: list[dict], reading: list[str]) -> dict:
    """06's state.json summary: tiles, blocks, methods, the best instance F1 among real results."""
    ranked = overall[(overall["metric"] == "inst_f1") & ~overall["method"].str.contains(WIRING, regex=False)]
    best = ranked.sort_values("value", ascending=False).iloc[0]
    return {
        "n_tiles": len(tiles),
        "n_blocks": n_blocks(tiles),
        "n_methods": len(methods),
        "best_inst_f1_method": best["method"],
        "best_inst_f1": round(float(best["value"]), 4),
        "reading": reading,
    }
