"""``scripts/sft_experiment.py`` with one optimiser or adapter change patched in that the package does not offer
as a setting (the measured, not adopted levers of docs/experiments.md):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/sft_variant.py --lora-init pissa -- \
        --run-dir runs/demo --out runs/exp/pissa --against runs/exp/bs4_1650
    OMP_NUM_THREADS=1 .venv/bin/python scripts/sft_variant.py --adam-beta2 0.95 -- \
        --run-dir runs/demo --out runs/exp/b2_095 --against runs/exp/bs4_1650

``--lora-init``: PEFT's ``init_lora_weights`` (``pissa``, ``olora``, ...). Those inits move the base weights
into the adapter, so the adapter saved under ``--out`` does not apply to the unchanged base: the scores come
from the trained model in memory (as ``training.run_sft`` scores any run it has just trained), and the saved
adapter is removed afterwards so that nothing loads it by mistake.
``--adam-beta2``: AdamW's second-moment decay (the Trainer's default 0.999).
``--trainer-arg KEY=VALUE`` (repeatable): any other ``TrainingArguments`` field, e.g. ``neftune_noise_alpha=5``
or ``max_grad_norm=0.3`` (the value read as YAML).
``--ema``: keep an exponential moving average of the trained weights (this decay per step, warmed up as
``min(decay, (1 + step) / (10 + step))``) and put it into the model when training ends, so that the saved
adapter and the scores are the average's. A resumed run starts the average again from where it resumes.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/sft_variant.py --trainer-arg max_grad_norm=3 -- \
        --run-dir runs/demo --out runs/exp/gn3 --against runs/exp/bs4_1650
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import runpy
import shutil
import sys
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback, TrainingArguments

from magseg_nb import models, training

SCRIPT = Path(__file__).with_name("sft_experiment.py")


@contextlib.contextmanager
def patched(
    lora_init: str | None = None,
    adam_beta2: float | None = None,
    ema: float | None = None,
    trainer_args: dict | None = None,
):
    """``models.lora_config``, ``training._common_args`` and ``training.fit`` with the change in, restored
    on exit."""
    plain_config, plain_args, plain_fit = models.lora_config, training._common_args, training.fit

    def lora_config(**kw):
        config = plain_config(**kw)
        config.init_lora_weights = lora_init
        return config

    extra = {**({} if adam_beta2 is None else {"adam_beta2": adam_beta2}), **(trainer_args or {})}

    def common_args(s, ckpt_dir):
        return {**plain_args(s, ckpt_dir), **extra}

    def fit(trainer, out, **kw):
        trainer.add_callback(EmaCallback(ema))
        return plain_fit(trainer, out, **kw)

    if lora_init:
        models.lora_config = lora_config
    if extra:
        training._common_args = common_args
    if ema is not None:
        training.fit = fit
    try:
        yield
    finally:
        models.lora_config, training._common_args, training.fit = plain_config, plain_args, plain_fit


class EmaCallback(TrainerCallback):
    """An exponential moving average of the trainable weights, copied into them when training ends."""

    def __init__(self, decay: float):
        self.decay, self.pairs = decay, None  # (average, trained weight), from the first step on

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.pairs is None:
            self.pairs = [(p.detach().clone(), p) for p in model.parameters() if p.requires_grad]
            return
        d = min(self.decay, (1 + state.global_step) / (10 + state.global_step))
        with torch.no_grad():
            for s, p in self.pairs:
                s.mul_(d).add_(p.detach(), alpha=1 - d)

    def on_train_end(self, args, state, control, model=None, **kw):
        if self.pairs is None:
            return
        with torch.no_grad():
            for s, p in self.pairs:
                p.copy_(s)
        print(f"EMA ({self.decay}) weights put into the model after step {state.global_step}", flush=True)


def drop_adapter(out: Path, lora_init: str | None) -> None:
    """Remove a run's saved adapter when its init moved base weights into it (it would load wrongly)."""
    adapter = Path(out) / "adapter"
    if lora_init and adapter.is_dir():
        shutil.rmtree(adapter)
        print(f"removed {adapter}: a {lora_init} adapter does not apply to the unchanged base", flush=True)


def trainer_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` as (key, YAML value), for a field ``TrainingArguments`` has; else a clear error."""
    key, sep, value = text.partition("=")
    if not sep or key not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        raise SystemExit(
            f"sft_variant.py: --trainer-arg {text!r} is not KEY=VALUE with a TrainingArguments field"
        )
    return key, yaml.safe_load(value)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit(
            "usage: sft_variant.py [--lora-init INIT] [--adam-beta2 B2] [--ema DECAY] [--trainer-arg K=V] -- <sft_experiment.py arguments>"
        )
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora-init", help="PEFT init_lora_weights, e.g. pissa or olora")
    p.add_argument("--adam-beta2", type=float, help="AdamW beta2 (the Trainer's default: 0.999)")
    p.add_argument("--ema", type=float, help="decay of a moving average of the weights, e.g. 0.998")
    p.add_argument(
        "--trainer-arg", action="append", default=[], metavar="KEY=VALUE", help="a TrainingArguments field"
    )
    args, rest = p.parse_args(argv[:cut]), argv[cut + 1 :]
    trainer_args = dict(trainer_arg(a) for a in args.trainer_arg)
    if args.lora_init is None and args.adam_beta2 is None and args.ema is None and not trainer_args:
        raise SystemExit(
            "sft_variant.py: name a change (--lora-init, --adam-beta2, --ema or --trainer-arg); "
            "else run sft_experiment.py"
        )
    print(
        f"sft_variant: lora_init={args.lora_init} adam_beta2={args.adam_beta2} ema={args.ema} "
        f"trainer_args={trainer_args}",
        flush=True,
    )
    sys.argv = [str(SCRIPT), *rest]
    with patched(args.lora_init, args.adam_beta2, args.ema, trainer_args):
        try:
            runpy.run_path(str(SCRIPT), run_name="__main__")
        finally:
            if "--out" in rest:
                drop_adapter(Path(rest[rest.index("--out") + 1]), args.lora_init)


if __name__ == "__main__":
    main()
