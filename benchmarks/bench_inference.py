"""Where the time of notebook 05 goes: model inference per tile, SAM refinement per tile, polygonization
per scene, all through the real code path (``inference.run_variant``) on one generated scene.

    .venv/bin/python benchmarks/bench_inference.py                       # tiny Gemma 3 + tiny SAM, CPU
    .venv/bin/python benchmarks/bench_inference.py --sam tiny vit_b   # also SAM ViT-B (random weights)
    .venv/bin/python benchmarks/bench_inference.py --adapter runs/demo/03_sft/magseg/adapter

Without ``--adapter`` the model is the random tiny Gemma 3: it rarely stops early, so every answer runs
to ``max_new_tokens`` (a worst case for generation time). ``vit_b`` with ``checkpoint=None`` weights is
random too: the timing is the real encoder's (the weights do not change the cost).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from magseg_nb import geo, inference, instances, landscape, models, refine


def synthetic_run01(root: Path, size: int, tile: int, seed: int = 0) -> tuple[Path, pd.DataFrame]:
    """One generated Vietnam scene, tiled without overlap, every tile in the test split."""
    run01 = root / "01_dataset_prep"
    scene = landscape.generate_scene("vn0", "vietnam", size=size, res_m=0.5, seed=seed)
    src = landscape.write_scene(scene, root / "sources" / "vn0")
    geo.prepare_scene(src["image"], src["labels"], run01 / "scenes" / "vn0")
    tiles, _ = geo.scan_tiles(run01 / "scenes" / "vn0", "vn0", "vietnam", tile, 0)
    tiles = tiles.assign(block_id="b0", split="test")
    geo.write_tiles(run01, tiles)
    return run01, tiles


def sam_predictor(backend: str, checkpoint: str | None):
    if backend == "vit_b" and checkpoint is None:
        from segment_anything import SamPredictor, sam_model_registry

        return SamPredictor(sam_model_registry["vit_b"](checkpoint=None).eval())  # random weights
    return refine.load_sam(backend, checkpoint, device="cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="scene side in px (0.5 m pixels)")
    ap.add_argument("--tile", type=int, default=128, help="tile side in px")
    ap.add_argument("--format", default="magseg", choices=["magseg", "text4seg"])
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--patch-layout", type=int, default=2)
    ap.add_argument("--encoding", default="rle", choices=["plain", "rle"])
    ap.add_argument("--prompt-variant", default="crop")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0: the longest well-formed answer")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--sam", nargs="+", default=["none", "tiny"], help="backends to time: none tiny vit_b vit_h"
    )
    ap.add_argument("--sam-checkpoint", default=None)
    ap.add_argument(
        "--adapter", default=None, help="a trained adapter folder (default: the random tiny model)"
    )
    ap.add_argument("--models-dir", default="runs/bench/models")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # a measurement setting: on a loaded 2-core machine it matters

    spec = inference.FormatSpec(args.format, args.grid, args.patch_layout, args.encoding, args.prompt_variant)
    if args.adapter:
        base = inference.adapter_base(Path(args.adapter))
        model, processor = models.load_model_and_processor(base, adapter_dir=args.adapter, device="cpu")
    else:
        base = models.resolve_model("tiny-gemma3", Path(args.models_dir))
        model, processor = models.load_model_and_processor(base, device="cpu")
    budget = args.max_new_tokens or inference.answer_budget(processor, spec)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run01, tiles = synthetic_run01(Path(tmp), args.size, args.tile)
        print(f"scene {args.size}x{args.size} px, {len(tiles)} tiles of {args.tile} px "
              f"(prepared in {time.perf_counter() - t0:.1f} s); {spec}; max_new_tokens={budget}")  # fmt: skip
        out = Path(tmp) / "05"
        t0 = time.perf_counter()
        s = inference.run_variant(
            model, processor, run01, tiles, spec, out, None, None, {"min_area_px": 16}, args.batch_size,
            budget, log=None,
        )  # fmt: skip
        total = time.perf_counter() - t0
        n, scenes = s["tiles_inferred"], s["scenes"]
        print(
            f"{n} tiles, {s['answers']} answers ({s['malformed']} malformed), {s['fields']} fields, {total:.1f} s"
        )
        io = total - s["infer_s"] - s["polygonize_s"]
        # The model's mask may hold no field at all (random model): time the fields of the true mask too.
        truth, crs, transform = instances.read_mask(geo.scene_paths(run01, "vn0")["semantic"])
        t0 = time.perf_counter()
        _, gt_fields = instances.scene_fields(truth, transform, crs, "vn0", tiles=tiles, min_area_px=16)
        gt_poly_s = time.perf_counter() - t0
        coarse, _, _ = instances.read_mask(out / "coarse" / "vn0.tif")
        conf, _, _ = instances.read_mask(out / "confidence" / "vn0.tif")
        for backend in args.sam:
            predictor = sam_predictor(backend, args.sam_checkpoint)
            t0 = time.perf_counter()
            inference.refine_scene(run01, tiles, coarse, conf, predictor, iterations=2)
            sam_s = time.perf_counter() - t0
            parts = [
                ("model inference", s["infer_s"], "tile", n),
                (f"SAM refinement ({backend})", sam_s, "tile", n),
                ("instances + polygons", s["polygonize_s"], "scene", scenes),
                ("reading/writing rasters, tables", io, "scene", scenes),
            ]
            whole = sum(p[1] for p in parts)
            parts.append(
                (f"instances + polygons of the true mask ({len(gt_fields)} fields)", gt_poly_s, "scene", 1)
            )
            for part, secs, unit, per in parts:
                rows.append(
                    {"sam": backend, "part": part, "seconds": round(secs, 2),
                     "per_unit_s": round(secs / max(per, 1), 3), "unit": unit,
                     "share_%": round(100 * secs / whole, 1)}
                )  # fmt: skip
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
