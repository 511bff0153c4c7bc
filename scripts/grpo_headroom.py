"""How much GRPO could gain by preferring the adapter's own samples: greedy answers against the best of
k sampled answers per validation prompt, picked by the GRPO reward (an oracle that sees the truth).

GRPO raises the probability of the samples in a group that score above the group's mean; it moves
the policy toward answers the policy already draws. The best of k samples per prompt is what that
reweighting could reach if it picked perfectly, prompt by prompt. If it is close to the greedy
answers, the reward has little to push on (docs/experiments.md).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/grpo_headroom.py --run-dir runs/demo \
        --adapter runs/demo/03_sft/magseg/adapter --against runs/demo/03_sft/magseg --out runs/exp/headroom

The samples answer one view of each tile, so the reference is the greedy answer of that view: an answers file
written with ``test_views`` > 1 keeps it as ``plain_answer``, and that is what is compared (``greedy/answers.jsonl``).

Writes under --out: ``greedy/answers.jsonl`` (the reference), ``sample/answers.jsonl`` (each prompt's first
sample), ``best_of_<n>/answers.jsonl`` (the sample with the highest reward among the first n, ties to the earlier
sample) and ``headroom.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from magseg_nb import files, inference, layout, models, rewards, textgrid, training, validation


def best_of(rewards_k: np.ndarray, n: int) -> np.ndarray:
    """Index of the highest reward among each row's first ``n`` samples (the first such on ties)."""
    return np.argmax(rewards_k[:, :n], axis=1)


def all_equal_share(rewards_k: np.ndarray, n: int) -> float:
    """Share of prompts whose first ``n`` samples all score the same (a GRPO group with no gradient)."""
    group = rewards_k[:, :n]
    return float(np.mean(np.ptp(group, axis=1) == 0))


def answer_row(row_id, text: str, gt) -> dict:
    """An answers.jsonl row as ``training.evaluate`` writes it."""
    decoded = textgrid.decode(text, shape=np.asarray(gt).shape)
    return {
        "id": row_id,
        "answer": text,
        "valid": decoded.report.valid,
        "repairs": decoded.report.repairs,
        "mean_dice": rewards.mean_dice(gt, decoded.mask),
    }


def plain_reference(answers_jsonl: Path, out_jsonl: Path, ids, gts) -> Path:
    """``out_jsonl``: the greedy answers of one view (``plain_answer`` where the file has it, else ``answer``)."""
    greedy = validation.read_answers(answers_jsonl)
    missing = [i for i in ids if str(i) not in greedy]
    if missing:
        raise SystemExit(
            f"{answers_jsonl} has no answer for {len(missing)} validation rows (e.g. {missing[0]})"
        )
    rows = [
        answer_row(i, (r := greedy[str(i)]).get("plain_answer", r["answer"]), g)
        for i, g in zip(ids, gts, strict=True)
    ]
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    files.write_jsonl(out_jsonl, rows)
    return out_jsonl


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run with notebooks 01 and 02 finished")
    p.add_argument("--adapter", type=Path, required=True, help="a MAgSeg SFT adapter folder")
    p.add_argument("--against", type=Path, required=True, help="that adapter's greedy answers (folder)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="GRPO's sampling temperature")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    run01, run02 = args.run_dir / "01_dataset_prep", args.run_dir / "02_instruction_format"
    val = run02 / "magseg_val.jsonl"
    greedy_path = args.against / layout.ANSWERS
    for path in (val, greedy_path, args.adapter):
        if not path.exists():
            raise SystemExit(f"{path} not found: run notebooks 01-03 (magseg-nb run --to 03) first")
    ds = training.load_split(val)
    gts = [np.asarray(g) for g in ds["gt_mask"]]  # the reference is checked before minutes of sampling
    greedy_path = plain_reference(greedy_path, args.out / "greedy" / layout.ANSWERS, ds["id"], gts)
    greedy = validation.read_answers(greedy_path)
    model, processor = models.load_model_and_processor(
        inference.adapter_base(args.adapter), adapter_dir=args.adapter
    )
    model.eval()
    refs = [rewards.completion_text(c) for c in ds["completion"]]
    max_new = training.answer_budget(processor, refs)
    examples = [{"images": r["images"], "prompt": r["prompt"]} for r in ds for _ in range(args.k)]
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    texts = models.generate(
        model,
        processor,
        examples,
        max_new_tokens=max_new,
        batch_size=args.batch_size,
        do_sample=True,
        temperature=args.temperature,
    )
    seconds = time.perf_counter() - t0
    samples = [texts[i * args.k : (i + 1) * args.k] for i in range(len(ds))]
    args.out.mkdir(parents=True, exist_ok=True)
    files.write_jsonl(
        args.out / "samples.jsonl", [{"id": i, "samples": s} for i, s in zip(ds["id"], samples, strict=True)]
    )
    reward_k = np.array(
        [
            [rewards.mean_dice(g, textgrid.decode(t, shape=g.shape).mask) for t in s]
            for g, s in zip(gts, samples, strict=True)
        ]
    )
    greedy_reward = np.array([greedy[str(i)]["mean_dice"] for i in ds["id"]])
    summary = {
        "adapter": str(args.adapter),
        "k": args.k,
        "temperature": args.temperature,
        "seed": args.seed,
        "prompts": len(ds),
        "generate_seconds": round(seconds, 1),
        "reference": "greedy, one view (plain_answer)",
        "reward_greedy": round(float(greedy_reward.mean()), 4),
        "reward_sample": round(float(reward_k.mean()), 4),
        "groups_all_equal": {},
        "reward_best_of": {},
        "changes": {},
    }
    ref = validation.answer_frames(val, greedy_path, run01)
    picks = {"sample": np.zeros(len(ds), int)} | {
        f"best_of_{n}": best_of(reward_k, n) for n in sorted({min(4, args.k), args.k})
    }
    for name, pick in picks.items():
        rows = [answer_row(i, samples[j][pick[j]], gts[j]) for j, i in enumerate(ds["id"])]
        (args.out / name).mkdir(parents=True, exist_ok=True)
        files.write_jsonl(args.out / name / layout.ANSWERS, rows)
        frames = validation.answer_frames(val, args.out / name / layout.ANSWERS, run01)
        lines = validation.model_changes(ref, frames, name, "greedy", args.n_boot, 0.95, args.seed)
        summary["changes"][name] = lines
        if name.startswith("best_of_"):
            n = int(name.rsplit("_", 1)[1])
            summary["reward_best_of"][n] = round(float(reward_k[np.arange(len(ds)), pick].mean()), 4)
            summary["groups_all_equal"][n] = round(all_equal_share(reward_k, n), 3)
        print(f"--- {name}", *lines, sep="\n", flush=True)
    files.write_json(args.out / "headroom.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "changes"}, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
