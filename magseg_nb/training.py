"""SFT and GRPO with TRL + PEFT LoRA, evaluation on the validation split, and the tiny model's proxy pretraining.

One code path for notebooks and for ``accelerate launch -m magseg_nb.training {sft,grpo} --config X.yaml``
(DDP/FSDP come from the accelerate config; TRL's trainers handle the processes). Every run writes into
its ``output_dir``::

    adapter/       PEFT adapter + processor (loadable with models.load_model_and_processor(base, adapter))
    checkpoints/   trainer checkpoints; a rerun resumes from the last one
    log.csv        the trainer's log history (loss, token accuracy / rewards, completion length, ...)
    eval.json      validation scores of the model and of the all-field and majority-class baselines
    answers.jsonl  the validation answers the scores come from
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magseg_nb import files, layout, models, progress, prompts, rewards, textgrid, tile_conversations
from magseg_nb import views as views_mod
from magseg_nb.labels import CLASS_IDS, CLASSES, NODATA
from magseg_nb.tile_conversations import MultiTurnCollator

DONE_FILE = "train_done.json"


# --- settings -------------------------------------------------------------------------------------


@dataclass
class CommonSettings:
    """Settings shared by SFT and GRPO (field names are the YAML keys of ``--config``).

    The single source of every default: the values are the CPU demo's, notebooks 03/04 repeat them in
    their parameters cell (papermill needs literals; a test keeps them equal), profiles and the CLI
    configs in ``configs/training/`` override only what differs (another test checks they agree).
    """

    base_model: str = ""  # folder or hub id of the base model the adapter belongs to
    train_jsonl: str = ""  # conversations from 02_instruction_format
    output_dir: str = ""
    val_jsonl: str | None = None
    learning_rate: float = 0.002  # the tiny model needs more than Gemma 3 LoRA's usual 2e-4
    # SFT: three epochs of the demo's MAgSeg rows in batches of 4. 4950 steps scored +0.017 mean Dice over one
    # epoch (1650) and level with the pixel classifier on every class, seeds 0 and 1; compiled and in bf16
    # autocast each step costs 0.73 of its float32 time (torch_compile, cpu_autocast; docs/experiments.md).
    # Batches of 4 beat 8 at equal rows. GRPOSettings sets its own steps and batch.
    max_steps: int = 4950
    batch_size: int = 4  # per device
    grad_accum: int = 1
    warmup_steps: int = 20
    lr_scheduler: str = "cosine"  # decays to 0 at max_steps: the last step is a settled model
    weight_decay: float = 0.0
    bf16: bool | str = "auto"  # "auto": on when the GPU supports it (never on the CPU)
    gradient_checkpointing: bool = False
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 10
    seed: int = 0
    max_train_examples: int | None = None  # a seeded random subset of the training rows
    class_balance: float = 0.0  # 0: rows as they come; 1: drawn by their rarest class (balanced_rows)
    time_budget_s: float | None = None  # stop (and save) after this many seconds of training
    eval_max_examples: int | None = None  # validation rows scored after training (None: all; 0: skip)
    eval_batch_size: int = 16
    max_new_tokens: int | None = None  # None: from the longest reference answer in the validation set
    # Validation answers voted over flipped/turned views of each tile (magseg_nb.views): 1 (off), 4 or 8;
    # each view costs one more generation (docs/experiments.md has the gain and the cost).
    test_views: int = 4


@dataclass
class SFTSettings(CommonSettings):
    """LoRA SFT (or a full fine-tune with ``full_finetune``) on prompt/completion conversations."""

    lora_r: int = 16
    lora_alpha: int = 32
    # 0 on the CPU demo: drawing dropout masks cost 1.2x in training time at the tiny width, and 1200 steps
    # without it matched 1200 with it (docs/experiments.md); the GPU profiles keep the usual 0.05.
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all"  # "language" (LM projections), "all" (+ vision tower) or a regex
    train_projector: bool = True
    train_embeddings: bool = True  # also train token embeddings/LM head + final norm (random tiny bases)
    full_finetune: bool = False  # train every weight and save a full model instead of an adapter
    # >1: each run of this many rows in a batch shows one tile (tile_grouped_order), and a batch's copies
    # of a tile image go through the vision tower once; one process only. 1: rows drawn at random.
    tile_group: int = 1
    # Loss weight of each class's label token in the answers, e.g. {"tree": 2.0}; unnamed classes and every
    # other token weigh 1, and each batch's loss is the weighted mean. None: TRL's plain token mean.
    label_weights: dict[str, float] | None = None
    # LoRA+ (PEFT's create_loraplus_optimizer): the LoRA B matrices (and 1-d weights) learn this many times
    # faster than learning_rate. None: one learning rate for every weight.
    loraplus_lr_ratio: float | None = None
    # >0: each class label token of an answer is trained towards (1 - soft_labels) x its written label +
    # soft_labels x the shares of its cell's pixels per class (read from ``pixel_labels``, notebook 01's
    # folder), so a cell that is 55 % tree and 45 % field says so; 0: the written labels only.
    soft_labels: float = 0.0
    pixel_labels: str = ""
    # Loss weight of the class tokens of mixed cells (purity under MIXED_PURITY, from ``pixel_labels``); every
    # other answer token weighs 1 and each batch's loss is the weighted mean. 1: no weighting.
    mixed_cell_weight: float = 1.0
    # >0: each training row's images (the tile and its patch alike) in a random colour: brightness, contrast
    # and saturation each scaled by a factor drawn from [1 - photometric, 1 + photometric] (Pillow's
    # ImageEnhance), drawn afresh each time a row is batched; scoring sees the images as they are. 0: off.
    # Level on four landscapes at 0.4 (docs/experiments.md, thirty-sixth session). A resumed run draws its
    # factors from the seed again, so it is not the same run as an uninterrupted one.
    photometric: float = 0.0
    # CPU speed, not the recipe (docs/experiments.md, "Three epochs in the time of one"). "auto": compile the
    # model (torch.compile, inductor) for a CPU run of COMPILE_MIN_STEPS steps or more whose batches keep their
    # shape (one_shape: MAgSeg's plain grids; Text4Seg's answers of many lengths only in batches of similar
    # length, group_by_length) when a C++ compiler is on PATH; train in bf16 autocast, the weights kept in
    # float32, on a CPU that does bf16 natively (AVX512-BF16 or AMX). Either moves the trained weights a
    # little, as a thread count does; train_done.json records both.
    torch_compile: bool | str = "auto"
    cpu_autocast: bool | str = "auto"
    # Batches of rows of similar length (length_grouped_epoch): the same rows and tokens a pass, less padding.
    # "auto": on when the rows differ in length (Text4Seg's run-length answers; MAgSeg's plain grids do not) and
    # tile_group is 1; true / false. The batches' make-up changes, so the trained weights do a little.
    group_by_length: bool | str = "auto"

    def __post_init__(self):
        # Checked when the settings are read, so a bad value fails before the model loads.
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio < 1:
            raise ValueError(
                f"loraplus_lr_ratio must be >= 1 (LoRA+ speeds up the B matrices), not {self.loraplus_lr_ratio}"
            )
        if not 0 <= self.soft_labels <= 1:
            raise ValueError(f"soft_labels must be in [0, 1], not {self.soft_labels}")
        if self.mixed_cell_weight < 0:
            raise ValueError(f"mixed_cell_weight must be >= 0, not {self.mixed_cell_weight}")
        if not 0 <= self.photometric < 1:
            raise ValueError(
                f"photometric must be in [0, 1) (a factor's spread around 1), not {self.photometric}"
            )
        if not self.by_cells:
            return
        named = self.cell_settings
        if self.label_weights:
            raise ValueError(
                f"{named} and label_weights each define the loss of the class tokens: set one of them"
            )
        if not self.pixel_labels:
            raise ValueError(
                f"{named}: the cells' pixel shares come from pixel_labels; set it to notebook 01's folder "
                "(for example runs/demo/01_dataset_prep)"
            )

    @property
    def by_cells(self) -> bool:
        """Whether the loss reads each cell's pixel shares (soft labels or mixed-cell weights)."""
        return bool(self.soft_labels) or self.mixed_cell_weight != 1

    @property
    def cell_settings(self) -> str:
        """The settings that ask for the cells' pixel shares, as a message names them."""
        named = [
            k
            for k, on in (
                ("soft_labels", self.soft_labels),
                ("mixed_cell_weight", self.mixed_cell_weight != 1),
            )
            if on
        ]
        return " and ".join(named)


@dataclass
class GRPOSettings(CommonSettings):
    """GRPO from an SFT adapter with the Dice and format rewards."""

    adapter_dir: str = ""  # the SFT adapter to continue (PeftModel, is_trainable)
    learning_rate: float = 1e-4
    max_steps: int = 40
    batch_size: int = 8  # completions a step: 2 prompts x num_generations
    logging_steps: int = 1
    save_steps: int = 10
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 10
    num_generations: int = 4
    max_completion_length: int | None = None  # None: fits the longest reference answer (+25 %)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.0  # KL coefficient (0: no reference model, TRL's default)
    reward_weights: dict[str, float] = field(default_factory=lambda: {"dice": 1.0, "format": 0.2})
    loss_type: str = "dapo"


