"""An experiment's run folder whose MAgSeg training rows each show their tile in a random view.

Train-time counterpart of the test-time views (``magseg_nb.views``): every training row of
``RUN/02_instruction_format/magseg_train.jsonl`` is replaced by one of the eight flips/turns of its
tile (seeded), with the crop, the question's patch position and the target grid turned to match.
The other files of 01 and 02 are linked, not copied. Train on the result with
``scripts/sft_experiment.py`` (docs/experiments.md, eighth session):

    .venv/bin/python scripts/view_augmented_run.py --run-dir runs/demo --out runs/exp/aug-demo
    .venv/bin/python scripts/sft_experiment.py --run-dir runs/exp/aug-demo --out runs/exp/aug8 \
        --set max_steps=1200 --against runs/exp/s1200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from magseg_nb import files, prompts, views

TRAIN = "magseg_train.jsonl"
IMAGES = "images_aug"


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run with 01 and 02 finished")
    p.add_argument("--out", type=Path, required=True, help="the new run folder")
    p.add_argument("--seed", type=int, default=0, help="draws each row's view")
    args = p.parse_args(argv)
    run, out = args.run_dir.resolve(), args.out.resolve()
    src, dst = run / "02_instruction_format", out / "02_instruction_format"
    if not (src / TRAIN).exists():
        raise SystemExit(f"{src / TRAIN} does not exist: run `magseg-nb run --profile demo --to 02` first")
    (dst / IMAGES).mkdir(parents=True, exist_ok=True)
    if not (out / "01_dataset_prep").exists():
        (out / "01_dataset_prep").symlink_to(run / "01_dataset_prep")
    for f in src.iterdir():
        if f.name not in (TRAIN, IMAGES) and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f)
    rng = np.random.default_rng(args.seed)
    rows = []
    for r in prompts.read_jsonl(src / TRAIN):
        v = int(rng.integers(8))
        first = Image.open(src / r["image_paths"][0]).convert("RGB")  # the tile (a crop_only row: its patch)
        ex = views.row_view_example(first, *prompts.row_prompt(r), v)
        gt = views.to_view(np.asarray(r["gt_mask"]), v)
        # the viewed tile is shared by its patches' rows: written once per (tile, view)
        patch_png = f"{IMAGES}/{r['id']}__v{v}_{r['variant']}.png"
        tile_png = f"{IMAGES}/{r['tile_id']}__v{v}.png"
        paths = [patch_png] if r["variant"] == "crop_only" else [tile_png, patch_png][: len(ex["images"])]
        for img, rel in zip(ex["images"], paths, strict=True):
            if not (dst / rel).exists():
                prompts.save_png(img, dst / rel)
        rows.append(
            {**r, "image_paths": paths, "prompt": ex["prompt"], "gt_mask": gt.tolist(), "view": v,
             "completion": prompts.completion(gt, r["encoding"])}
        )  # fmt: skip
    files.write_jsonl(dst / TRAIN, rows)
    print(f"{len(rows)} training rows in random views -> {dst / TRAIN}")
    return dst / TRAIN


if __name__ == "__main__":
    main()
