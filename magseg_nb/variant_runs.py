"""Notebook 05's variants over the test tiles: one after the other in the kernel, or side by side.

On a CPU without a GPU the variants run side by side, in as many processes as there are cores (at most
one per variant), each with its share of the cores: the tiny model's generation does not keep two
threads busy, so two one-thread processes finish sooner than one two-thread process doing both
(``benchmarks/bench_inference_side_by_side.py``: 0.78 of the time on two variants, 0.59 on notebook 05's
whole work, the same answers). The variants go to the processes so that their work is about even; the
map variant's whole-scene prediction runs in its process right after it (it reads that variant's scored
masks).

Each process is ``python -m magseg_nb.variant_runs --config <out>/side_by_side/<lane>.json``; its output
goes, prefixed with the lane's name, to the notebook and to ``<lane>.log``; it writes each variant's
folder as the kernel would, and the summaries to ``<lane>.summary.json`` (written last). A process that
fails raises, naming its log; the others are stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from magseg_nb import files, geo, inference, instances, refine, side_by_side, tile_conversations

LANES_DIR = "side_by_side"


@dataclasses.dataclass
class Plan:
    """What every variant's run needs, in plain values (a child process reads it from JSON)."""

    params: dict  # notebook 05's parameters (PARAMS)
    run_dir: str
    run01: str
    run02: str
    out_dir: str
    tile_ids: list[str]  # the test tiles to infer
    map_ids: list[str]  # scenes predicted whole for the map ([] for none)
    map_variant: str  # the variant that predicts them ("" for none)

    def tiles(self):
        table = geo.read_tiles_table(Path(self.run01))
        return table[table.tile_id.astype(str).isin(self.tile_ids)].sort_values("tile_id")


def make_plan(params: dict, run_dir, run01, run02, out_dir, tiles, chosen) -> Plan:
    """Notebook 05's plan: its parameters, folders, test ``tiles`` and the map scenes (``map_scenes``)
    with the variant that predicts them (``inference.map_variant`` of ``chosen``)."""
    map_ids = inference.map_scene_ids(
        geo.read_tiles_table(Path(run01)), tiles, params.get("map_scenes", "none")
    )
    map_v = inference.map_variant(chosen)
    if not map_ids or map_v is None:
        map_ids, map_v = [], None
    return Plan(
        dict(params), str(run_dir), str(run01), str(run02), str(out_dir), sorted(tiles.tile_id.astype(str)),
        [str(s) for s in map_ids], map_v.name if map_v else "",
    )  # fmt: skip


def lanes(names: Sequence[str], plan: Plan, cores: int) -> list[list[str]]:
    """The variants split over ``min(cores, len(names))`` processes with about even work: a variant
    counts 1, the map variant 1 more for its map-only tiles (scaled by their number and views)."""
    n = max(1, min(cores, len(names)))
    cost = dict.fromkeys(names, 1.0)
    if plan.map_variant in cost and plan.map_ids:
        all_tiles = geo.read_tiles_table(Path(plan.run01))
        extra = len(inference.map_only_tiles(all_tiles, plan.tiles(), plan.map_ids))
        views = plan.params["map_views"] / plan.params["test_views"]
        cost[plan.map_variant] += extra / max(1, len(plan.tile_ids)) * views
    out: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for name in sorted(names, key=lambda v: -cost[v]):  # stable: ties keep the given order
        k = load.index(min(load))
        out[k].append(name)
        load[k] += cost[name]
    return [lane for lane in out if lane]


def run_lane(plan: Plan, names: Sequence[str], log=print) -> dict[str, dict]:
    """Run the variants ``names`` one after the other in this process (the map variant also predicts
    the map scenes); returns {variant: summary}."""
    p = plan.params
    run01, run02, out = Path(plan.run01), Path(plan.run02), Path(plan.out_dir)
    chosen = inference.select_variants(inference.find_variants(Path(plan.run_dir)), list(names))
    tiles = plan.tiles()
    field_kw = instances.FieldSettings.from_params(p).kwargs()
    sam_kw = refine.SamSettings.from_params(p).kwargs()
    predictor = refine.load_sam(p["sam_backend"], p.get("sam_checkpoint") or None, p["device"], p["seed"])
    generate = tile_conversations.prefix_cached_generate if p.get("prefix_cache") else None
    summaries = {}
    for v in chosen:
        if log:
            log(f"{v.name}: {len(tiles)} test tiles, {p['test_views']} view(s)")
        spec = inference.format_spec(run02, v.fmt)
        model, processor = inference.load_variant(v, p.get("base_model") or None, p["device"])
        budget = p.get("max_new_tokens") or inference.answer_budget(processor, spec, run02)
        common = dict(
            batch_size=p["batch_size"], max_new_tokens=budget, max_nodata_frac=p["max_nodata_frac"], log=log
        )
        summaries[v.name] = inference.run_variant(
            model, processor, run01, tiles, spec, out / v.name, predictor, sam_kw, field_kw,
            generate=generate, test_views=p["test_views"], **common,
        )  # fmt: skip
        if v.name == plan.map_variant and plan.map_ids:
            if log:
                log(f"{v.name}: the map scenes {plan.map_ids}, {p['map_views']} view(s)")
            all_tiles = geo.read_tiles_table(run01)
            summaries[v.name].update(
                inference.run_map_scenes(
                    model,
                    processor,
                    run01,
                    all_tiles,
                    tiles,
                    plan.map_ids,
                    spec,
                    out / v.name,
                    predictor,
                    sam_kw,
                    field_kw,
                    test_views=p["map_views"],
                    **common,
                )
            )
            summaries[v.name]["map_views"] = p["map_views"]
        del model
    return summaries


def run(plan: Plan, names: Sequence[str], setting: bool | str = "auto") -> dict[str, dict]:
    """Every variant of ``names``: side by side in processes where ``setting`` allows it
    (``side_by_side.threads_each``), else one after the other in this process. {variant: summary}, in
    the order of ``names``."""
    cores = side_by_side.cpu_cores()
    parts = lanes(names, plan, cores)
    threads = side_by_side.threads_each(setting, len(parts), cores) if len(parts) > 1 else 0
    if not threads:
        return run_lane(plan, names)
    folder = Path(plan.out_dir) / LANES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    children = []
    for k, part in enumerate(parts):
        config = folder / f"lane{k}.json"
        files.write_json(config, {"plan": dataclasses.asdict(plan), "names": part})
        args = ["magseg_nb.variant_runs", "--config", str(config)]
        children.append(
            (part, side_by_side.start_child(f"lane{k}", args, threads, config.with_suffix(".log")))
        )
    print(f"{len(parts)} processes side by side, {threads} thread(s) each: {parts}", flush=True)
    summaries = {}
    try:
        for part, child in children:
            child.wait(f"inference of {', '.join(part)}")
            summary_file = child.log.with_suffix(".summary.json")
            summaries.update(json.loads(summary_file.read_text()))
    finally:  # an error or an interrupted cell stops the other processes
        for _, child in children:
            child.stop()
    return {name: summaries[name] for name in names}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m magseg_nb.variant_runs", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="a lane's JSON, written by variant_runs.run"
    )
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"config file {args.config} does not exist; notebook 05 writes it (variant_runs.run)")
    config = json.loads(args.config.read_text())
    summaries = run_lane(Plan(**config["plan"]), config["names"])
    files.write_json(args.config.with_suffix(".summary.json"), summaries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
