"""MAgSeg's cost per tile against Text4Seg's, side by side in one run (tiny Gemma 3 proxy, CPU).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tile_cost.py                  # 64x64 cells
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tile_cost.py --effective 32 --repeats 2

Per tile, at the same effective resolution E (Text4Seg: one E x E answer; MAgSeg: L x L patches of
E/L x E/L cells):

- training: forward + backward time and tokens of the tile's conversations, collated as the trainer
  does (per patch: TRL's prompt/completion collator, as ``training.train_sft``; per tile: the
  multi-turn ``tile_conversations.MultiTurnCollator``; Text4Seg: TRL's collator);
- generation: greedy, every answer forced to the length of the longest reference answer of its format
  (``min_new_tokens``), so an untrained model's early or late stop does not change the cost: per patch
  (``models.generate``), per patch with the tile's prefix cache (``tile_conversations``), Text4Seg.

Methods are measured interleaved, ``--repeats`` times, and the median is reported, so load from other
processes falls on all of them alike. Writes ``benchmarks/results/tile_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from magseg_nb import inference, landscape, models, prompts, textgrid  # noqa: E402
from magseg_nb import tile_conversations as tc  # noqa: E402


def make_tile(size: int = 256, seed: int = 0) -> prompts.TileRecord:
    """A generated landscape tile; roads and buildings count as ``others`` (class 0)."""
    scene = landscape.generate_scene("vn0", "vietnam", size=size, res_m=0.5, seed=seed)
    semantic = np.where(scene.kind < 4, scene.kind, 0).astype(np.uint8)
    return prompts.TileRecord(f"bench{seed}", "vn0", "train", scene.image, semantic)


def answer_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # + <end_of_turn>


def training_batches(processor, tile, effective: int, layout: int, encoding: str, variant: str, batch: int):
    """{method: list of collated batches} for one tile."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    trl_collate = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)
    grid = effective // layout
    per_patch = [
        {"images": ex["images"], "prompt": ex["prompt"], "completion": prompts.completion(t, encoding)}
        for ex, t in (
            (
                prompts.make_example(tile.image, "magseg", grid, encoding, p, layout, variant),
                prompts.patch_target(tile.semantic, p, layout, grid),
            )
            for p in prompts.patches("magseg", layout)
        )
    ]
    t4s_ex = prompts.make_example(tile.image, "text4seg", effective, encoding)
    t4s = [
        {
            "images": t4s_ex["images"],
            "prompt": t4s_ex["prompt"],
            "completion": prompts.completion(
                prompts.patch_target(tile.semantic, None, 1, effective), encoding
            ),
        }
    ]
    conv = tc.tile_conversation(tile.image, grid, encoding, layout, variant, tile.semantic)
    return {
        "magseg per patch": [
            trl_collate(copy.deepcopy(per_patch[i : i + batch])) for i in range(0, len(per_patch), batch)
        ],
        "magseg per tile (multi-turn)": [tc.MultiTurnCollator(processor)([conv])],
        "text4seg": [trl_collate(copy.deepcopy(t4s))],
    }


def train_cost(model, batches) -> dict:
    t0 = time.perf_counter()
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return {
        "seconds": time.perf_counter() - t0,
        "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
        "loss_tokens": int(sum(int((b["labels"] != -100).sum()) for b in batches)),
        "sequences": int(sum(len(b["input_ids"]) for b in batches)),
    }


def generation_jobs(processor, tile, effective: int, layout: int, encoding: str, variant: str, batch: int):
    """{method: (callable, new tokens per answer, answers)} for one tile."""
    tok = processor.tokenizer
    grid = effective // layout
    spec = inference.FormatSpec("magseg", grid, layout, encoding, variant)
    exs = inference.tile_examples(tile.image, spec)
    n_m = max(
        answer_tokens(tok, textgrid.encode(prompts.patch_target(tile.semantic, p, layout, grid), encoding))
        for p in prompts.patches("magseg", layout)
    )
    t4s = inference.tile_examples(tile.image, inference.FormatSpec("text4seg", effective, 1, encoding))
    n_t = answer_tokens(
        tok, textgrid.encode(prompts.patch_target(tile.semantic, None, 1, effective), encoding)
    )

    def forced(fn, examples, n):
        return lambda m: fn(m, processor, examples, max_new_tokens=n, batch_size=batch, min_new_tokens=n)

    return {
        "magseg per patch": (forced(models.generate, exs, n_m), n_m, len(exs)),
        "magseg per patch + prefix cache": (forced(tc.generate_prefix_cached, exs, n_m), n_m, len(exs)),
        "text4seg": (forced(models.generate, t4s, n_t), n_t, 1),
    }


