"""Notebook 05's variants side by side: how they are split, that a process writes what the kernel writes,
and the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from magseg_nb import chain, inference, prompts, side_by_side, variant_runs

from .test_inference import SPEC, blocky_semantic, make_run01

PARAMS = dict(
    base_model="", device="cpu", batch_size=8, max_new_tokens=6, max_nodata_frac=1.0, prefix_cache=False,
    test_views=1, map_views=1, sam_backend="superpixels", sam_checkpoint="", seed=0, min_field_px=8,
    watershed_markers="distance",
)  # fmt: skip
NAMES = ["magseg-sft", "magseg-grpo", "text4seg-sft"]


def _variants(*names):
    return [inference.Variant(n, n.split("-")[0], n.split("-")[1], Path("w"), True, "b") for n in names]


def _plan(root, out, map_ids=(), map_variant=""):
    scenes = {
        "s0": (blocky_semantic(64, 96), [(0, 0, "test"), (0, 32, "test"), (32, 0, "train"), (32, 32, "train"),
                                         (32, 64, "train"), (0, 64, "train")]),
        "s1": (blocky_semantic(32, 64, seed=1), [(0, 0, "test"), (0, 32, "train")]),
    }  # fmt: skip
    run01, tiles = make_run01(root, scenes)
    test = inference.select_test_tiles(tiles)
    params = {**PARAMS, "map_scenes": list(map_ids)}
    chosen = _variants(*([map_variant] if map_variant else []), "text4seg-sft")
    return variant_runs.make_plan(params, root, run01, root / "02_instruction_format", out, test, chosen)


def test_make_plan_names_the_map_scenes_and_their_variant(tmp_path):
    plan = _plan(tmp_path, tmp_path / "out", ["s1"], "magseg-grpo")
    assert (plan.map_ids, plan.map_variant) == (["s1"], "magseg-grpo")
    assert plan.tile_ids == ["s0_0_0", "s0_0_32", "s1_0_0"] and list(plan.tiles().tile_id) == plan.tile_ids
    test = inference.select_test_tiles(plan.tiles())
    first = variant_runs.make_plan(
        {"map_scenes": "first"}, tmp_path, plan.run01, "", "", test, _variants("magseg-sft", "magseg-grpo")
    )
    assert (first.map_ids, first.map_variant) == (["s0"], "magseg-grpo")  # GRPO's MAgSeg before SFT's
    none = variant_runs.make_plan(
        {"map_scenes": "none"}, tmp_path, plan.run01, "", "", test, _variants("magseg-sft")
    )
    assert (none.map_ids, none.map_variant) == ([], "")
    with pytest.raises(ValueError, match=r"map_scenes names unknown scenes \['s9'\]"):
        variant_runs.make_plan(
            {"map_scenes": ["s9"]}, tmp_path, plan.run01, "", "", test, _variants("magseg-sft")
        )


def test_lanes_even_out_the_work(tmp_path):
    plan = _plan(tmp_path, tmp_path / "out", ["s0"], "magseg-grpo")
    # three test tiles; the map scene s0 has four more tiles to predict, at 1 view of 1: cost 1 + 4/3
    assert variant_runs.lanes(NAMES, plan, cores=2) == [["magseg-grpo"], ["magseg-sft", "text4seg-sft"]]
    assert variant_runs.lanes(NAMES, plan, cores=8) == [["magseg-grpo"], ["magseg-sft"], ["text4seg-sft"]]
    assert variant_runs.lanes(NAMES, plan, cores=1) == [["magseg-grpo", "magseg-sft", "text4seg-sft"]]
    no_map = _plan(tmp_path / "b", tmp_path / "out")
    assert variant_runs.lanes(NAMES, no_map, cores=2) == [["magseg-sft", "text4seg-sft"], ["magseg-grpo"]]
    assert variant_runs.lanes(["magseg-sft"], no_map, cores=2) == [["magseg-sft"]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder: notebook 01's tiles, 02's formats, an (untrained) MAgSeg adapter in 03 and 04."""
    from peft import get_peft_model

    from magseg_nb import models

    root = tmp_path_factory.mktemp("run")
    base = models.resolve_model("tiny-gemma3", root / "models")
    prompts.record_format(
        root / "02_instruction_format", "magseg", SPEC.grid, SPEC.encoding, SPEC.patch_layout, "mark"
    )
    model, _ = models.load_model_and_processor(base, device="cpu")
    peft = get_peft_model(model, models.lora_config(r=2, alpha=4))
    for stage in ("03_sft", "04_grpo"):
        peft.save_pretrained(root / stage / "magseg" / "adapter")
    return root


