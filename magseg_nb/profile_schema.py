"""The schema of profiles and notebook parameters: types, ranges, allowed values, unknown keys.

``check_profile(data, path)`` returns one line per problem (file, key, what is allowed), so a bad
profile is refused before any stage starts instead of failing deep inside a notebook cell.
Every parameter of every notebook has a rule here; ``tests/test_faults.py`` keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from magseg_nb import models
from magseg_nb.files import UnsafeNameError, safe_id
from magseg_nb.textgrid import ENCODINGS

_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true/false",
    str: "text",
    list: "a list",
    dict: "a mapping",
}


@dataclass(frozen=True)
class Rule:
    """What one parameter accepts. ``kind`` int also takes no bools; float takes ints too."""

    kind: type | tuple[type, ...]
    lo: float | None = None  # inclusive minimum
    hi: float | None = None  # inclusive maximum
    choices: tuple | None = None  # allowed values (for a list: allowed items)
    none: bool = False  # null allowed
    items: Rule | None = None  # rule for each item of a list or value of a mapping
    keys: tuple[str, ...] | None = None  # allowed keys of a mapping
    nonempty: bool = False
    name: bool = False  # a text that becomes a file name (files.safe_id)

    def describe(self) -> str:
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        parts = []
        scalars = [k for k in kinds if k not in (list, dict)]
        if self.choices is not None:
            parts.append("one of " + ", ".join(repr(c) for c in self.choices))
        elif scalars:
            text = " or ".join(_TYPE_NAMES[k] for k in scalars)
            if self.lo is not None and self.hi is not None:
                text += f" from {self.lo:g} to {self.hi:g}"
            elif self.lo is not None:
                text += f" >= {self.lo:g}"
            elif self.hi is not None:
                text += f" <= {self.hi:g}"
            if self.name:
                text += " (letters, digits, . _ + = -)"
            parts.append(text)
        if list in kinds:
            parts.append("a list" + (f" of {self.items.describe()}" if self.items else ""))
        if dict in kinds:
            text = "a mapping" + (f" with keys from {', '.join(self.keys)}" if self.keys else "")
            parts.append(text + (f" to {self.items.describe()}" if self.items else ""))
        if self.none:
            parts.append("null")
        return " or ".join(parts)

    def check(self, value: Any) -> bool:
        if value is None:
            return self.none
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        ok_type = any(_is(value, k) for k in kinds)
        if not ok_type:
            return False
        if isinstance(value, list):
            if self.nonempty and not value:
                return False
            return self.items is None or all(self.items.check(v) for v in value)
        if isinstance(value, dict):
            if self.nonempty and not value:
                return False
            if self.keys is not None and not set(value) <= set(self.keys):
                return False
            return self.items is None or all(self.items.check(v) for v in value.values())
        if self.choices is not None and value not in self.choices:
            return False
        if isinstance(value, str):
            if self.nonempty and not value.strip():
                return False
            if self.name:
                try:
                    safe_id(value)
                except UnsafeNameError:
                    return False
            return True
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:  # NaN
                return False
            return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)
        return True


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _int(lo: int | None = 0, hi: int | None = None, none: bool = False) -> Rule:
    return Rule(int, lo=lo, hi=hi, none=none)


def _num(lo: float | None = None, hi: float | None = None, none: bool = False) -> Rule:
    return Rule(float, lo=lo, hi=hi, none=none)


TEXT = Rule(str)
BOOL = Rule(bool)
FRACTION = _num(0, 1)
POSITIVE = _num(1e-12)
FORMATS = ("magseg", "text4seg")
MAGSEG_VARIANTS = ("index", "mark", "crop", "crop_only")  # prompts.ALL_VARIANTS (a test keeps them equal)
SAM_BACKENDS = (
    "none",
    "superpixels",
    "selftrained",
    "tiny",
    "vit_b",
    "vit_h",
)  # refine.SAM_BACKENDS (a test keeps them equal)
FIELD_SPLITTERS = (
    "segments",
    "edges",
    "distance",
    "confidence",
)  # instances.SPLITTERS (a test keeps them equal)
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
TEST_VIEWS = Rule(int, choices=(1, 4, 8))  # views.VIEW_COUNTS (a test keeps them equal)
# true / false / "auto" (resolved for the machine: side_by_side.threads_each, training.use_compile, use_cpu_autocast)
AUTO_BOOL = Rule((bool, str), choices=(True, False, "auto"))
_TRAIN = {
    "formats": Rule(list, items=Rule(str, choices=FORMATS), nonempty=True),
    "learning_rate": POSITIVE,
    "batch_size": _int(1),
    "grad_accum": _int(1),
    "gradient_checkpointing": BOOL,
    "bf16": Rule((bool, str), choices=(True, False, "auto")),
    "save_steps": _int(1),
    "max_train_examples": _int(1, none=True),
    "time_budget_s": _num(1e-9, none=True),
    "eval_max_examples": _int(0, none=True),
    "eval_batch_size": _int(1),
    "test_views": TEST_VIEWS,
    "n_boot": _int(1),  # bootstrap replicates of the validation intervals
    "ci": _num(1e-9, 0.999999),
}

COMMON: dict[str, Rule] = {
    "run_dir": Rule(str, nonempty=True),
    "profile": Rule(str, name=True),
    "seed": _int(0),
    "model_id": Rule(str, nonempty=True),
}

STAGES: dict[str, dict[str, Rule]] = {
    "01_dataset_prep": {
        "dataset": Rule(str, nonempty=True),
        "manifest_path": Rule(str, nonempty=True),
        "data_root": Rule(str, nonempty=True),
        "countries": Rule(list, items=Rule(str, name=True), nonempty=True),
        "scenes_per_country": _int(1),
        "scene_size": _int(64),
        "res_m": POSITIVE,
        "tile_size": _int(16),
        "tile_overlap": _int(0),
        "split_mode": Rule(str, choices=("block", "dataset")),
        "split_block_size": _int(1),
        "val_frac": FRACTION,
        "test_frac": FRACTION,
        "bund_visibility": _num(0),
        "bund_gap_frac": FRACTION,
        "same_crop_prob": FRACTION,
        "within_field_variance": _num(0),
        "haze": _num(0),
        "cloud_shadows": _int(0),
        "noise": _num(0),
        "label_misalignment_m": _num(),
        "nodata_edge_frac": _num(0, 0.9),
        "baseline_tune": BOOL,
        "pixel_tune": BOOL,
        "pixel_samples_per_tile": _int(1, none=True),
        "pixel_max_iter": _int(1, none=True),
        "workers": _int(1),  # processes for the per-scene jobs (geo.run_each)
    },
    "02_instruction_format": {
        "patch_layout": _int(1),
        "magseg_grid": _int(1),
        "magseg_encoding": Rule(str, choices=ENCODINGS),
        "text4seg_encoding": Rule(str, choices=ENCODINGS),
        "prompt_variant": Rule(str, choices=("index", "mark", "crop")),
        "conversation_layout": Rule(str, choices=("per_patch", "per_tile")),  # tile_conversations.LAYOUTS
        "max_tiles_per_split": _int(0),
        "budget_resolutions": Rule(list, items=_int(1), nonempty=True),
        "budget_patch_grids": Rule(list, items=_int(1), nonempty=True),
        "budget_tiles": _int(1),
        "gemma_image_tokens": _int(1),
    },
    "03_sft": {
        **_TRAIN,
        "pretrain_steps": _int(0),
        "pretrain_lr": POSITIVE,
        "pretrain_batch_size": _int(1),
        "pretrain_examples": _int(1),
        "pretrain_time_budget_s": _num(1e-9, none=True),
        "lora_r": _int(1),
        "lora_alpha": POSITIVE,
        "lora_dropout": _num(0, 0.99),
        "target_modules": Rule((str, list), nonempty=True, items=Rule(str)),
        "train_projector": BOOL,
        "train_embeddings": BOOL,
        "class_balance": FRACTION,
        "tile_group": _int(1),
        "equal_tokens": BOOL,
        "train_side_by_side": AUTO_BOOL,
        "torch_compile": AUTO_BOOL,
        "cpu_autocast": AUTO_BOOL,
        "group_by_length": AUTO_BOOL,
        "conversation_layout": Rule(str, choices=("per_patch", "per_tile")),
        "lr_scheduler": Rule(str, choices=SCHEDULERS),
        "warmup_steps": _int(0),
        "max_steps": Rule((int, dict), lo=1, keys=FORMATS, items=_int(1), nonempty=True),
    },
    "04_grpo": {
        **_TRAIN,
        "max_steps": _int(1),
        "num_generations": _int(2),
        "max_completion_length": _int(1, none=True),
        "temperature": POSITIVE,
        "beta": _num(0),
        "reward_weights": Rule(dict, keys=("dice", "format"), items=_num(0), nonempty=True),
    },
    "05_inference": {
        "variants": Rule((str, list), choices=("all",), items=Rule(str, name=True), nonempty=True),
        "base_model": TEXT,
        "device": Rule(str, nonempty=True),
        "batch_size": _int(1),
        "prefix_cache": BOOL,
        "test_views": TEST_VIEWS,
        "max_new_tokens": _int(0),
        "max_tiles": _int(0),
        "max_nodata_frac": _num(1e-9, 1),
        "sam_backend": Rule(str, choices=SAM_BACKENDS),
        "sam_checkpoint": TEXT,
        "sam_iterations": _int(0),
        "sam_points": _int(0),
        "sam_negative_points": _int(0),
        "sam_boxes": BOOL,
        "sam_min_iou": FRACTION,
        "min_field_px": _int(0),
        "watershed_markers": Rule(str, choices=FIELD_SPLITTERS),
        "watershed_h_edges": _num(0),
        "watershed_h_px": _num(0),
        "use_image_edges": BOOL,
        "max_hole_px": _int(0),
        "simplify_m": _num(0),
        "polygonize_only": BOOL,
        "show_scene": TEXT,
        "map_scenes": Rule((str, list), choices=("first", "all", "none"), items=Rule(str, name=True)),
        "map_views": TEST_VIEWS,
        "variants_side_by_side": AUTO_BOOL,
    },
    "06_metrics": {
        "iou_threshold": _num(1e-9, 1),
        "boundary_tol_px": _num(0),
        "boundary_tol_m": _num(0),
        "n_boot": _int(1),
        "ci": _num(1e-9, 0.999999),
        "gallery_tiles": _int(0),
        "map_scene": TEXT,
        "map_variant": TEXT,
        "map_max_px": _int(16),
        "browser_screenshot": BOOL,
        "compare_masks": Rule(str, choices=("coarse", "refined", "auto")),
    },
    "07_resolution_study": {
        "resolutions": Rule(list, items=_int(2), nonempty=True),
        "magseg_grid": _int(1),
        "prompt_variant": Rule(str, choices=MAGSEG_VARIANTS),
        "context_variants": Rule(list, items=Rule(str, choices=MAGSEG_VARIANTS), nonempty=True),
        "context_resolution": _int(2),
        "encoding": Rule(str, choices=ENCODINGS),
        "max_steps": _int(1),
        "train_tiles": _int(0),
        "val_tiles": _int(0),
        "boundary_tol_px": _num(0),
        "n_boot": _int(1),
        "ci": _num(1e-9, 0.999999),
    },
}
TOP_LEVEL = ("description", "common", "stages")


def rule_for(stage: str | None, key: str) -> Rule | None:
    """The rule of ``key`` in ``stage`` (common keys apply to every stage); None when unknown."""
    if key in COMMON:
        return COMMON[key]
    if stage is not None:
        return STAGES.get(stage, {}).get(key)
    for rules in STAGES.values():  # a common key that some stage declares
        if key in rules:
            return rules[key]
    return None


def _problem(path: Any, where: str, value: Any, rule: Rule) -> str:
    return f"{path}: {where} is {value!r}; allowed: {rule.describe()}"


def check_values(
    path: Any, where: str, stage: str | None, values: dict[str, Any], declared: dict[str, set] | None = None
) -> list[str]:
    """One line per unknown key or bad value of a ``common`` (stage None) or ``stages.<stage>`` section.

    ``declared`` (stage -> the parameters its notebook declares) adds keys that have no rule here
    (a notebook's new parameter, or a custom notebook) as known, with any value.
    """
    problems = []
    extra = set().union(*declared.values()) if declared and stage is None else set()
    if declared and stage is not None:
        extra = set(declared.get(stage, set()))
    schema = set(COMMON) | set(STAGES.get(stage, {})) if stage else set(COMMON).union(*STAGES.values())
    known = sorted(schema | extra)
    for key, value in values.items():
        rule = rule_for(stage, key) if isinstance(key, str) else None
        if rule is None and key in extra:
            continue
        if rule is None:
            problems.append(f"{path}: {where}.{key} is not a parameter here; known keys: {', '.join(known)}")
        elif not rule.check(value):
            problems.append(_problem(path, f"{where}.{key}", value, rule))
    return problems


def check_profile(
    data: Any,
    path: Any,
    stage_name=None,
    declared: dict[str, set] | None = None,
    check_weights: bool | None = None,
) -> list[str]:
    """All problems of a parsed profile (empty list: fine). ``stage_name`` maps '03' to '03_sft';
    ``declared`` maps a stage to its notebook's parameters (see :func:`check_values`).
    ``check_weights`` also checks that ``model_id``'s weights can load here (models.weights_problem);
    None: only when ``declared`` is given, i.e. when the chain is about to run the notebooks."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return [f"{path}: the top level must be a mapping with keys {', '.join(TOP_LEVEL)}"]
    problems = []
    for key in data:
        if key not in TOP_LEVEL:
            problems.append(f"{path}: unknown top-level key {key!r}; use {', '.join(TOP_LEVEL)}")
    if not isinstance(data.get("description", ""), str):
        problems.append(f"{path}: description must be text")
    common = data.get("common") or {}
    if not isinstance(common, dict):
        problems.append(f"{path}: common must be a mapping of parameter: value, got {common!r}")
    else:
        problems += check_values(path, "common", None, common, declared)
        if (declared is not None if check_weights is None else check_weights) and isinstance(
            common.get("model_id"), str
        ):
            problems += _weights(path, common["model_id"])
    stages = data.get("stages") or {}
    if not isinstance(stages, dict):
        return [*problems, f"{path}: stages must be a mapping of stage name: {{parameter: value}}"]
    for key, section in stages.items():
        try:
            name = stage_name(key) if stage_name else str(key)
        except Exception as err:  # noqa: BLE001 - the chain's StageError, reported as one line
            problems.append(f"{path}: stages.{key}: {err}")
            continue
        if name not in STAGES:
            problems.append(f"{path}: stages.{key}: unknown stage; stages are {', '.join(STAGES)}")
            continue
        if section is None:
            continue
        if not isinstance(section, dict):
            problems.append(f"{path}: stages.{key} must be a mapping of parameter: value, got {section!r}")
            continue
        problems += check_values(path, f"stages.{name}", name, section, declared)
    return problems


def _weights(path: Any, model_id: str) -> list[str]:

    problem = models.weights_problem(model_id)
    return [f"{path}: common.model_id: {problem}"] if problem else []
