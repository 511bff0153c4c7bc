"""One SFT or GRPO variant on a finished run's conversations, scored like notebooks 03/04 (the
experiments of docs/experiments.md).

Trains one format's adapter with ``training.run_sft`` (or, with ``--grpo-from ADAPTER``,
``training.run_grpo`` from that SFT adapter) from the settings dataclasses' defaults, which are the
demo's, with the overrides given, on ``RUN/02_instruction_format``; scores every validation answer per
class with block intervals beside the pixel classifier (and paired against it, as notebook 03 does),
and, with ``--against``, the paired change
against another run's answers on the same conversations.

    .venv/bin/python scripts/sft_experiment.py --run-dir runs/demo --out runs/exp/steps2400 \
        --set max_steps=2400 --against runs/exp/sft600
    .venv/bin/python scripts/sft_experiment.py --run-dir runs/demo --out runs/exp/grpo8 \
        --grpo-from runs/exp/sft600/adapter --set num_generations=8 --against runs/exp/sft600
    .venv/bin/python scripts/sft_experiment.py ... --grpo-from ADAPTER --reward pooled     # the aligned reward
    .venv/bin/python scripts/sft_experiment.py ... --grpo-from ADAPTER --freeze-saved-modules
    .venv/bin/python scripts/sft_experiment.py --run-dir runs/demo --out runs/exp/views8 \
        --score-only runs/exp/s1200/adapter --set test_views=8 --against runs/exp/s1200   # no training

The two GRPO variants are experiments (docs/experiments.md), not package features: ``--reward pooled``
registers :func:`pooled_dice_reward` for this run only; ``--freeze-saved-modules`` trains the LoRA
matrices only (the SFT's trained embeddings, LM head and norm stay as they are).

Needs ``magseg-nb run --profile demo --to 02`` (or any run up to 02) first. Writes only under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from magseg_nb import files, inference, layout, models, rewards, tile_conversations, training, validation
from magseg_nb.labels import CLASSES, NODATA

# The pooled reward's Dice level D: a cell written as class c pays (2 [right] - D) / share of c, the
# first-order change of c's pooled Dice 2TP / (P + G) when one more cell is written as c (D ~ 0.5).
POOLED_D = 0.5


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` pairs, values read as YAML (``2400``, ``1e-3``, ``true``, ``[a, b]``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key=value (for example max_steps=2400)")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def class_shares(train_jsonl: Path) -> np.ndarray:
    """Share of each class among the labelled cells of a conversations file (``gt_mask``)."""
    counts = np.zeros(len(CLASSES))
    with open(train_jsonl) as fh:
        for line in fh:
            g = np.asarray(json.loads(line)["gt_mask"]).ravel()
            counts += np.bincount(g[g != NODATA], minlength=len(CLASSES))[: len(CLASSES)]
    return counts / counts.sum()


def pooled_dice_reward_for(shares: np.ndarray):
    """A TRL reward scoring each answer by its first-order contribution to the pooled per-class Dice.

    A cell written as class c earns ``(2 [c is right] - POOLED_D) / shares[c]``; the sum is divided by
    the all-right answer's, so a perfect answer scores 1.0 (a poor one may score below 0).
    """
    weight = 1.0 / np.maximum(np.asarray(shares, float), 1e-3)

    def pooled_dice_reward(prompts=None, completions=(), gt_mask=None, **kwargs) -> list[float]:
        rewards._check_lengths(completions, gt_mask)
        out = []
        for completion, gt in zip(completions, gt_mask, strict=True):
            gt = np.asarray(gt)
            keep = gt != NODATA
            g = gt[keep]
            p = np.clip(np.asarray(rewards.decode_completion(completion, gt).mask)[keep], 0, len(CLASSES) - 1)
            if g.size == 0:
                out.append(1.0)
                continue
            got = ((2.0 * (p == g) - POOLED_D) * weight[p]).sum()
            out.append(float(got / ((2.0 - POOLED_D) * weight[g]).sum()))
        return out

    return pooled_dice_reward


def freeze_saved_modules(model) -> int:
    """Stop training PEFT's ``modules_to_save`` copies (embeddings, LM head, norm); returns how many weights."""
    frozen = 0
    for name, param in model.named_parameters():
        if "modules_to_save" in name and param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run folder with 01 and 02 finished")
    p.add_argument("--out", type=Path, required=True, help="where the adapter, answers and scores go")
    p.add_argument("--format", default="magseg", choices=["magseg", "text4seg"])
    p.add_argument("--model-id", default="tiny-gemma3-proxy")
    p.add_argument("--layout", default="per_patch", help="conversation_layout (per_patch or per_tile)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an SFTSettings field")
    p.add_argument("--grpo-from", type=Path, metavar="ADAPTER", help="run GRPO from this SFT adapter")
    p.add_argument(
        "--score-only",
        type=Path,
        metavar="ADAPTER",
        help="no training: score this adapter (with --set test_views=N)",
    )
    p.add_argument(
        "--against", type=Path, help="a folder with answers.jsonl of the same format to compare with"
    )
    p.add_argument("--reward", choices=["demo", "pooled"], default="demo", help="GRPO: the Dice reward")
    p.add_argument("--freeze-saved-modules", action="store_true", help="GRPO: train the LoRA matrices only")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    run01 = args.run_dir / "01_dataset_prep"
    run02 = args.run_dir / "02_instruction_format"
    for need in (run01, run02):
        if not (need / "state.json").exists():
            raise SystemExit(
                f"{need} is not a finished stage: run `magseg-nb run --profile demo --to 02` first"
            )
    params = {"seed": args.seed, **parse_overrides(args.set)}
    if (args.reward != "demo" or args.freeze_saved_modules) and not args.grpo_from:
        raise SystemExit("--reward and --freeze-saved-modules are GRPO variants: give --grpo-from ADAPTER")
    if args.score_only and args.grpo_from:
        raise SystemExit("--score-only scores an adapter as it is: leave out --grpo-from")
    if args.reward == "pooled":
        shares = class_shares(run02 / f"{args.format}_train.jsonl")
        rewards.REWARD_FUNCS["pooled"] = pooled_dice_reward_for(shares)  # this process only
        weights = params.get("reward_weights") or training.GRPOSettings().reward_weights
        params["reward_weights"] = {("pooled" if k == "dice" else k): v for k, v in weights.items()}
        print("pooled reward, class shares:", dict(zip(CLASSES, shares.round(3), strict=True)), flush=True)
    if args.freeze_saved_modules:
        attach = models._attach_adapter

        def attach_lora_only(model, base, adapter_dir, trainable):
            model = attach(model, base, adapter_dir, trainable)
            if trainable:
                print(f"froze {freeze_saved_modules(model)} modules_to_save weights", flush=True)
            return model

        models._attach_adapter = attach_lora_only
    base = models.resolve_model(args.model_id, args.run_dir / "models")
    t0 = time.perf_counter()
    if args.score_only:
        settings = training.sft_settings(params, args.format, base, run02, args.out)
        model, processor = models.load_model_and_processor(
            inference.adapter_base(args.score_only), adapter_dir=args.score_only
        )
        args.out.mkdir(parents=True, exist_ok=True)
        ev = training.evaluate_split(model, processor, settings)
        result = {"steps": None, "eval": ev}
    elif args.grpo_from:
        settings = training.grpo_settings(params, args.format, base, run02, args.grpo_from, args.out)
        result = training.run_grpo(settings)
    else:
        settings = training.sft_settings(params, args.format, base, run02, args.out)
        settings.train_jsonl = str(tile_conversations.train_jsonl(run02, args.format, args.layout))
        result = training.run_sft(settings)
    seconds = time.perf_counter() - t0

    val = run02 / f"{args.format}_val.jsonl"
    frames = validation.answer_frames(val, args.out / layout.ANSWERS, run01)
    table = validation.score_frames(frames, args.n_boot, 0.95, args.seed)
    print(validation.wide(table.query("answers == 'all'")).to_string())
    print(f"well-formed answers: {validation.valid_share(frames):.1%}")
    summary = {
        "overrides": params,
        "variant": {"reward": args.reward, "freeze_saved_modules": args.freeze_saved_modules},
        "format": args.format,
        "stage": "score" if args.score_only else "grpo" if args.grpo_from else "sft",
        "steps_done": result.get("steps"),
        "seconds": round(seconds, 1),
        "well_formed": validation.valid_share(frames),
        "scores": {
            f"{validation.SHORT[s]}_{m}": round(float(v), 4)
            for (s, m), v in table.query("answers == 'all'").set_index(["scorer", "metric"])["value"].items()
        },
    }
    if validation.PIXEL in frames:  # paired, as notebook 03 prints it: model minus the pixel classifier
        versus = {
            ("this run", validation.PIXEL): validation.compare(
                frames[validation.PIXEL], frames[validation.MODEL], args.n_boot, 0.95, args.seed
            )
        }
        summary["vs_pixel"] = validation.conclusions(versus)
        print("\n".join(summary["vs_pixel"]))
    log = args.out / "log.csv"
    if args.grpo_from and log.exists():
        zero_std = pd.read_csv(log).get("frac_reward_zero_std")
        summary["groups_all_equal_rewards"] = None if zero_std is None else round(float(zero_std.mean()), 3)
        print(f"groups with all-equal rewards: {summary['groups_all_equal_rewards']}")
    if args.against:
        ref = validation.answer_frames(val, args.against / layout.ANSWERS, run01)
        lines = validation.model_changes(
            ref, frames, "this run", str(args.against), args.n_boot, 0.95, args.seed
        )
        print("\n".join(lines))
        summary["against"] = {"reference": str(args.against), "changes": lines}
    files.write_json(args.out / "experiment.json", summary)
    print(json.dumps({k: summary[k] for k in ("steps_done", "seconds", "well_formed")}))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