def write_config(s, path: Path) -> None:
    """The settings ``s`` as the YAML file that ``python -m magseg_nb.training --config`` reads."""
    import yaml

    files.write_text(Path(path), yaml.safe_dump(dataclasses.asdict(s), sort_keys=False))


def _settings(cls, cfg):
    if isinstance(cfg, cls):
        return cfg
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known keys: {sorted(names)}")
    s = cls(**cfg)
    for key in ("base_model", "train_jsonl", "output_dir"):
        if not getattr(s, key):
            raise ValueError(f"{cls.__name__}: '{key}' is required")
    return s


def sft_settings(params: dict, fmt: str, base_model, run02, output_dir) -> SFTSettings:
    """SFTSettings for one format from notebook 03's parameters (the same names as the fields;
    ``max_steps`` may map format -> steps). One call, so the notebook and the seed study agree."""
    names = {f.name for f in dataclasses.fields(SFTSettings)}
    kw = {k: v for k, v in params.items() if k in names}
    if isinstance(kw.get("max_steps"), dict):
        kw["max_steps"] = kw["max_steps"][fmt]
    return SFTSettings(
        **kw,
        base_model=str(base_model),
        train_jsonl=str(Path(run02) / f"{fmt}_train.jsonl"),
        val_jsonl=str(Path(run02) / f"{fmt}_val.jsonl"),
        output_dir=str(output_dir),
    )


def sft_plans(params: dict, formats: Sequence[str], base_model, run02, stage_dir) -> dict[str, SFTSettings]:
    """Notebook 03's runs, one SFTSettings per format (MAgSeg first, in ``stage_dir/<format>``), on the
    parameters' ``conversation_layout``; with ``equal_tokens`` every other format gets the steps that hold
    as many tokens as MAgSeg's planned steps (:func:`planned_tokens`), known before either trains."""
    plans: dict[str, SFTSettings] = {}
    for fmt in training_order(formats):
        s = sft_settings(params, fmt, base_model, run02, Path(stage_dir) / fmt)
        s.train_jsonl = str(
            tile_conversations.train_jsonl(run02, fmt, params.get("conversation_layout", "per_patch"))
        )
        if params.get("equal_tokens") and fmt != "magseg" and "magseg" in plans:
            s.max_steps = equal_token_steps(s, planned_tokens(plans["magseg"]))
        plans[fmt] = s
    return plans


def grpo_settings(params: dict, fmt: str, base_model, run02, adapter_dir, output_dir) -> GRPOSettings:
    """GRPOSettings for one format from notebook 04's parameters (the same names as the fields)."""
    names = {f.name for f in dataclasses.fields(GRPOSettings)}
    return GRPOSettings(
        **{k: v for k, v in params.items() if k in names},
        base_model=str(base_model),
        adapter_dir=str(adapter_dir),
        train_jsonl=str(Path(run02) / f"{fmt}_train.jsonl"),
        val_jsonl=str(Path(run02) / f"{fmt}_val.jsonl"),
        output_dir=str(output_dir),
    )


# Files above this size count by name and size only: hashing a real checkpoint's gigabytes on every
# run would cost minutes, and a changed real checkpoint changes its size or its SHA256SUMS anyway.
HASH_FILES_UP_TO = 64 << 20


def input_identity(path_or_id: str) -> str:
    """What a settings path points at: a file's SHA-256; a folder's ``SHA256SUMS`` or its files
    (hashed up to ``HASH_FILES_UP_TO``, larger ones by size); a hub id as itself."""
    if not path_or_id:
        return ""
    path = Path(path_or_id)
    if path.is_file():
        return files.sha256_file(path)
    if not path.is_dir():
        return str(path_or_id)
    if (path / "SHA256SUMS").is_file():
        return files.sha256_file(path / "SHA256SUMS")
    entries = {}
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        size = f.stat().st_size
        entries[f.name] = files.sha256_file(f) if size <= HASH_FILES_UP_TO else f"{size} bytes"
    return files.sha256_json(entries)


def inputs_hash(settings) -> str:
    """Identity of the base model, training rows and starting adapter the settings name."""
    names = ("base_model", "train_jsonl", "adapter_dir")
    return files.sha256_json({n: input_identity(getattr(settings, n, "")) for n in names})[:12]


# Settings that only change how the trained weights are scored: changing one re-scores a finished
# adapter instead of training it again.
EVAL_ONLY = ("eval_max_examples", "eval_batch_size", "max_new_tokens", "test_views")
# Settings added after runs were made, at the value that trains as before: left out of the hash there,
# so those finished runs stay valid.
NEUTRAL = {
    "tile_group": 1,
    "label_weights": None,
    "loraplus_lr_ratio": None,
    "soft_labels": 0.0,
    "pixel_labels": "",
    "mixed_cell_weight": 1.0,
    "photometric": 0.0,
}
# A cell whose majority class holds under this share of its pixels is mixed (``mixed_cell_weight``): the
# upper edge of the mixed bins of ``validation.errors_by_purity`` (not imported from validation: training
# runs where the geo stack is absent, the GPU image).
MIXED_PURITY = 0.8


def settings_hash(settings) -> str:
    """The training settings and what they point at: a rebuilt base or rewritten conversations under the
    same path are new settings (a finished adapter of the old ones is not reused); the settings in
    ``EVAL_ONLY`` are not part of it."""
    values = {
        k: v
        for k, v in dataclasses.asdict(settings).items()
        if k not in EVAL_ONLY and not (k in NEUTRAL and v == NEUTRAL[k])
    }
    return files.sha256_json({**values, "inputs": inputs_hash(settings)})[:12]


# --- helpers --------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def use_bf16(flag: bool | str) -> bool:
    torch = _torch()
    if flag == "auto":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(flag)


# torch.compile's one-off cost (about 35 s for the tiny model on one core) pays back after about 400 steps.
COMPILE_MIN_STEPS = 1000


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use ($CXX, then g++, c++, clang++), or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for name in names if (path := shutil.which(name))), None)


def use_compile(flag: bool | str, max_steps: int, steady_shapes: bool = True) -> bool:
    """Whether SFT compiles the model: ``torch_compile`` resolved for this machine, the run's length and
    whether its batches keep their shape (``steady_shapes``: rows of one shape, or batches of similar
    length; rows of any length at random made the compiled model slower than eager, docs/experiments.md)."""
    if flag != "auto":
        return bool(flag)
    long_run = max_steps >= COMPILE_MIN_STEPS
    return not _torch().cuda.is_available() and long_run and steady_shapes and cxx_compiler() is not None


def one_shape(rows, processor, n: int = 256) -> bool:
    """Whether the first ``n`` rows all hold as many images and as many tokens in each part (prompt and
    answer, or each turn of a multi-turn row): MAgSeg's plain grids do; Text4Seg's run-length answers do not."""
    parts = ["prompt", "completion"] if "completion" in rows.column_names else ["messages"]
    if parts[-1] not in rows.column_names:
        return False
    tok = getattr(processor, "tokenizer", processor)

    def n_tokens(message) -> int:
        text = "".join(p.get("text") or "" for p in message["content"] if isinstance(p, dict))
        return len(tok(text, add_special_tokens=False)["input_ids"])

    head = rows.select(range(min(n, len(rows))))
    shapes = {(len(r["images"]), *(n_tokens(m) for part in parts for m in r[part])) for r in head}
    return len(shapes) == 1


def use_length_groups(flag: bool | str, fixed_shape: bool, tile_group: int = 1) -> bool:
    """Whether SFT batches rows of similar length: ``group_by_length`` resolved for rows that all have one
    shape or not (``fixed_shape``: grouping them saves nothing) and for ``tile_group`` (its own order)."""
    if flag == "auto":
        return not fixed_shape and tile_group == 1 and _one_process()
    if flag and tile_group > 1:
        raise ValueError("group_by_length and tile_group > 1 each set the order of the rows: set one of them")
    if flag and not _one_process():
        raise ValueError("group_by_length trains in one process only: set it false for a multi-process run")
    return bool(flag)


def use_cpu_autocast(flag: bool | str) -> bool:
    """Whether SFT on the CPU trains in bf16 autocast: ``cpu_autocast`` resolved for this CPU."""
    torch = _torch()
    if torch.cuda.is_available():
        return False
    if flag != "auto":
        return bool(flag)
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _one_process() -> bool:
    """Whether this run trains in one process (no torchrun/accelerate world of several)."""
    return int(os.environ.get("WORLD_SIZE", "1")) == 1


def load_split(jsonl: str | Path, max_examples: int | None = None, seed: int = 0):
    """A conversations file as a datasets.Dataset (optionally a seeded random subset)."""

    path = Path(jsonl)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run notebook 02_instruction_format first")
    ds = prompts.load_conversations(path)
    if max_examples is not None and len(ds) > max_examples:
        ds = ds.shuffle(seed=seed).select(range(max_examples))
    return ds


def row_weights(gt_masks, power: float = 1.0) -> np.ndarray:
    """A sampling weight per training row: (1 / frequency of the rarest class in its target) ** power.

    Rows holding a rare class (water, trees) are drawn more often, so the model sees them more than
    their share of cells; ``power`` 0 gives equal weights.
    """
    masks = [np.asarray(m) for m in gt_masks]
    counts = np.zeros(len(CLASSES))
    for m in masks:
        counts += np.bincount(m[m != NODATA].ravel(), minlength=len(CLASSES))[: len(CLASSES)]
    inv = 1.0 / np.maximum(counts / max(counts.sum(), 1), 1e-6)
    w = np.array([inv[np.unique(m[m != NODATA])].max() if (m != NODATA).any() else 1.0 for m in masks])
    return (w / w.max()) ** power


