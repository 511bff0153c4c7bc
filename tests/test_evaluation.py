"""Run-folder evaluation (notebook 06's plumbing): methods found, scored on the same tiles, tables,
report, and the notebook itself on a synthetic run folder."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from rasterio.transform import from_origin

from magseg_nb import evaluation, metrics, prompts
from magseg_nb.labels import CLASSES

from .fixtures import RES, SIZE, make_synthetic_run, write_raster


def test_evaluate_methods_on_a_synthetic_run(synthetic_run):

    run01, run05 = synthetic_run / "01_dataset_prep", synthetic_run / "05_inference"
    methods = evaluation.discover_methods(run01, run05)
    names = [m["name"] for m in methods]
    assert names == [
        "magseg-grpo coarse",
        "magseg-grpo refined",
        "magseg-sft coarse",
        "magseg-sft refined",
        "text4seg-sft coarse",
        "text4seg-sft refined",
        "all-field baseline",
        "watershed baseline",
    ]
    tiles = evaluation.common_tiles(pd.read_csv(run01 / "tiles.csv"), methods)
    assert len(tiles) == 6 and "vn0_r0_c0" not in set(tiles["tile_id"])
    by_name = {m["name"]: m for m in methods}
    counts, fields = evaluation.evaluate_method(
        run01, tiles, by_name["magseg-sft refined"]["semantic"], by_name["magseg-sft refined"]["instances"]
    )
    assert len(counts) == 6 and set(counts["country"]) == {"Vietnam", "Cambodia"}
    # Every GT field piece in the scored tiles appears once in the field table.
    assert len(fields) == counts["n_gt"].sum() and {"tile_id", "scene_id", "iou"} <= set(fields.columns)
    table = metrics.bootstrap_scores(counts, n_boot=100).set_index("metric")
    assert 0.5 < table.loc["iou_field", "value"] <= 1 and 0 < table.loc["inst_f1", "value"] < 1
    base_counts, _ = evaluation.evaluate_method(
        run01, tiles, None, by_name["watershed baseline"]["instances"]
    )
    diff = metrics.compare_methods(base_counts, counts, n_boot=100)
    assert list(diff["metric"]) == list(metrics.HEADLINE)
    text = metrics.describe_difference(diff[diff["metric"] == "inst_f1"].iloc[0], "baseline", "sft")
    assert text.startswith("inst_f1: sft")
    assert gpd.read_file(run05 / "magseg-sft" / "fields.gpkg", layer="fields").crs.to_epsg() == 32648
    # The all-field baseline labels every scored pixel "field": its field recall is 1, its accuracy
    # the share of field pixels.
    allf, _ = evaluation.evaluate_method(run01, tiles, evaluation.ALL_FIELD, None)
    t = metrics.bootstrap_scores(allf, n_boot=20).set_index("metric")["value"]
    cm = allf.filter(like="cm_").sum()
    assert t["recall_field"] == 1.0 and t["dice_tree"] == 0.0
    assert t["pixel_accuracy"] == pytest.approx(cm["cm_1_1"] / cm.sum())


def test_random_weight_rows_are_wiring_checks_never_results(synthetic_run):

    run01, run05 = synthetic_run / "01_dataset_prep", synthetic_run / "05_inference"
    methods = evaluation.discover_methods(run01, run05, random_weight_refinement=True)
    wiring = [m["name"] for m in methods if m["wiring"]]
    assert wiring and all(n.endswith("(wiring check, random weights)") and " refined" in n for n in wiring)
    assert evaluation.main_method(methods, "refined")["name"] == "magseg-grpo coarse"
    tiles = evaluation.common_tiles(pd.read_csv(run01 / "tiles.csv"), methods)
    results = {
        m["name"]: evaluation.evaluate_method(run01, tiles, m["semantic"], m["instances"])[0] for m in methods
    }
    pairs = evaluation.ablation_pairs(methods, "coarse")
    sam = [p for p in pairs if p[0].startswith("Refinement")]
    assert sam and all("wiring check" in q for q, _, _ in sam)
    reading = evaluation.ablation_reading(evaluation.ablation_table(results, pairs, n_boot=30, cluster=None))
    for line in reading:
        if line.startswith("**Refinement"):
            assert "not a result" in line and "better" not in line


def test_evaluate_method_rejects_a_prediction_off_the_scene_grid(synthetic_run, tmp_path):

    run01 = synthetic_run / "01_dataset_prep"
    bad = tmp_path / "vn0.tif"
    write_raster(bad, np.zeros((SIZE, SIZE), np.uint8), from_origin(0, 0, RES, RES))
    tiles = pd.read_csv(run01 / "tiles.csv").query("scene_id == 'vn0'")
    with pytest.raises(ValueError, match="not on the scene grid"):
        evaluation.evaluate_method(run01, tiles, {"vn0": bad}, None)
    with pytest.raises(FileNotFoundError, match="missing.tif does not exist"):
        evaluation.evaluate_method(run01, tiles, {"vn0": tmp_path / "missing.tif"}, None)


def test_analysis_tables_figures_and_report(synthetic_run, tmp_path):
    import matplotlib

    matplotlib.use("Agg")

    from magseg_nb.viz import metrics as vizm

    run01, run05 = synthetic_run / "01_dataset_prep", synthetic_run / "05_inference"
    methods = evaluation.discover_methods(run01, run05)
    tiles = evaluation.common_tiles(pd.read_csv(run01 / "tiles.csv"), methods)
    evaluated = {
        m["name"]: evaluation.evaluate_method(run01, tiles, m["semantic"], m["instances"]) for m in methods
    }
    results = {k: v[0] for k, v in evaluated.items()}
    overall = evaluation.score_table(results, n_boot=50)
    assert set(overall["method"]) == set(results) and (overall["group"] == "all").all()
    by_country = evaluation.score_table(results, n_boot=50, by="country")
    assert set(by_country["group"]) == {"Vietnam", "Cambodia"}
    wide = evaluation.wide_table(overall)
    assert (
        wide.loc["watershed baseline", "miou"] == "n/a" and "[" in wide.loc["magseg-sft refined", "inst_f1"]
    )
    pairs = evaluation.ablation_pairs(methods)
    assert ("GRPO after SFT", "magseg-sft refined", "magseg-grpo refined") in pairs
    assert ("MAgSeg vs Text4Seg format", "text4seg-sft refined", "magseg-sft refined") in pairs
    assert ("Refinement", "magseg-sft coarse", "magseg-sft refined") in pairs
    assert ("vs classical watershed", "watershed baseline", "magseg-grpo refined") in pairs
    ablation = evaluation.ablation_table(results, pairs, n_boot=50)
    reading = evaluation.ablation_reading(ablation)
    assert len(reading) == len(pairs) and all(line.startswith("**") for line in reading)
    grpo = next(line for line in reading if line.startswith("**GRPO"))
    row = ablation.query("question == 'GRPO after SFT' and metric == 'inst_f1'").iloc[0]
    if row["lo"] > 0:
        assert "inst_f1" in grpo and "(magseg-grpo refined better)" in grpo
    elif row["hi"] >= 0:
        assert "inst_f1" not in grpo
    main = evaluation.main_method(methods)
    assert main["name"] == "magseg-grpo refined"
    fields = pd.concat([v[1].assign(method=k) for k, v in evaluated.items()], ignore_index=True)
    curve = metrics.recall_by_size(fields[fields["method"] == main["name"]], n_boot=50)
    assert curve["n_fields"].sum() == results[main["name"]]["n_gt"].sum()
    assert ((curve["lo"] <= curve["recall"]) & (curve["recall"] <= curve["hi"])).all()
    figs = {
        "bars": vizm.per_class_bars(overall, "iou"),
        "headline": vizm.headline_bars(overall, ["miou", "inst_f1"]),
        "gallery": vizm.error_gallery(
            run01, tiles, metrics.per_tile_scores(results[main["name"]]), main, n=2
        ),
        "size": vizm.recall_vs_size({"x": curve}),
    }
    n_methods = overall["method"].nunique()
    first = overall[overall["method"] == overall["method"].iloc[0]].set_index("metric")["value"]
    bars = figs["bars"].axes[0].patches
    assert len(bars) == n_methods * len(CLASSES)
    heights = [b.get_height() for b in bars[: len(CLASSES)]]
    assert np.allclose(heights, [first[f"iou_{c}"] for c in CLASSES], equal_nan=True)
    assert [t.get_text() for t in figs["headline"].axes[0].get_xticklabels()] == ["miou", "inst_f1"]
    assert len(figs["headline"].axes[0].patches) == n_methods * 2
    for name, fig in figs.items():
        assert vizm.save(fig, tmp_path / "figures", name).stat().st_size > 1000
    assert len(figs["gallery"].axes) == 6
    report = evaluation.write_report(
        tmp_path / "report.md", "t", [("Overall", wide), ("Reading", reading), ("Empty", pd.DataFrame())]
    )
    text = report.read_text()
    assert text.startswith("# t") and "| method | miou |" in text and "(none)" in text


def test_effective_resolution_and_training_eval(tmp_path):

    prompts.record_format(tmp_path / "02_instruction_format", "magseg", 16, "rle", 4, "crop")
    prompts.record_format(tmp_path / "02_instruction_format", "text4seg", 64, "rle", 1, "crop")
    res = evaluation.effective_resolution(
        tmp_path / "02_instruction_format", tile_px=256, res_m=0.5
    ).set_index("format")
    assert res.loc["magseg", "cells_per_tile_side"] == 64 and res.loc["text4seg", "metres_per_cell"] == 2.0
    (tmp_path / "03_sft" / "magseg").mkdir(parents=True)
    (tmp_path / "03_sft" / "magseg" / "eval.json").write_text(json.dumps({"val": {"dice": 0.7}, "n": 3}))
    ev = evaluation.read_eval_jsons(tmp_path)
    assert ev.loc[0, "stage"] == "03_sft" and ev.loc[0, "val.dice"] == 0.7


@pytest.mark.slow
def test_notebook_06_runs_on_a_synthetic_chain(tmp_path):
    """The notebook itself (papermill) on the synthetic 01/05 folders: every output file is written."""

    import papermill  # only this slow test starts a kernel

    root = Path(__file__).resolve().parents[1]
    run = make_synthetic_run(tmp_path / "runs" / "syn")
    papermill.execute_notebook(
        str(root / "notebooks" / "06_metrics.ipynb"),
        str(tmp_path / "out.ipynb"),
        parameters={"run_dir": str(run), "profile": "smoke", "n_boot": 100, "browser_screenshot": False},
        cwd=str(root / "notebooks"),
        kernel_name="python3",
        progress_bar=False,
    )
    out = run / "06_metrics"
    for name in (
        "metrics.csv",
        "metrics.json",
        "fields.csv",
        "ablation.csv",
        "map.html",
        "report.md",
        "figures/per_class_iou.png",
        "figures/worst_tiles.png",
        "figures/recall_vs_field_size.png",
    ):
        assert (out / name).stat().st_size > 0, name
    state = json.loads((out / "state.json").read_text())
    assert state["summary"]["n_tiles"] == 6 and state["summary"]["best_inst_f1_method"]
    assert "## Reading" in (out / "report.md").read_text()


def test_models_are_compared_on_coarse_masks_unless_a_real_sam_refined_them():
    assert evaluation.comparison_masks("auto", "tiny") == "coarse"
    assert evaluation.comparison_masks("auto", "none") == "coarse"
    assert evaluation.comparison_masks("auto", "vit_h") == "refined"
    assert evaluation.comparison_masks("refined", "tiny") == "refined"
    with pytest.raises(ValueError, match="compare_masks must be"):
        evaluation.comparison_masks("best", "tiny")
    methods = [
        {"name": f"{v} {r}", "variant": v, "refinement": r}
        for v in ("magseg-sft", "magseg-grpo", "text4seg-sft")
        for r in ("coarse", "refined")
    ] + [{"name": "watershed baseline", "variant": "baseline", "refinement": "baseline"}]
    pairs = evaluation.ablation_pairs(methods, "coarse")
    assert ("GRPO after SFT", "magseg-sft coarse", "magseg-grpo coarse") in pairs
    assert ("MAgSeg vs Text4Seg format", "text4seg-sft coarse", "magseg-sft coarse") in pairs
    assert ("vs classical watershed", "watershed baseline", "text4seg-sft coarse") in pairs
    assert ("Refinement", "magseg-grpo coarse", "magseg-grpo refined") in pairs
    assert not any("refined" in b for q, _, b in pairs if q != "Refinement")
    assert evaluation.main_method(methods, "coarse")["name"] == "magseg-grpo coarse"