@pytest.mark.slow
@pytest.mark.skipif(side_by_side.cpu_cores() < 2, reason="side by side needs two cores")
def test_side_by_side_writes_what_the_kernel_writes(tiny_run, tmp_path, capsys):
    import torch

    names = ["magseg-sft", "magseg-grpo"]
    plan = _plan(tiny_run, tmp_path / "sbs", ["s0"], "magseg-grpo")
    sbs = variant_runs.run(plan, names, True)
    printed = capsys.readouterr().out
    assert "2 processes side by side, 1 thread(s) each: [['magseg-grpo'], ['magseg-sft']]" in printed
    assert "[lane0]" in printed and "[lane1]" in printed  # each process's progress reaches the notebook
    lanes_dir = tmp_path / "sbs" / variant_runs.LANES_DIR
    assert sorted(p.name for p in lanes_dir.iterdir()) == [
        "lane0.json", "lane0.log", "lane0.summary.json", "lane1.json", "lane1.log", "lane1.summary.json"
    ]  # fmt: skip
    # the same plan in the kernel, with the processes' one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = variant_runs.run(_plan(tiny_run, tmp_path / "alone", ["s0"], "magseg-grpo"), names, False)
    finally:
        torch.set_num_threads(threads)
    assert list(sbs) == list(alone) == names
    timing = ("infer_s", "refine_s", "polygonize_s", "map_s")
    for name in names:
        assert {k: v for k, v in sbs[name].items() if k not in timing} == {
            k: v for k, v in alone[name].items() if k not in timing
        }
        a, b = tmp_path / "sbs" / name, tmp_path / "alone" / name
        assert (a / "answers.jsonl").read_bytes() == (b / "answers.jsonl").read_bytes()
        for scene in ("s0", "s1"):
            with (
                rasterio.open(a / "coarse" / f"{scene}.tif") as x,
                rasterio.open(b / "coarse" / f"{scene}.tif") as y,
            ):
                assert x.crs == y.crs and np.array_equal(x.read(1), y.read(1))
    assert sbs["magseg-grpo"]["map_tiles"] == 4 and sbs["magseg-grpo"]["map_views"] == 1
    assert "map_tiles" not in sbs["magseg-sft"]
    map_tiles = pd.read_csv(tmp_path / "sbs" / "magseg-grpo" / "whole_scene" / "tiles.csv")
    assert sorted(map_tiles.tile_id) == ["s0_0_64", "s0_32_0", "s0_32_32", "s0_32_64"]


@pytest.mark.slow
@pytest.mark.skipif(side_by_side.cpu_cores() < 2, reason="side by side needs two cores")
def test_a_failed_process_names_its_log(tiny_run, tmp_path):
    root = tmp_path / "run"  # the run without its GRPO adapter
    for part in ("02_instruction_format", "03_sft"):
        shutil.copytree(tiny_run / part, root / part)
    plan = _plan(root, tmp_path / "broken")
    with pytest.raises(
        RuntimeError,
        match=r"inference of magseg-grpo failed \(exit 1\); its log is .*lane\d\.log; last line: .*magseg-grpo",
    ):
        variant_runs.run(plan, ["magseg-sft", "magseg-grpo"], True)


def test_the_command_line_names_a_missing_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        variant_runs.main(["--config", str(tmp_path / "lane0.json")])
    assert f"config file {tmp_path / 'lane0.json'} does not exist" in capsys.readouterr().err


def test_the_benchmark_plans_with_notebook_05s_own_parameters(tiny_run, tmp_path):
    """benchmarks/bench_inference_side_by_side.py times variant_runs with the parameters a run's 05 used."""
    import runpy

    bench = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "bench_inference_side_by_side.py"))
    root = tmp_path / "run"
    shutil.copytree(tiny_run, root)
    with pytest.raises(SystemExit, match=r"05_inference holds no finished stage: run notebook 05 first"):
        bench["plan_for"](root, ["magseg-sft"], 2, 4, tmp_path / "out")
    ran = _plan(root, tmp_path / "05", ["s0"], "magseg-grpo")  # notebook 05's plan, with its map
    (root / "05_inference").mkdir()  # the stage's record, as chain.Stage writes it (params, outputs)
    (root / "05_inference" / chain.STATE_FILE).write_text(json.dumps({"params": ran.params, "outputs": {}}))
    plan = bench["plan_for"](root, ["magseg-sft", "magseg-grpo"], 2, 4, tmp_path / "out")
    assert plan.params == {**ran.params, "map_scenes": "none", "test_views": 4}
    assert (plan.map_ids, plan.map_variant) == ([], "")
    # limit_tiles takes one tile of each scene first
    assert len(ran.tile_ids) == 3 and plan.tile_ids == ["s0_0_0", "s1_0_0"]
    assert plan.out_dir == str(tmp_path / "out") and plan.run01 == str(root / "01_dataset_prep")