def run(args) -> dict:
    import torch

    torch.manual_seed(0)
    model, processor = models.load_model_and_processor(args.model, device="cpu", trainable=True)
    model.train()
    tile = make_tile(args.tile_px, args.seed)
    rows = []
    for variant in args.variants:
        batches = training_batches(
            processor, tile, args.effective, args.layout, args.encoding, variant, args.batch_size
        )
        jobs = generation_jobs(
            processor, tile, args.effective, args.layout, args.encoding, variant, args.batch_size
        )
        train_t = {k: [] for k in batches}
        gen_t = {k: [] for k in jobs}
        info = {}
        for r in range(args.repeats):  # interleaved: every method once per round
            for k, b in batches.items():
                c = train_cost(model, b)
                train_t[k].append(c["seconds"])
                info[k] = c
            model.eval()
            for k, (fn, _n, _a) in jobs.items():
                t0 = time.perf_counter()
                with torch.inference_mode():
                    fn(model)
                gen_t[k].append(time.perf_counter() - t0)
            model.train()
            print(f"{variant}: round {r + 1}/{args.repeats} done", flush=True)
        t4s_train = statistics.median(train_t["text4seg"])
        t4s_gen = statistics.median(gen_t["text4seg"])
        for k, ts in train_t.items():
            med = statistics.median(ts)
            rows.append(
                {
                    "variant": variant,
                    "stage": "training",
                    "method": k,
                    "seconds_per_tile": round(med, 3),
                    "ratio_to_text4seg": round(med / t4s_train, 2),
                    "tokens_per_tile": info[k]["tokens"],
                    "token_ratio_to_text4seg": round(info[k]["tokens"] / info["text4seg"]["tokens"], 2),
                    "loss_tokens": info[k]["loss_tokens"],
                    "sequences": info[k]["sequences"],
                }
            )
        for k, ts in gen_t.items():
            med = statistics.median(ts)
            rows.append(
                {
                    "variant": variant,
                    "stage": "generation",
                    "method": k,
                    "seconds_per_tile": round(med, 3),
                    "ratio_to_text4seg": round(med / t4s_gen, 2),
                    "new_tokens_per_answer": jobs[k][1],
                    "answers": jobs[k][2],
                }
            )
    return {
        "effective": args.effective,
        "patch_layout": args.layout,
        "magseg_grid": args.effective // args.layout,
        "encoding": args.encoding,
        "tile_px": args.tile_px,
        "model": args.model,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    cols = [
        "variant",
        "stage",
        "method",
        "seconds_per_tile",
        "ratio_to_text4seg",
        "tokens_per_tile",
        "token_ratio_to_text4seg",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def accuracy_comparison(run02: Path, base_model: str, out_dir: Path, steps: int = 60, **sft) -> dict:
    """Validation scores of MAgSeg trained per patch and per tile (multi-turn) for equal steps, from
    notebook 02's conversations (run it with ``conversation_layout: per_tile``); one row per layout."""
    from magseg_nb import training

    out = {}
    for layout in tc.LAYOUTS:
        s = training.SFTSettings(
            base_model=base_model,
            train_jsonl=str(tc.train_jsonl(run02, "magseg", layout)),
            val_jsonl=str(Path(run02) / "magseg_val.jsonl"),
            output_dir=str(Path(out_dir) / layout),
            max_steps=steps,
            **sft,
        )
        res = training.run_sft(s)
        out[layout] = {
            "mean_dice": res["eval"]["model"]["mean_dice"],
            "train_seconds": res.get("train_seconds"),
            "tokens_seen": res.get("tokens_seen"),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "pretrained" / "tiny-gemma3-proxy"))
    ap.add_argument("--effective", type=int, default=64, help="cells per tile side")
    ap.add_argument("--layout", type=int, default=4, help="MAgSeg patches per tile side")
    ap.add_argument("--encoding", default="rle", choices=textgrid.ENCODINGS)
    ap.add_argument("--variants", nargs="+", default=["index", "crop"], choices=prompts.VARIANTS)
    ap.add_argument("--tile-px", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tile_cost"))
    args = ap.parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
