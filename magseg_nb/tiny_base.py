"""A pretrained tiny Gemma 3 base, built once by ``scripts/build_tiny_base.py`` and shipped in the repository.

The tiny model of the CPU demo is randomly initialised; LoRA on it learns the field class and little
else. This module builds a stand-in for Gemma 3's own pretraining: a full fine-tune of the random tiny
model on the repository's label-free proxy task (``pretraining.proxy_dataset``: the colour and texture
codes of each grid cell, no class labels) over generated landscapes with *other seeds* than any profile uses, in the
demo's conversation layout (both formats). The result is saved like a hub checkpoint in
``pretrained/tiny-gemma3-proxy/`` with ``RECIPE.json`` (how it was made) and ``SHA256SUMS`` (every
file's hash), and ``models.resolve_model("tiny-gemma3-proxy")`` verifies the hashes before handing the
folder to ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from magseg_nb import files, geo, landscape, models, pretraining, prompts, training
from magseg_nb.pretraining import PROXY_CODES

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED_DIR = ROOT / "pretrained" / "tiny-gemma3-proxy"
SUMS_FILE = "SHA256SUMS"
RECIPE_FILE = "RECIPE.json"
BUILD_COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python scripts/build_tiny_base.py"
# Files of the saved model that are shipped (the trainer's checkpoints and logs are not).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tiny_spec.json",
)

# Landscape variety: one Difficulty per seed (never seed 0, which every profile uses).
DIFFICULTY_MIX: dict[str, dict] = {
    "demo": {"nodata_edge_frac": 0.04},  # notebook 01's demo settings
    "hard": {
        "bund_visibility": 0.2,
        "within_field_variance": 0.8,
        "haze": 0.5,
        "cloud_shadows": 6,
        "noise": 8.0,
        "nodata_edge_frac": 0.04,
    },
    "clear": {"bund_visibility": 0.7, "bund_gap_frac": 0.2, "haze": 0.1, "cloud_shadows": 1, "noise": 3.0},
    "wet_wooded": {"trees": 1.8, "water": 1.8, "villages": 1.3, "same_crop_prob": 0.5},
}


class TinyBaseError(RuntimeError):
    """The shipped pretrained base is missing or does not match its recorded SHA-256."""


@dataclass
class Recipe:
    """Everything that decides the pretrained base (the defaults are the shipped build's)."""

    seeds: list[int] = field(default_factory=lambda: [1001, 1002, 1003, 1004])
    difficulties: list[str] = field(default_factory=lambda: ["demo", "hard", "clear", "wet_wooded"])
    countries: list[str] = field(default_factory=lambda: ["vietnam", "cambodia", "india"])
    scenes_per_country: int = 1
    scene_size: int = 1024
    res_m: float = 0.8
    # The demo's layout (4x4 patches of 4x4 cells, docs/experiments.md), so the proxy answers describe
    # the very cells the labels will.
    tile_size: int = 128
    tile_overlap: int = 32
    split_block_size: int = 256
    patch_layout: int = 4
    magseg_grid: int = 4
    text4seg_grid: int = 16
    # Plain MAgSeg grids (the demo's: every cell at a fixed token offset, docs/experiments.md); Text4Seg
    # keeps its R-RLE (a plain 16x16 answer is 512 tokens).
    magseg_encoding: str = "plain"
    text4seg_encoding: str = "rle"
    variant: str = "crop"
    # Proxy pretraining (full fine-tune of the random tiny model, or of ``init_from``)
    proxy_rule: str = "mean"  # how a cell's code is read (pretraining.PROXY_RULES)
    init_from: str | None = None  # a model folder to go on from (None: the random tiny model)
    # TinySpec fields that differ from the registry's tiny model (experiments only: the shipped base has none)
    shape: dict[str, int] = field(default_factory=dict)
    steps: int = 4000
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    warmup_steps: int = 50
    batch_size: int = 8
    max_examples: int | None = None  # None: every proxy conversation
    train_seed: int = 0
    logging_steps: int = 50

    def __post_init__(self):
        if 0 in self.seeds:
            raise ValueError("seed 0 is the profiles' seed: pretrain on other landscapes")
        if len(self.difficulties) != len(self.seeds):
            raise ValueError(f"one difficulty per seed: {len(self.seeds)} seeds, {self.difficulties}")
        if self.proxy_rule not in pretraining.PROXY_RULES:
            raise ValueError(f"proxy rule {self.proxy_rule!r} is not one of {pretraining.PROXY_RULES}")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").exists():
            raise ValueError(f"init_from {self.init_from}: no config.json there; give a saved model folder")
        known = {f.name for f in dataclasses.fields(models.TinySpec)} - {"seed", "vocab_size"}
        if set(self.shape) - known or not all(isinstance(v, int) and v > 0 for v in self.shape.values()):
            raise ValueError(f"shape {self.shape}: give positive integers for fields among {sorted(known)}")
        unknown = set(self.difficulties) - set(DIFFICULTY_MIX)
        if unknown:
            raise ValueError(f"unknown difficulties {sorted(unknown)}; known: {sorted(DIFFICULTY_MIX)}")

    def spec(self) -> models.TinySpec:
        """The tiny model's shape: the registry's, with ``shape`` applied."""
        return dataclasses.replace(models.REGISTRY["tiny-gemma3"].tiny, **self.shape)


# --- hashes -----------------------------------------------------------------------------------------


def write_sums(folder: Path) -> Path:
    """``SHA256SUMS`` (``sha256sum`` format) of every other file in ``folder``."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != SUMS_FILE)
    text = "".join(f"{files.sha256_file(folder / n)}  {n}\n" for n in names)
    return files.write_text(folder / SUMS_FILE, text)


def verify(folder: Path = PRETRAINED_DIR) -> Path:
    """Check every file listed in ``SHA256SUMS`` (and that no listed file is missing); returns the folder.

    Raises ``TinyBaseError`` with one line naming the first bad file and the command that rebuilds it.
    """
    folder = Path(folder)
    rebuild = f"rebuild it with `{BUILD_COMMAND} --out {folder}` (see {RECIPE_FILE} for the recipe)"
    sums = folder / SUMS_FILE
    if not sums.exists():
        raise TinyBaseError(f"pretrained base {folder}: {SUMS_FILE} is missing; {rebuild}")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = folder / name.lstrip("*")
        if not path.exists():
            raise TinyBaseError(f"pretrained base {folder}: {path.name} is missing; {rebuild}")
        if files.sha256_file(path) != digest:
            raise TinyBaseError(
                f"pretrained base {folder}: {path.name} does not match its SHA-256 in {SUMS_FILE}; {rebuild}"
            )
    return folder


# --- data -------------------------------------------------------------------------------------------


def build_conversations(recipe: Recipe, work: Path, log=print) -> list[Path]:
    """Generate, tile and format the landscapes (notebooks 01 and 02's code paths); returns JSONL files.

    Every tile is used whatever its split (the proxy task reads no labels, and these landscapes are not
    the profiles'); one file per (seed, format).
    """

    jsonls = []
    for seed, diff_name in zip(recipe.seeds, recipe.difficulties, strict=True):
        run01 = work / f"seed{seed}" / "01_dataset_prep"
        run02 = work / f"seed{seed}" / "02_instruction_format"
        difficulty = landscape.Difficulty(**DIFFICULTY_MIX[diff_name])
        t0 = time.time()
        sources = landscape.generate_sources(
            run01 / "scenes",
            list(recipe.countries),
            recipe.scenes_per_country,
            recipe.scene_size,
            recipe.res_m,
            seed,
            difficulty,
            log=lambda *a: None,
        )
        scenes = geo.prepare_scenes(sources, run01 / "scenes", log=lambda *a: None)
        # One split for all (no tile is dropped for straddling split blocks).
        everything = {"train": 1.0, "val": 0.0, "test": 0.0}
        geo.make_tiles(
            run01, scenes, recipe.tile_size, recipe.tile_overlap, recipe.split_block_size, everything, seed
        )
        tiles = [dataclasses.replace(t, split="train") for t in prompts.tile_records(run01)]
        for fmt, grid, layout, encoding in (
            ("magseg", recipe.magseg_grid, recipe.patch_layout, recipe.magseg_encoding),
            ("text4seg", recipe.text4seg_grid, 1, recipe.text4seg_encoding),
        ):
            variant = recipe.variant if fmt == "magseg" else "index"
            paths = prompts.write_conversations(tiles, run02, fmt, grid, encoding, layout, variant)
            jsonls.append(paths["train"])
        log(f"seed {seed} ({diff_name}): {len(scenes)} scenes, {len(tiles)} tiles, {time.time() - t0:.0f} s")
    return jsonls


def count_rows(path: Path) -> int:
    with open(path) as fh:
        return sum(1 for line in fh if line.strip())


# --- build ------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:

    out = {"python": platform.python_version()}
    for name in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "datasets",
        "tokenizers",
        "numpy",
        "magseg-notebooks",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def build(out_dir: Path, recipe: Recipe, work_dir: Path, command: str | None = None, log=print) -> Path:
    """Build the pretrained tiny base into ``out_dir`` (replaced when it exists); returns ``out_dir``.

    ``work_dir`` holds the generated landscapes, conversations and the trainer's checkpoints (not shipped).
    """

    t_start = time.time()
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    jsonls = build_conversations(recipe, work_dir, log)
    t_data = time.time() - t_start
    spec = recipe.spec()
    if recipe.init_from is None:
        start = models.build_tiny(work_dir / "random-base", spec)
    else:
        start = Path(recipe.init_from)
        info = models.model_info(str(start))
        if info is None or info.tiny != spec:
            raise ValueError(f"init_from {start}: not a tiny Gemma 3 of this recipe's shape ({spec})")
    ds = pretraining.proxy_dataset(jsonls, recipe.max_examples, recipe.train_seed, recipe.proxy_rule)
    log(f"{len(ds)} proxy conversations from {len(jsonls)} files; {recipe.steps} steps")
    train_out = work_dir / "pretrain"
    shutil.rmtree(train_out, ignore_errors=True)  # a fixed recipe: never resume another run's checkpoint
    settings = training.SFTSettings(
        base_model=str(start),
        train_jsonl=str(jsonls[0]),
        output_dir=str(train_out),
        full_finetune=True,
        learning_rate=recipe.learning_rate,
        lr_scheduler=recipe.lr_scheduler,
        warmup_steps=recipe.warmup_steps,
        max_steps=recipe.steps,
        batch_size=recipe.batch_size,
        save_steps=max(recipe.steps // 4, 50),
        save_total_limit=1,
        logging_steps=recipe.logging_steps,
        seed=recipe.train_seed,
        eval_max_examples=0,
        # the shipped base trained in float32, eager, rows at random: a rebuild keeps to it on any CPU
        torch_compile=False,
        cpu_autocast=False,
        group_by_length=False,
    )
    t_train0 = time.time()
    result = training.run_sft(settings, train_ds=ds)
    t_train = time.time() - t_train0
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trained = Path(result["trained"])
    for name in MODEL_FILES:
        if (trained / name).exists():
            shutil.copy2(trained / name, tmp / name)
    files.write_json(tmp / "tiny_spec.json", dataclasses.asdict(spec))
    log_df = _final_loss(train_out / "log.csv")
    shape_text = f"TinySpec with {recipe.shape}" if recipe.shape else "TinySpec defaults"
    recipe_record = {
        "model_id": "tiny-gemma3-proxy",
        "what": f"tiny Gemma 3 ({shape_text}) after a full fine-tune on the label-free proxy task "
        f"(colour and texture codes {PROXY_CODES[0]}-{PROXY_CODES[-1]} of each grid cell; "
        "pretraining.proxy_dataset), a stand-in for Gemma 3's pretraining",
        "proxy_task": {
            "instruction": pretraining.PROXY_INSTRUCTION.strip(),
            "codes": PROXY_CODES,
            "textured_std": pretraining.TEXTURED_STD,
            **(
                {"rule": "majority", "texture_window": pretraining.TEXTURE_WINDOW}
                if recipe.proxy_rule == "majority"
                else {}
            ),
        },
        "command": command or BUILD_COMMAND,
        "recipe": dataclasses.asdict(recipe),
        **({"init_from_sha256": files.sha256_file(start / "model.safetensors")} if recipe.init_from else {}),
        "difficulty_settings": {name: DIFFICULTY_MIX[name] for name in recipe.difficulties},
        "tiny_spec": dataclasses.asdict(spec),
        "tiny_spec_hash": spec.config_hash(),
        "n_examples": len(ds),
        "n_conversation_files": {str(p.relative_to(work_dir)): count_rows(p) for p in jsonls},
        "steps_done": result.get("steps"),
        "final_train_loss": log_df,
        "packages": package_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "wall_seconds": {
            "data": round(t_data, 1),
            "train": round(t_train, 1),
            "total": round(time.time() - t_start, 1),
        },
        "machine": {
            "cores": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
    }
    files.write_json(tmp / RECIPE_FILE, recipe_record)
    write_sums(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    files.replace_dir(tmp, out_dir)
    log(f"pretrained base written to {out_dir} ({t_train:.0f} s of training)")
    return out_dir


def _final_loss(log_csv: Path) -> float | None:
    import pandas as pd

    if not log_csv.exists():
        return None
    df = pd.read_csv(log_csv)
    if "loss" not in df or df["loss"].dropna().empty:
        return None
    return round(float(df["loss"].dropna().iloc[-1]), 4)


# --- reading a proxy answer ------------------------------------------------------------------------


def decode_codes(text: str, grid: int):
    """A colour-code answer (plain ``a|a|b`` or run-length ``a *3| b *5`` rows) as a (grid, grid) int array
    of code indices, or None when it is not a well-formed grid of that shape."""
    import numpy as np

    rows = [r for r in text.strip().split("\n") if r.strip()]
    if len(rows) != grid:
        return None
    out = []
    for row in rows:
        cells = []
        for run in row.split("|"):
            letter, star, count = run.strip().partition(" *")
            count = count if star else "1"  # a plain cell
            if len(letter) != 1 or letter not in PROXY_CODES or not count.isdigit():
                return None
            cells += [PROXY_CODES.index(letter)] * int(count)
        if len(cells) != grid:
            return None
        out.append(cells)
    return np.array(out)