def balanced_rows(ds, power: float, seed: int = 0):
    """The dataset redrawn (same size, with replacement, seeded) by :func:`row_weights`; unchanged at 0."""
    if not power or len(ds) == 0:
        return ds
    w = row_weights(ds["gt_mask"], power)
    idx = np.random.default_rng(seed).choice(len(ds), size=len(ds), replace=True, p=w / w.sum())
    return ds.select(np.sort(idx))


def tile_grouped_order(tile_ids, group: int, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` training draws in which each run of ``group`` rows shows one tile.

    Pass after pass over the rows: each tile's rows are shuffled and cut into runs of ``group`` (a
    tile's last run may be shorter), the runs are shuffled, and every row is drawn once per pass."""
    if group < 1:
        raise ValueError(f"tile_group must be at least 1, got {group}")
    tiles = np.asarray(tile_ids).astype(str)
    rng = np.random.default_rng(seed)
    by_tile = [np.flatnonzero(tiles == t) for t in np.unique(tiles)]
    order: list[int] = []
    while len(order) < n:
        runs = [
            idx[i : i + group] for idx in map(rng.permutation, by_tile) for i in range(0, len(idx), group)
        ]
        for k in rng.permutation(len(runs)):
            order.extend(runs[k].tolist())
    return np.asarray(order[:n], dtype=int)


def length_grouped_epoch(lengths, batch: int, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """One pass over the rows (each once) in which each run of ``batch`` rows has similar lengths:
    transformers' ``get_length_grouped_indices`` (as its ``group_by_length`` sampler), seeded by
    ``seed`` and ``epoch``, so a resumed run draws its epoch again as it was."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = [int(x) for x in lengths]
    if batch < 1 or not lengths:
        raise ValueError(
            f"length_grouped_epoch needs rows and a batch of at least 1, got {len(lengths)}, {batch}"
        )
    gen = _torch().Generator().manual_seed(seed * 7919 + epoch)
    return np.asarray(get_length_grouped_indices(lengths, batch, generator=gen), dtype=int)


def length_grouped(trainer_cls, lengths, batch: int, seed: int):
    """``trainer_cls`` drawing its training rows in batches of similar length (:func:`length_grouped_epoch`),
    epoch by epoch as its own random sampler would: same rows a pass, same short last batch, fewer pads."""
    torch = _torch()

    class Epochs(torch.utils.data.Sampler):
        def __init__(self):
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at each epoch's start
            self.epoch = epoch

        def __len__(self) -> int:
            return len(lengths)

        def __iter__(self):
            return iter(length_grouped_epoch(lengths, batch, seed, self.epoch).tolist())

    class LengthGrouped(trainer_cls):
        length_groups = True  # recorded in train_done.json

        def _get_train_sampler(self, train_dataset=None):
            return Epochs()

    return LengthGrouped


def row_tokens(ds, collate, chunk: int = 64) -> np.ndarray:
    """Tokens of each row of ``ds`` as ``collate`` builds them (its attention mask: no padding)."""
    counts: list[int] = []
    for i in range(0, len(ds), chunk):
        batch = collate([ds[j] for j in range(i, min(i + chunk, len(ds)))])
        counts.extend(batch["attention_mask"].sum(1).tolist())
    return np.asarray(counts, dtype=int)


def training_rows(s: CommonSettings, train_ds=None):
    """The rows a run trains on: ``train_ds`` or its JSONL (seeded subset), redrawn by ``class_balance``."""
    rows = train_ds if train_ds is not None else load_split(s.train_jsonl, s.max_train_examples, s.seed)
    return balanced_rows(rows, s.class_balance, s.seed)


def _quiet(trainer):
    """Our log callback prints a rounded line per log; drop the trainer's own unrounded printer."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def log_callback(csv_path: Path, time_budget_s: float | None = None, verbose: bool = True):
    """A callback that writes the trainer's log history to CSV at every log (an interrupted run keeps
    its log) and stops training, with a checkpoint, after an optional time budget. Under the runner it
    also writes a small status file at every step (``magseg_nb.progress``) for the live progress line."""
    from transformers import TrainerCallback

    folder = Path(csv_path).parent
    task = f"training {folder.parent.name.removesuffix('.partial')}/{folder.name}"
    shown = ("loss", "reward", "rewards/dice_reward/mean", "eval_loss")

    class LogCallback(TrainerCallback):
        t0 = time.time()
        last: dict = {}

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()
            progress.write_status(task, state.global_step, state.max_steps, self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero:
                return
            write_log_csv(state.log_history, csv_path)
            self.last.update(
                {k.split("/")[-2] if "/" in k else k: v for k, v in (logs or {}).items() if k in shown}
            )
            progress.write_status(task, state.global_step, state.max_steps, self.t0, **self.last)
            if verbose and logs:
                show = {k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items()}
                print(f"step {state.global_step}/{state.max_steps}: {show}", flush=True)

        def on_step_end(self, args, state, control, **kw):
            if state.is_world_process_zero:
                progress.write_status(task, state.global_step, state.max_steps, self.t0, **self.last)
            if time_budget_s is not None and time.time() - self.t0 > time_budget_s:
                print(f"time budget of {time_budget_s:.0f} s reached at step {state.global_step}", flush=True)
                control.should_training_stop = True
                control.should_save = True

    return LogCallback()


def write_log_csv(log_history: list[dict], csv_path: Path) -> pd.DataFrame:
    df = pd.DataFrame([h for h in log_history if "step" in h])
    with files.atomic(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def checkpoint_problem(ckpt: Path) -> str | None:
    """None when a ``checkpoint-N`` folder is complete, else what is missing. The Trainer writes
    ``trainer_state.json`` last, so a checkpoint cut off by a kill lacks it or has it half-written."""
    state_path = Path(ckpt) / "trainer_state.json"
    try:
        step = json.loads(state_path.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError) as err:
        return f"no readable trainer_state.json ({type(err).__name__})"
    if str(step) != Path(ckpt).name.rsplit("-", 1)[-1]:
        return f"trainer_state.json says step {step}"
    return None


def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint; incomplete ones (a killed save) are removed with a warning."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for ckpt in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt)
        print(f"warning: removing incomplete checkpoint {ckpt} ({problem})", flush=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


CHECKPOINT_STAGING = ".saving"  # checkpoints are written here, then renamed into checkpoints/


def atomic_checkpoints(trainer_cls):
    """``trainer_cls`` writing each checkpoint into ``<output_dir>/.saving/`` and renaming it to
    ``<output_dir>/checkpoint-N`` only when complete, so a kill mid-save never leaves a half-written
    ``checkpoint-N`` for a rerun to resume from (:func:`last_checkpoint` still checks, for old runs)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    class AtomicCheckpoints(trainer_cls):
        _staging: str | None = None

        def _get_output_dir(self, trial):
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            run_dir = Path(super()._get_output_dir(trial))
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            staging = run_dir / CHECKPOINT_STAGING
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed save
            self.accelerator.wait_for_everyone()
            self._staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()  # every rank's shards are written before the rename
            if self.args.should_save:
                files.replace_dir(staging / name, run_dir / name)
                shutil.rmtree(staging, ignore_errors=True)
                rotate_checkpoints(str(run_dir), self.args.save_total_limit, use_mtime=True)
            self.accelerator.wait_for_everyone()

    AtomicCheckpoints.__name__ = AtomicCheckpoints.__qualname__ = f"Atomic{trainer_cls.__name__}"
    return AtomicCheckpoints


def _save_atomic(model, processor, dest: Path) -> None:
    with files.atomic(dest) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def _common_args(s: CommonSettings, ckpt_dir: Path) -> dict:
    torch = _torch()
    return dict(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        max_steps=s.max_steps,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay,
        logging_steps=s.logging_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        report_to="none",
        bf16=use_bf16(s.bf16),
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if s.gradient_checkpointing else None,
        seed=s.seed,
        data_seed=s.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _train_dtype(s: CommonSettings) -> str:
    return "bfloat16" if use_bf16(s.bf16) else "float32"


# --- SFT ------------------------------------------------------------------------------------------


def sft_dataset(ds):
    """Only what SFTTrainer needs: images + conversational prompt/completion (loss on the answer only)."""
    keep = ["images", "prompt", "completion"]
    if "messages" in ds.column_names:  # one multi-turn conversation per tile (tile_conversations)
        keep = ["images", "messages"]
    missing = [c for c in keep if c not in ds.column_names]
    if missing:
        raise ValueError(f"conversations lack columns {missing}; have {ds.column_names}")
    return ds.select_columns(keep)


def token_collator(ds, processor):
    """The collator whose attention mask counts each row's tokens as training sees them: ours for
    multi-turn rows (:func:`sft_collator`), TRL's prompt/completion collator with images otherwise."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    return sft_collator(ds, processor) or DataCollatorForVisionLanguageModeling(
        processor=processor, completion_only_loss=True
    )


def sft_collator(ds, processor):
    """None (TRL's prompt/completion collator) for per-patch rows; for multi-turn rows (one per tile)
    a collator that puts the loss on every answer and its <end_of_turn>, as TRL's does for one."""
    if "messages" not in ds.column_names:
        return None

    return MultiTurnCollator(processor)


def train_sft(model, processor, train_ds, s: SFTSettings, out: Path, peft_config=None):
    """Run SFTTrainer (resuming from out/checkpoints) and return the trainer."""
    from trl import SFTConfig, SFTTrainer

    rows, order = sft_dataset(train_ds), {}
    if s.by_cells:  # before any reordering: the shares follow train_ds's rows
        rows = with_cell_shares(rows, train_ds, s)
    if s.tile_group > 1:
        if not _one_process():
            raise ValueError(
                "tile_group > 1 trains in one process only: set tile_group: 1 for a multi-process run"
            )
        if "tile_id" not in train_ds.column_names:
            raise ValueError(f"tile_group={s.tile_group} needs a 'tile_id' column in the training rows")
        # The order is the sampler: n draws, read in sequence (a resumed run skips the batches it has seen).
        n = s.max_steps * s.batch_size * s.grad_accum
        rows = rows.select(tile_grouped_order(train_ds["tile_id"], s.tile_group, n, s.seed))
        order = {"train_sampling_strategy": "sequential"}
    # one_shape tokenizes 256 rows: only an "auto" setting reads it
    fixed = "auto" in (s.group_by_length, s.torch_compile) and one_shape(rows, processor)
    grouped = use_length_groups(s.group_by_length, fixed, s.tile_group)
    speed = {"torch_compile": use_compile(s.torch_compile, s.max_steps, fixed or grouped)}
    if use_cpu_autocast(s.cpu_autocast):
        speed["bf16"] = True  # on the CPU: autocast, the weights stay float32 (_train_dtype)
    args = SFTConfig(
        **{**_common_args(s, out / "checkpoints"), **speed},
        **order,
        max_length=None,  # never truncate: image tokens must stay whole
        completion_only_loss=True,  # the loss covers the answer (and <end_of_turn>) only
    )
    trainer_cls = label_weighted(SFTTrainer, label_token_weights(processor, s.label_weights))
    trainer_cls = loraplus(trainer_cls, s.loraplus_lr_ratio)
    if grouped:
        lengths = row_tokens(rows, token_collator(train_ds, processor))
        trainer_cls = length_grouped(trainer_cls, lengths, s.batch_size * s.grad_accum, s.seed)
    if s.by_cells:
        ids = class_token_ids(processor)
        trainer_cls = soft_labelled(trainer_cls, ids, s.soft_labels, s.mixed_cell_weight)
    trainer = atomic_checkpoints(trainer_cls)(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=sft_collator(train_ds, processor),
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[log_callback(out / "log.csv", s.time_budget_s)],
    )
    if s.by_cells:
        trainer.data_collator = SharesCollator(trainer.data_collator)
    if s.photometric:
        trainer.data_collator = JitteredColours(trainer.data_collator, s.photometric, s.seed)
    return fit(trainer, out, share_images=s.tile_group > 1)


def with_cell_shares(rows, train_ds, s: SFTSettings):
    """``rows`` with a ``cell_shares`` column (cells x classes, :func:`prompts.cell_shares`) from the tile
    masks of ``s.pixel_labels`` (the settings themselves are checked by :class:`SFTSettings`)."""
    if "tile_id" not in train_ds.column_names or "patch_row" not in train_ds.column_names:
        raise ValueError(
            f"{s.cell_settings}: the training rows lack tile_id/patch_row/patch_col (MAgSeg rows have them)"
        )
    from magseg_nb import geo

    masks: dict[str, np.ndarray] = {}
    shares = []
    for row in train_ds.select_columns(["tile_id", "patch_row", "patch_col", "patch_layout", "grid"]):
        tid = row["tile_id"]
        if tid not in masks:
            masks[tid] = geo.read_tile(s.pixel_labels, tid).semantic
        patch = prompts.row_patch(row)
        shares.append(
            prompts.cell_shares(masks[tid], patch, prompts.row_layout(row), int(row["grid"])).tolist()
        )
    return rows.add_column("cell_shares", shares)


def class_name_ids(processor) -> dict[str, list[int]]:
    """The token ids that write each class name in an answer, in class order."""
    tok = getattr(processor, "tokenizer", processor)
    return {name: tok(name, add_special_tokens=False)["input_ids"] for name in CLASSES}


def class_token_ids(processor) -> list[int]:
    """The one token id that writes each class, in class order."""
    ids = class_name_ids(processor)
    if any(len(i) != 1 for i in ids.values()):
        raise ValueError(
            f"soft labels and mixed-cell weights need one token per class name; this tokenizer writes {ids}"
        )
    return [i[0] for i in ids.values()]


def jitter_colours(images, factors):
    """``images`` (PIL) with brightness, contrast and saturation scaled by ``factors`` (three floats, 1: as is)."""
    from PIL import ImageEnhance

    out = []
    for img in images:
        img = img.convert("RGB")
        for enhance, f in zip(
            (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors, strict=True
        ):
            img = enhance(img).enhance(float(f))
        out.append(img)
    return out


class JitteredColours:
    """A collator whose rows' images are jittered in colour (:func:`jitter_colours`), one draw of factors in
    ``[1 - strength, 1 + strength]`` per row, shared by its images, from a generator seeded by ``seed``."""

    def __init__(self, inner, strength: float, seed: int = 0):
        self.inner, self.strength = inner, strength
        self.rng = np.random.default_rng(seed)

    def __call__(self, examples):
        jittered = []
        for ex in examples:
            factors = self.rng.uniform(1 - self.strength, 1 + self.strength, size=3)
            jittered.append({**ex, "images": jitter_colours(ex["images"], factors)})
        return self.inner(jittered)


class SharesCollator:
    """TRL's collator, plus the rows' ``cell_shares`` as a (batch, cells, classes) tensor."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        torch = _torch()
        shares = [ex.pop("cell_shares") for ex in examples]
        batch = self.inner(examples)
        batch["cell_shares"] = torch.tensor(shares, dtype=torch.float32)
        return batch


def soft_labelled(trainer_cls, class_ids: list[int], alpha: float, mixed_weight: float = 1.0):
    """``trainer_cls`` (an SFTTrainer) whose loss trains the k-th class token of each answer towards
    ``(1 - alpha) x`` its written label ``+ alpha x`` the k-th cell's pixel shares (a cell without valid
    pixels keeps its label), weighing it ``mixed_weight`` where the cell is mixed (purity under
    ``MIXED_PURITY``); every other answer token as before, weight 1; the weighted mean over answer tokens."""

    class SoftLabelled(trainer_cls):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "cell_shares" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "cell_shares"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            torch = _torch()
            shares = inputs.pop("cell_shares")
            labels = inputs.pop("labels")[:, 1:]
            inputs["use_cache"] = False
            outputs = model(**inputs)
            logp = torch.log_softmax(outputs.logits[:, :-1].float(), dim=-1)
            answer = labels != -100
            per_token = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * answer
            ids = torch.tensor(class_ids, device=labels.device)
            is_class = torch.isin(labels, ids)
            counts = is_class.sum(dim=1)
            if not bool((counts == shares.shape[1]).all()):
                raise ValueError(
                    f"soft_labels: answers hold {counts.tolist()} class tokens, their cells {shares.shape[1]}"
                )
            written = torch.nn.functional.one_hot(
                (labels[is_class].unsqueeze(-1) == ids).float().argmax(-1), len(class_ids)
            ).float()
            cell = shares.to(logp.device).reshape(-1, len(class_ids))
            cell = torch.where(cell.sum(-1, keepdim=True) > 0, cell, written)
            target = (1 - alpha) * written + alpha * cell
            per_token[is_class] = -(target * logp[is_class][:, ids]).sum(-1)
            weight = answer.to(per_token.dtype)
            weight[is_class] = torch.where(cell.max(-1).values < MIXED_PURITY, mixed_weight, 1.0)
            loss = (per_token * weight).sum() / weight.sum().clamp(min=1e-6)
            return (loss, outputs) if return_outputs else loss

    return SoftLabelled


def label_token_weights(processor, weights: dict[str, float] | None):
    """``{token id: weight}`` for the tokens that write each named class in an answer; None for None."""
    if not weights:
        return None
    unknown = set(weights) - set(CLASSES)
    if unknown:
        raise ValueError(f"label_weights: unknown classes {sorted(unknown)}; the classes are {list(CLASSES)}")
    ids = class_name_ids(processor)
    out = {}
    for name, w in weights.items():
        shared = [c for c in CLASSES if c != name and set(ids[c]) & set(ids[name])]
        if shared:
            raise ValueError(f"label_weights: '{name}' shares a token with {shared} in this tokenizer")
        out.update({i: float(w) for i in ids[name]})
    return out


def label_weighted(trainer_cls, token_weights: dict[int, float] | None):
    """``trainer_cls`` (an SFTTrainer) whose loss weighs each answer token by ``token_weights`` (1 for
    the rest): the weighted mean over a batch's answer tokens. Unchanged for None."""
    if not token_weights:
        return trainer_cls

    class LabelWeighted(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)  # log-probs of the shifted labels, 0 where ignored
            labels = inputs["labels"][:, 1:]
            weight = outputs.label_mask.to(outputs.log_probs.dtype)  # 1 on answer tokens, 0 elsewhere
            for i, w in token_weights.items():  # a few class tokens; ignored positions hold -100, never i
                weight = weight.masked_fill(labels == i, w)
            loss = -(outputs.log_probs * weight).sum() / weight.sum().clamp(min=1e-6)
            return (loss, outputs) if return_outputs else loss

    return LabelWeighted


def loraplus(trainer_cls, ratio: float | None):
    """``trainer_cls`` whose optimizer is PEFT's LoRA+ AdamW (B matrices at ``ratio`` x the learning
    rate), with the trainer's betas, eps and weight decay; unchanged for None."""
    if ratio is None:
        return trainer_cls
    if ratio < 1:
        raise ValueError(f"loraplus_lr_ratio must be >= 1 (LoRA+ speeds up the B matrices), not {ratio}")

    class LoraPlus(trainer_cls):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                from peft.optimizers import create_loraplus_optimizer

                a = self.args
                self.optimizer = create_loraplus_optimizer(
                    self.model if model is None else model,
                    _torch().optim.AdamW,
                    lr=a.learning_rate,
                    loraplus_lr_ratio=ratio,
                    betas=(a.adam_beta1, a.adam_beta2),
                    eps=a.adam_epsilon,
                    loraplus_weight_decay=a.weight_decay,
                )
            return self.optimizer

    return LoraPlus


def fit(trainer, out: Path, share_images: bool = False):
    """Train, resuming from the last complete checkpoint in ``out/checkpoints``; keep ``out/log.csv``.
    ``share_images``: a batch's identical images go through the vision tower once (the gradient of
    each copy reaches the one encoding)."""
    _quiet(trainer)
    resume = last_checkpoint(out / "checkpoints")
    if resume:
        print(f"resuming from {resume}", flush=True)
    with models.shared_image_features(trainer.model) if share_images else nullcontext():
        trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        write_log_csv(trainer.state.log_history, out / "log.csv")
    return trainer


# What a finished training leaves besides its weights, taken along when another folder adopts it.
TRAINING_RECORDS = ("log.csv", "ranks")


def _adopt_finished(src: Path, out: Path, dest_name: str, s) -> dict | None:
    """Copy a training that finished in ``src`` with these settings (its weights, record and log) into
    ``out``; None when ``src`` holds none. A stage rerun for a scoring setting starts from an empty
    folder; this spares it the training. Every process sees the record, so all of them skip training;
    the main process copies."""
    done = _read_done(src, s)
    if done is None or not (src / dest_name).is_dir():
        return None
    if not _is_main():
        return done
    shutil.copytree(src / dest_name, out / dest_name, dirs_exist_ok=True)
    for name in TRAINING_RECORDS:
        if (src / name).is_dir():
            shutil.copytree(src / name, out / name, dirs_exist_ok=True)
        elif (src / name).is_file():
            shutil.copy2(src / name, out / name)
    files.write_json(out / DONE_FILE, done)  # last: the record says the copy is complete
    print(f"{src / dest_name} finished with these settings; copied, not trained again", flush=True)
    return done


def _run(
    s: CommonSettings, dest_name: str, train, train_ds=None, val_ds=None, full: bool = False, reuse=None
) -> dict:
    """The one loop of SFT and GRPO: skip when ``out/train_done.json`` (or ``reuse/train_done.json``,
    then copied) matches the settings; else load the rows, ``train(train_ds, out) -> (trainer,
    processor)``, save the weights and the record; then score the validation split. ``run_sft`` and
    ``run_grpo`` differ only in settings, data and ``train``."""
    _torch().manual_seed(s.seed)
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / dest_name
    done = finished_training(s, dest_name, reuse)
    t0 = time.time()
    model = processor = None
    if done is None:
        _drop_checkpoints_of_other_inputs(out / "checkpoints", inputs_hash(s))
        train_ds = training_rows(s, train_ds)
        trainer, processor = train(train_ds, out)
        done = _save_trained(trainer, processor, dest, s, t0, len(train_ds))
        model = trainer.model
    else:
        print(f"{dest} is complete for these settings; skipping training", flush=True)
    return _result(s, dest, done, model, processor, val_ds, full)


def finished_training(s: CommonSettings, dest_name: str, reuse=None) -> dict | None:
    """The record of a training finished with settings ``s`` in its ``output_dir``, or in ``reuse`` (a
    stage's previous output; then copied in, see :func:`_adopt_finished`); None when neither holds one."""
    out = Path(s.output_dir)
    done = _read_done(out, s)
    if done is None and reuse is not None and Path(reuse).resolve() != out.resolve():
        done = _adopt_finished(Path(reuse), out, dest_name, s)
    return done


def weights_dir_name(s: SFTSettings) -> str:
    """Where an SFT run saves its weights: ``model`` for a full fine-tune, else ``adapter``."""
    return "model" if s.full_finetune else "adapter"


INPUTS_STAMP = "INPUTS"  # in checkpoints/: inputs_hash of the run that wrote them


def _drop_checkpoints_of_other_inputs(ckpt_dir: Path, stamp: str) -> None:
    """Resuming continues a run with the same inputs (more steps may be asked for); checkpoints of another
    base model, other rows or another starting adapter are removed, never resumed."""
    if not _is_main():
        return
    marker = ckpt_dir / INPUTS_STAMP
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        if not marker.is_file() or marker.read_text().strip() != stamp:
            print(f"warning: removing {ckpt_dir}: its checkpoints come from other inputs", flush=True)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    files.write_text(marker, stamp + "\n")


def run_sft(cfg: dict | SFTSettings, train_ds=None, val_ds=None, reuse=None) -> dict:
    """LoRA SFT of ``base_model`` on ``train_jsonl``; saves the adapter, log.csv and eval.json.

    A rerun with the same settings whose adapter is complete skips training; an interrupted one
    resumes from the last checkpoint. ``reuse``: a folder where the same training may have finished
    before (a stage's previous output); it is copied instead of trained. ``train_ds``/``val_ds``
    replace the JSONL files when given.
    """

    s = _settings(SFTSettings, cfg if isinstance(cfg, SFTSettings) else dict(cfg))

    def train(rows, out):
        # A full fine-tune resumes from the checkpoint's weights: the Trainer's own resume does not map
        # the checkpoint's saved key names back onto the model (it warns and keeps the base weights).
        resume = last_checkpoint(out / "checkpoints") if s.full_finetune else None
        model, processor = models.load_model_and_processor(
            resume or s.base_model, dtype=_train_dtype(s), device="cpu", trainable=True
        )
        peft_config = None
        if not s.full_finetune:
            peft_config = models.lora_config(
                r=s.lora_r,
                alpha=s.lora_alpha,
                dropout=s.lora_dropout,
                target_modules=s.target_modules,
                train_projector=s.train_projector,
                train_embeddings=s.train_embeddings,
            )
        return train_sft(model, processor, rows, s, out, peft_config), processor

    return _run(s, weights_dir_name(s), train, train_ds, val_ds, s.full_finetune, reuse)


def write_rank_record(trainer, out: Path) -> dict:
    """Every process's own record of a finished run, ``out/ranks/rank<k>.json``: its rank, the world
    size, the steps it ran and a checksum of its trainable weights (equal on all ranks under DDP), so
    a multi-process run shows that each process took part. The only file a non-main process writes."""
    acc = trainer.accelerator
    local = [getattr(p, "to_local", lambda p=p: p)() for p in trainer.model.parameters() if p.requires_grad]
    record = {
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "is_main": acc.is_main_process,
        "distributed_type": str(acc.distributed_type),
        "backend": str(getattr(acc.state, "backend", None)),
        "device": str(acc.device),
        "pid": os.getpid(),
        "global_step": trainer.state.global_step,
        "trainable_params_local": int(sum(p.numel() for p in local)),
        "trainable_sum": float(sum(float(p.detach().float().sum()) for p in local)),
    }
    (Path(out) / "ranks").mkdir(parents=True, exist_ok=True)
    files.write_json(Path(out) / "ranks" / f"rank{acc.process_index}.json", record)
    return record


def _save_trained(trainer, processor, dest: Path, s, t0: float, n_train: int) -> dict | None:
    """Save the trained weights and the record that lets a rerun skip training (main process only)."""
    write_rank_record(trainer, Path(s.output_dir))
    if not trainer.is_world_process_zero():
        return None
    _save_atomic(trainer.model, processor, dest)
    steps = trainer.state.global_step
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    done = {
        "settings_hash": settings_hash(s),
        "steps": steps,
        "steps_planned": s.max_steps,
        # A time budget that cut the run is part of its result, never silent.
        "stopped_early": steps < s.max_steps,
        "tokens_seen": int(tokens[-1]) if tokens else None,
        "train_seconds": round(time.time() - t0, 1),
        "torch_threads": _torch().get_num_threads(),  # train_seconds depends on it (and the results may)
        "torch_compile": bool(trainer.args.torch_compile),  # so may these two
        "cpu_autocast": bool(trainer.args.bf16 and not _torch().cuda.is_available()),
        "length_groups": bool(getattr(trainer, "length_groups", False)),  # batches of similar length
        "n_train": n_train,
    }
    if done["stopped_early"]:
        print(
            f"WARNING: stopped at step {steps} of {s.max_steps} (time_budget_s={s.time_budget_s})", flush=True
        )
    files.write_json(Path(s.output_dir) / DONE_FILE, done)
    return done


def _result(s, dest: Path, done, model, processor, val_ds, full: bool = False) -> dict:
    """What run_sft/run_grpo return: paths, the training record and (main process) the validation scores."""
    result = {"output_dir": str(s.output_dir), "trained": str(dest), **(done or {})}
    if _is_main() and s.eval_max_examples != 0 and (s.val_jsonl or val_ds is not None):
        key = scoring_key(s, done) if val_ds is None else None  # an in-memory split is always scored
        report = scored_before(s, key)
        if report is not None:
            print(
                f"{Path(s.output_dir) / layout.EVAL_JSON} scored these weights already; not scored again",
                flush=True,
            )
            result["eval"] = report
            return result
        if model is None:
            model, processor = _load_trained(s.base_model, dest, full)
        else:  # the trained model, saved above; nothing trains it further
            model = models.merge_lora(model)
        helper, least = os.environ.get(SCORING_HELPER_ENV), os.environ.get(SCORING_HELPER_MIN_ENV)
        least = SCORING_HELPER_MIN_ANSWERS if least is None else int(least)
        answers_of = helper_answers(s, dest, full, int(helper), least) if helper and val_ds is None else None
        result["eval"] = evaluate_split(
            model, processor, s, val_ds=val_ds, train_jsonl=s.train_jsonl, key=key, answers_of=answers_of
        )
    return result


def scoring_key(s: CommonSettings, done: dict | None) -> str:
    """What a validation score depends on: every setting (the scoring ones too), the validation rows and
    the record of the training that made the weights (a retrained adapter is scored again)."""
    values = {**dataclasses.asdict(s), "val": input_identity(s.val_jsonl), "done": done or {}}
    return files.sha256_json(values)[:12]


def scored_before(s: CommonSettings, key: str | None) -> dict | None:
    """The report of a scoring already done with ``key`` in ``output_dir`` (its eval.json, written after
    answers.jsonl, names the key), or None. A side-by-side training scores itself in its own process;
    the notebook then reads the scores instead of computing them again."""
    path = Path(s.output_dir) / layout.EVAL_JSON
    if key is None or not path.is_file() or not (Path(s.output_dir) / layout.ANSWERS).is_file():
        return None
    report = json.loads(path.read_text())
    return report if report.get("scoring_key") == key else None


def _read_done(out: Path, s) -> dict | None:
    path = out / DONE_FILE
    if not path.exists():
        return None
    done = json.loads(path.read_text())
    return done if done.get("settings_hash") == settings_hash(s) else None


def _load_trained(base_model, dest: Path, full: bool = False):

    if full:
        return models.load_model_and_processor(str(dest))
    return models.load_model_and_processor(base_model, adapter_dir=str(dest))


# --- GRPO -----------------------------------------------------------------------------------------


def grpo_dataset(ds):
    """What GRPOTrainer needs: images, the prompt, and gt_mask (reaches the rewards as a keyword)."""
    keep = ["images", "prompt", "gt_mask"]
    missing = [c for c in keep if c not in ds.column_names]
    if missing:
        raise ValueError(f"conversations lack columns {missing}; have {ds.column_names}")
    return ds.select_columns(keep)


def reward_functions(weights: dict[str, float]) -> tuple[list, list[float]]:
    unknown = set(weights) - set(rewards.REWARD_FUNCS)
    if unknown:
        raise ValueError(f"unknown rewards {sorted(unknown)}; known: {sorted(rewards.REWARD_FUNCS)}")
    names = [n for n in rewards.REWARD_FUNCS if n in weights]
    return [rewards.REWARD_FUNCS[n] for n in names], [float(weights[n]) for n in names]


def run_grpo(cfg: dict | GRPOSettings, train_ds=None, val_ds=None, reuse=None) -> dict:
    """GRPO of the SFT adapter ``adapter_dir`` on ``base_model`` with the Dice + format rewards
    (``reuse`` as in :func:`run_sft`)."""

    s = _settings(GRPOSettings, cfg if isinstance(cfg, GRPOSettings) else dict(cfg))
    if not s.adapter_dir or not (Path(s.adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"GRPO starts from an SFT adapter, but {s.adapter_dir!r} holds no adapter_config.json: "
            "run notebook 03_sft first (or set adapter_dir)"
        )
    gen_batch = s.batch_size * s.grad_accum
    if gen_batch % s.num_generations:
        raise ValueError(
            f"batch_size*grad_accum ({gen_batch}) must be a multiple of num_generations ({s.num_generations})"
        )

    def train(rows, out):
        from trl import GRPOConfig, GRPOTrainer

        model, processor = models.load_model_and_processor(
            s.base_model, adapter_dir=s.adapter_dir, dtype=_train_dtype(s), device="cpu", trainable=True
        )
        funcs, weights = reward_functions(s.reward_weights)
        max_len = s.max_completion_length
        if max_len is None:
            max_len = answer_budget(processor, [rewards.completion_text(c) for c in rows["completion"]])
        args = GRPOConfig(
            **_common_args(s, out / "checkpoints"),
            num_generations=s.num_generations,
            max_completion_length=max_len,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            beta=s.beta,
            reward_weights=weights,
            loss_type=s.loss_type,
            use_vllm=False,
            log_completions=False,
        )
        trainer = atomic_checkpoints(GRPOTrainer)(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=grpo_dataset(rows),
            processing_class=processor,
            callbacks=[log_callback(out / "log.csv", s.time_budget_s)],
        )
        return fit(trainer, out), processor

    return _run(s, "adapter", train, train_ds, val_ds, reuse=reuse)


# --- evaluation -----------------------------------------------------------------------------------


def score_masks(
    gts: Sequence[np.ndarray], preds: Sequence[np.ndarray], valid: Sequence[bool] | None = None
) -> dict:
    """Cell accuracy and Dice per class pooled over all cells, mean per-answer Dice, share well-formed."""
    n = len(CLASSES)
    inter, size_g, size_p = np.zeros(n), np.zeros(n), np.zeros(n)
    correct = total = 0
    for gt, pred in zip(gts, preds, strict=True):
        gt, pred = np.asarray(gt), np.asarray(pred)
        keep = gt != NODATA
        g, p = gt[keep], pred[keep]
        correct += int((g == p).sum())
        total += int(keep.sum())
        for c in range(n):
            inter[c] += ((g == c) & (p == c)).sum()
            size_g[c] += (g == c).sum()
            size_p[c] += (p == c).sum()
    denom = size_g + size_p
    dice = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), np.nan)
    out = {
        "n": len(gts),
        "cell_accuracy": correct / max(total, 1),
        "mean_dice": float(np.mean([rewards.mean_dice(g, p) for g, p in zip(gts, preds, strict=True)])),
        **{f"dice_{name}": (None if np.isnan(dice[c]) else float(dice[c])) for c, name in enumerate(CLASSES)},
    }
    if valid is not None:
        out["valid_fraction"] = float(np.mean(valid)) if len(valid) else 0.0
    return out


def majority_class(gts: Sequence[np.ndarray]) -> int:
    counts = np.zeros(len(CLASSES), dtype=np.int64)
    for gt in gts:
        gt = np.asarray(gt)
        counts += np.bincount(gt[gt != NODATA].ravel(), minlength=len(CLASSES))[: len(CLASSES)]
    return int(counts.argmax())


def baselines(gts: Sequence[np.ndarray], train_gts: Sequence[np.ndarray] | None = None) -> dict:
    """Scores of answering 'field' everywhere and the training set's majority class everywhere."""
    major = majority_class(train_gts if train_gts is not None else gts)
    out = {}
    for name, cls in (("all_field", CLASS_IDS["field"]), ("majority_class", major)):
        out[name] = {
            **score_masks(gts, [np.full_like(np.asarray(g), cls) for g in gts]),
            "class": CLASSES[cls],
        }
    return out


def answer_budget(processor, completions: Sequence[str], margin: float = 1.25) -> int:
    """max_new_tokens that fits the longest reference answer with a margin (and <end_of_turn>)."""
    lengths = [len(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in completions]
    return int(max(lengths, default=16) * margin) + 8


def view_answers(
    model, processor, ds, views: Sequence[int], *, max_new_tokens, batch_size
) -> list[list[str]]:
    """Greedy answers of every row of ``ds`` in each extra view (``views[1:]``), one list per view.

    A row's first image is its tile (its patch, for a ``crop_only`` row); its patch, grid, encoding and
    prompt variant are its columns (rows of notebook 02's JSONL)."""
    out = []
    for v in views[1:]:
        examples = [views_mod.row_view_example(r["images"][0], *prompts.row_prompt(r), v) for r in ds]
        out.append(
            models.generate(model, processor, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
        )
    return out


def answers_by_view(
    model, processor, ds, views: Sequence[int], *, max_new_tokens, batch_size
) -> list[list[str]]:
    """Greedy answers of every row of ``ds`` as it is and in each extra view: one list per view, in order."""
    examples = [{"images": r["images"], "prompt": r["prompt"]} for r in ds]
    plain = models.generate(model, processor, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [
        plain,
        *view_answers(model, processor, ds, views, max_new_tokens=max_new_tokens, batch_size=batch_size),
    ]


def evaluate(
    model,
    processor,
    ds,
    *,
    max_new_tokens=None,
    batch_size=16,
    train_gts=None,
    test_views: int = 1,
    answers_of=None,
) -> tuple[dict, list[dict]]:
    """Greedy answers for every row of ``ds``, decoded and scored against gt_mask, with the baselines.

    With ``test_views`` > 1 each row is also answered in flipped/turned views and the views vote per cell
    (:mod:`magseg_nb.views`); the scores are the voted grids', the well-formed share the plain answers'.
    ``answers_of``: computes the answers in place of :func:`answers_by_view` (same arguments and result)."""

    views = views_mod.view_ids(test_views)
    refs = [rewards.completion_text(c) for c in ds["completion"]] if "completion" in ds.column_names else []
    if max_new_tokens is None:
        max_new_tokens = answer_budget(processor, refs) if refs else 512
    t0 = time.time()
    model.eval()
    texts, *extra = (answers_of or answers_by_view)(
        model, processor, ds, views, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    seconds = time.time() - t0
    gts = [np.asarray(g) for g in ds["gt_mask"]]
    decoded = [textgrid.decode(t, shape=g.shape) for t, g in zip(texts, gts, strict=True)]
    masks, answer_texts = [d.mask for d in decoded], list(texts)
    if len(views) > 1:
        encodings = ds["encoding"]
        for i, g in enumerate(gts):
            masks[i], answer_texts[i] = views_mod.voted_answer(
                [texts[i], *(e[i] for e in extra)], views, g.shape, encodings[i]
            )
    scores = score_masks(gts, masks, [d.report.valid for d in decoded])
    ids = ds["id"] if "id" in ds.column_names else list(range(len(ds)))
    answers = [
        {
            "id": i,
            "answer": a,
            "valid": d.report.valid,
            "repairs": d.report.repairs,
            "mean_dice": rewards.mean_dice(g, m),
            **({"plain_answer": t, "views": len(views)} if len(views) > 1 else {}),
        }
        for i, a, t, d, g, m in zip(ids, answer_texts, texts, decoded, gts, masks, strict=True)
    ]
    report = {
        "model": scores,
        "baselines": baselines(gts, train_gts),
        "max_new_tokens": max_new_tokens,
        "test_views": len(views),
        "generate_seconds": round(seconds, 1),
    }
    return report, answers


def validation_rows(s: CommonSettings, val_ds=None):
    """The rows ``s`` is scored on: ``val_ds`` or its validation file, a seeded subset of
    ``eval_max_examples`` when set."""
    val_ds = val_ds if val_ds is not None else load_split(s.val_jsonl, s.eval_max_examples, s.seed)
    if s.eval_max_examples and len(val_ds) > s.eval_max_examples:
        val_ds = val_ds.shuffle(seed=s.seed).select(range(s.eval_max_examples))
    return val_ds


# Set (to a thread count) by ``side_by_side`` for the processes it trains in: each then scores the second half
# of its validation rows in a helper process of that many threads while it answers the first half, so the
# last training's scoring does not leave a core idle. The batches, so the answers, are the same either way.
SCORING_HELPER_ENV = "MAGSEG_SCORING_HELPER_THREADS"
SCORING_HELPER_MIN_ENV = "MAGSEG_SCORING_HELPER_MIN_ANSWERS"
# The fewest answers (rows x views) handed on that are worth a helper, which loads the model again: on the
# 2-core Intel Xeon host 32 answers took 3.27 x the time with a helper, 256 answers 0.91 x, 512 answers 0.70 x
# (benchmarks/bench_scoring_helper.py, benchmarks/README.md).
SCORING_HELPER_MIN_ANSWERS = 256


def split_row(n: int, batch_size: int, n_views: int = 1, min_answers: int = 0) -> int:
    """Where the helper's rows start: about half of ``n``, at a batch boundary (every batch stays whole);
    ``n`` (nothing handed on) when the helper's rows would give fewer than ``min_answers`` answers in
    ``n_views`` views."""
    half = (n + 1) // 2
    start = min(n, (half + batch_size - 1) // batch_size * batch_size)
    return start if (n - start) * n_views >= max(min_answers, 1) else n


def helper_answers(
    s: CommonSettings, weights: Path, full: bool, threads: int, min_answers: int = SCORING_HELPER_MIN_ANSWERS
):
    """An ``answers_of`` for :func:`evaluate` that hands the rows from :func:`split_row` on to
    ``python -m magseg_nb.training answers`` (``threads`` threads, the saved ``weights``) and answers the
    rest itself; the two lists of each view are joined in row order. Too few rows for ``min_answers``:
    it answers them all itself."""

    def answers_of(model, processor, ds, views, *, max_new_tokens, batch_size):
        start = split_row(len(ds), batch_size, len(views), min_answers)
        if start >= len(ds):
            return answers_by_view(
                model, processor, ds, views, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
        from magseg_nb import side_by_side  # it imports this module

        out = Path(s.output_dir)
        config, result = out / "scoring_config.yaml", out / "scoring_helper.json"
        result.unlink(missing_ok=True)
        write_config(s, config)
        args = ["magseg_nb.training", "answers", "--config", str(config), "--weights", str(weights)]
        args += ["--from-row", str(start), "--max-new-tokens", str(max_new_tokens), "--out", str(result)]
        helper = side_by_side.start_child(
            "scoring helper", args + (["--full"] if full else []), threads, out / "scoring_helper.log"
        )
        try:
            mine = answers_by_view(
                model,
                processor,
                ds.select(range(start)),
                views,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            helper.wait(f"scoring validation rows {start}-{len(ds) - 1} of {out}")
        finally:
            helper.stop()
        theirs = json.loads(result.read_text())
        result.unlink()
        config.unlink()
        return [a + b for a, b in zip(mine, theirs, strict=True)]

    return answers_of


def answer_rows_from(
    s: CommonSettings, weights: Path, full: bool, start: int, max_new_tokens: int
) -> list[list[str]]:
    """What the scoring helper computes: the answers of validation rows ``start:`` of ``s`` in every view."""
    model, processor = _load_trained(s.base_model, Path(weights), full)
    model.eval()
    ds = validation_rows(s)
    ds = ds.select(range(start, len(ds)))
    return answers_by_view(
        model,
        processor,
        ds,
        views_mod.view_ids(s.test_views),
        max_new_tokens=max_new_tokens,
        batch_size=s.eval_batch_size,
    )


def evaluate_split(
    model, processor, s: CommonSettings, val_ds=None, train_jsonl=None, key=None, answers_of=None
) -> dict:
    """Evaluate on the validation split and write answers.jsonl, then eval.json (with ``key``, see
    :func:`scoring_key`), into ``s.output_dir``. ``answers_of``: see :func:`evaluate`."""
    val_ds = validation_rows(s, val_ds)
    train_gts = None
    if train_jsonl and Path(train_jsonl).exists():
        # gt masks only: reading the JSON lines directly avoids opening every image
        with open(train_jsonl) as fh:
            train_gts = [np.asarray(json.loads(line)["gt_mask"]) for line in fh if line.strip()]
    report, answers = evaluate(
        model,
        processor,
        val_ds,
        max_new_tokens=s.max_new_tokens,
        batch_size=s.eval_batch_size,
        train_gts=train_gts,
        test_views=s.test_views,
        answers_of=answers_of,
    )
    out = Path(s.output_dir)
    if key is not None:
        report["scoring_key"] = key
    files.write_jsonl(out / layout.ANSWERS, answers)
    files.write_json(out / layout.EVAL_JSON, report)  # last: it says the answers are complete
    return report


def eval_table(evals: dict[str, dict]) -> pd.DataFrame:
    """One row per (run, scorer): the model and its baselines, for notebooks."""
    rows = []
    for run, ev in evals.items():
        rows.append({"run": run, "scorer": "model", **ev["model"]})
        for name, b in ev["baselines"].items():
            rows.append(
                {
                    "run": run,
                    "scorer": f"{name} ({b['class']})",
                    **{k: v for k, v in b.items() if k != "class"},
                }
            )
    return pd.DataFrame(rows)


def tokens_per_step(s: SFTSettings, train_ds=None, chunk: int = 64) -> float:
    """Training tokens per optimizer step of ``s``, counted as the SFT trainer counts them (its
    ``num_tokens``: the collator's attention mask, so prompt, image and answer tokens, no padding), over
    one pass of the rows training would draw. Each epoch's short last batch counts as a step, as the
    trainer's data loader makes it one."""
    from transformers import AutoProcessor

    rows = training_rows(s, train_ds)
    processor = AutoProcessor.from_pretrained(s.base_model)
    tokens = int(row_tokens(sft_dataset(rows), token_collator(rows, processor), chunk).sum())
    steps_per_epoch = -(-len(rows) // s.batch_size) / s.grad_accum
    return tokens / steps_per_epoch


def planned_tokens(s: SFTSettings, train_ds=None) -> int:
    """The training tokens run ``s`` will see in its ``max_steps`` (:func:`tokens_per_step` x steps): the
    budget another format matches with ``equal_token_steps`` before either has trained, so both may
    train at once. A run that a time budget cuts sees fewer (``steps_warnings`` says so)."""
    return round(tokens_per_step(s, train_ds) * s.max_steps)


def steps_for_tokens(target_tokens: int | None, per_step: float) -> int:
    """Optimizer steps that see ``target_tokens`` at ``per_step`` tokens a step (:func:`tokens_per_step`):
    the budget of a comparison at equal training tokens rather than equal steps."""
    if not target_tokens or not per_step or per_step <= 0:
        raise ValueError(
            f"an equal-token budget needs the reference run's tokens_seen (got {target_tokens}) "
            f"and positive tokens per step (got {per_step})"
        )
    return max(1, round(target_tokens / per_step))


def equal_token_steps(s: SFTSettings, target_tokens: int | None, train_ds=None) -> int:
    """The steps that give run ``s`` as many training tokens as a reference run saw; says so."""
    per_step = tokens_per_step(s, train_ds)
    steps = steps_for_tokens(target_tokens, per_step)
    print(
        f"{Path(s.train_jsonl).name}: {per_step:.0f} tokens per step -> {steps} steps "
        f"for the reference run's {target_tokens} tokens",
        flush=True,
    )
    return steps


def check_format_steps(
    max_steps, formats: Sequence[str], equal_tokens: bool, reference: str = "magseg"
) -> None:
    """Refuse step settings that contradict each other: with ``equal_tokens`` the formats after the
    ``reference`` format get their steps from its tokens, so ``max_steps`` may not name them."""
    if not equal_tokens or reference not in formats or not isinstance(max_steps, dict):
        return
    named = sorted(f for f in max_steps if f != reference and f in formats)
    if named:
        raise ValueError(
            f"max_steps names steps for {named}, but equal_tokens sets them from {reference}'s training "
            f"tokens: give max_steps as {reference}'s steps only, or set equal_tokens: false"
        )


def training_order(formats: Sequence[str], reference: str = "magseg") -> list[str]:
    """``formats`` with the reference format first (the others may take their budget from it)."""
    return sorted(formats, key=lambda f: f != reference)


def budget_line(results: dict[str, dict], equal_tokens: bool) -> str:
    """How the formats' training budgets compare, in one line, from their run results."""
    runs = ", ".join(f"{k} {r.get('steps')} steps, {r.get('tokens_seen')} tokens" for k, r in results.items())
    steps = {r.get("steps") for r in results.values()}
    if equal_tokens:
        return f"At equal training tokens ({runs}):"
    return f"At equal steps ({runs}):" if len(steps) == 1 else f"At unequal steps ({runs}):"


RUN_COLUMNS = (
    "steps_planned",
    "steps",
    "stopped_early",
    "tokens_seen",
    "train_seconds",
    "torch_threads",
    "n_train",
)


def runs_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per trained run: steps planned and done, whether a time budget cut it, tokens, time."""
    rows = [{"run": k, **{c: r.get(c) for c in RUN_COLUMNS}} for k, r in results.items()]
    table = pd.DataFrame(rows, columns=["run", *RUN_COLUMNS])
    table["steps_done"] = table.pop("steps")
    return table[["run", "steps_planned", "steps_done", *RUN_COLUMNS[2:]]]


# Runs meant to see equal tokens may differ by a partial last epoch's rows; more than this is flagged.
TOKENS_TOLERANCE = 0.02


def steps_warnings(table: pd.DataFrame, equal_steps: bool = True, equal_tokens: bool = False) -> list[str]:
    """Sentences flagging runs cut short and, where the runs should have trained ``equal_steps`` (or
    seen ``equal_tokens``), comparisons at unequal steps (tokens); empty when all is even."""
    out = [
        f"{r.run} stopped early: {r.steps_done} of {r.steps_planned} steps (a time budget fired)."
        for r in table.itertuples()
        if r.stopped_early
    ]
    if equal_steps and table["steps_done"].nunique() > 1:
        done = ", ".join(f"{r.run} {r.steps_done}" for r in table.itertuples())
        out.append(
            f"The runs did not train for the same number of steps ({done}): compare them with that in mind."
        )
    tokens = table["tokens_seen"].dropna()
    if equal_tokens and len(tokens) > 1 and tokens.max() > (1 + TOKENS_TOLERANCE) * tokens.min():
        seen = ", ".join(f"{r.run} {r.tokens_seen}" for r in table.itertuples())
        out.append(f"The runs did not see equal training tokens ({seen}): compare them with that in mind.")
    return out


def stage_summary(results: dict[str, dict], base_model: str) -> dict:
    """The headline numbers of a stage (per format) for state.json: model vs baselines on validation."""
    out: dict[str, Any] = {"base_model": str(base_model)}
    for fmt, res in results.items():
        ev = res.get("eval")
        out[f"{fmt}_steps"] = res.get("steps")
        out[f"{fmt}_steps_planned"] = res.get("steps_planned")
        out[f"{fmt}_stopped_early"] = res.get("stopped_early")
        out[f"{fmt}_train_seconds"] = res.get("train_seconds")
        if not ev:
            continue
        m, b = ev["model"], ev["baselines"]
        for cls in CLASSES:
            out[f"{fmt}_val_dice_{cls}"] = m.get(f"dice_{cls}")
        out[f"{fmt}_val_mean_dice"] = m["mean_dice"]
        out[f"{fmt}_val_cell_accuracy"] = m["cell_accuracy"]
        out[f"{fmt}_val_valid_fraction"] = m.get("valid_fraction")
        out[f"{fmt}_all_field_dice_field"] = b["all_field"]["dice_field"]
        out[f"{fmt}_all_field_mean_dice"] = b["all_field"]["mean_dice"]
        out[f"{fmt}_majority_mean_dice"] = b["majority_class"]["mean_dice"]
        out[f"{fmt}_majority_cell_accuracy"] = b["majority_class"]["cell_accuracy"]
    return out


GRPO_STEP_COLUMNS = {
    "step": "step",
    "reward": "reward mean",
    "reward_std": "reward spread (std)",
    "frac_reward_zero_std": "groups with all-equal rewards",
    "kl": "KL to the reference",
    "rewards/dice_reward/mean": "Dice reward",
    "rewards/format_reward/mean": "format reward (1 = well-formed)",
    "completions/mean_length": "answer tokens",
}


def grpo_steps(log: pd.DataFrame, beta: float | None = None) -> pd.DataFrame:
    """Per-step GRPO diagnostics from log.csv: reward mean and spread, the share of groups whose
    rewards were all equal (no learning signal), KL to the reference, format reward, answer length.

    TRL computes KL only with a reference model (``beta > 0``); with ``beta == 0`` the column says so.
    """
    table = pd.DataFrame({new: log[old] for old, new in GRPO_STEP_COLUMNS.items() if old in log})
    if "KL to the reference" not in table and beta is not None:
        table["KL to the reference"] = "not computed (beta = 0: no reference model)" if beta == 0 else np.nan
    return table.dropna(subset=["reward mean"]) if "reward mean" in table else table


def compare_evals(
    before: dict, after: dict, keys=("dice_field", "mean_dice", "cell_accuracy", "valid_fraction")
) -> pd.DataFrame:
    """Model scores before and after a training stage, side by side, with the change."""
    rows = [{"score": k, "before": before["model"].get(k), "after": after["model"].get(k)} for k in keys]
    df = pd.DataFrame(rows)
    df["change"] = df["after"] - df["before"]
    return df


# --- command line (python -m / accelerate launch -m) ---------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(
        prog="python -m magseg_nb.training",
        description="LoRA SFT or GRPO from a YAML config (also under `accelerate launch -m magseg_nb.training`).",
    )
    parser.add_argument(
        "mode", choices=["sft", "grpo", "answers"], help="answers: the scoring helper (internal)"
    )
    parser.add_argument(
        "--config", required=True, help="YAML file whose keys are SFTSettings/GRPOSettings fields"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    helper = parser.add_argument_group("answers (the scoring helper of a side-by-side training)")
    helper.add_argument("--weights", help="the trained adapter (or full model) folder")
    helper.add_argument("--full", action="store_true", help="--weights is a full model")
    helper.add_argument("--from-row", type=int, default=0, help="the first validation row to answer")
    helper.add_argument("--max-new-tokens", type=int, help="the scoring's answer budget")
    helper.add_argument("--out", help="JSON file for the answers, one list per view")
    args = parser.parse_args(argv)
    path = Path(args.config)
    if not path.exists():
        parser.error(f"config file {path} does not exist")
    cfg = yaml.safe_load(path.read_text()) or {}
    for item in args.set:
        key, _, value = item.partition("=")
        cfg[key] = yaml.safe_load(value)
    if args.mode == "answers":
        if not (args.weights and args.out and args.max_new_tokens):
            parser.error("answers needs --weights, --out and --max-new-tokens")
        s = _settings(GRPOSettings if "adapter_dir" in cfg else SFTSettings, cfg)
        texts = answer_rows_from(s, Path(args.weights), args.full, args.from_row, args.max_new_tokens)
        files.write_json(Path(args.out), texts)
        return 0
    run = run_sft if args.mode == "sft" else run_grpo
    result = run(cfg)
    if _is_main():
        print(json.dumps(result, indent=2, default=files.json_default))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
