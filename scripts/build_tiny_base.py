"""Build the pretrained tiny Gemma 3 base shipped in pretrained/tiny-gemma3-proxy/ (see magseg_nb.tiny_base).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/build_tiny_base.py            # the shipped recipe
    .venv/bin/python scripts/build_tiny_base.py --steps 5 --scene-size 256 --seeds 1001 \\
        --difficulties demo --countries vietnam --out /tmp/base                # a quick check
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magseg_nb import pretraining, textgrid, tiny_base  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d = tiny_base.Recipe()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=tiny_base.PRETRAINED_DIR, help="model folder to (re)write")
    p.add_argument(
        "--work-dir", type=Path, default=None, help="landscapes + checkpoints (default: a temp dir)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help="landscape seeds (never 0)")
    p.add_argument(
        "--difficulties", nargs="+", default=d.difficulties, choices=sorted(tiny_base.DIFFICULTY_MIX)
    )
    p.add_argument("--countries", nargs="+", default=d.countries)
    p.add_argument("--scenes-per-country", type=int, default=d.scenes_per_country)
    p.add_argument("--scene-size", type=int, default=d.scene_size)
    p.add_argument("--patch-layout", type=int, default=d.patch_layout, help="MAgSeg patches per tile side")
    p.add_argument("--magseg-grid", type=int, default=d.magseg_grid, help="MAgSeg cells per patch side")
    p.add_argument("--magseg-encoding", default=d.magseg_encoding, choices=textgrid.ENCODINGS)
    p.add_argument("--text4seg-encoding", default=d.text4seg_encoding, choices=textgrid.ENCODINGS)
    p.add_argument(
        "--proxy-rule",
        default=d.proxy_rule,
        choices=pretraining.PROXY_RULES,
        help="how a cell's code is read: its mean colour, or the commonest code of its pixels",
    )
    p.add_argument("--init-from", default=d.init_from, help="a model folder to go on from (default: random)")
    p.add_argument(
        "--shape",
        nargs="+",
        default=[],
        metavar="FIELD=INT",
        help="TinySpec fields to change, e.g. vision_layers=4 (experiments; the shipped base has none)",
    )
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-examples", type=int, default=d.max_examples)
    p.add_argument("--logging-steps", type=int, default=d.logging_steps)
    args = p.parse_args(argv)
    try:
        shape = {k: int(v) for k, v in (item.split("=", 1) for item in args.shape)}
    except ValueError:
        p.error(f"--shape {' '.join(args.shape)}: write each change as FIELD=INT, e.g. vision_layers=4")
    recipe = tiny_base.Recipe(
        seeds=args.seeds,
        difficulties=args.difficulties,
        countries=args.countries,
        scenes_per_country=args.scenes_per_country,
        scene_size=args.scene_size,
        patch_layout=args.patch_layout,
        magseg_grid=args.magseg_grid,
        magseg_encoding=args.magseg_encoding,
        text4seg_encoding=args.text4seg_encoding,
        proxy_rule=args.proxy_rule,
        init_from=args.init_from,
        shape=shape,
        steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        logging_steps=args.logging_steps,
    )
    argv_used = sys.argv[1:] if argv is None else argv
    command = " ".join(
        ["OMP_NUM_THREADS=1 .venv/bin/python scripts/build_tiny_base.py", *map(shlex.quote, argv_used)]
    )
    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="tiny-base-") as work:
            tiny_base.build(args.out, recipe, Path(work), command)
    else:
        tiny_base.build(args.out, recipe, args.work_dir, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
