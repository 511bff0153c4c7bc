"""Label-free proxy pretraining of the tiny Gemma 3: a stand-in for Gemma 3's own pretraining.

The proxy task asks for the colour and texture codes (a-p: hue family x brightness x smooth/textured)
of the same cells a label grid would describe, on the training conversations' images, so the model
learns to read the image at the answer's layout without seeing a label. ``scripts/build_tiny_base.py``
builds the shipped base with it (``magseg_nb.tiny_base``); notebook 03 can run it on the fly
(``pretrain_steps``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from magseg_nb import files, prompts
from magseg_nb.training import DONE_FILE, SFTSettings, load_split, run_sft

# Codes of the proxy task: hue family x brightness x texture, written as letters (one token each, and
# never a class name, so the pretraining sees no labels).
PROXY_CODES = "abcdefghijklmnop"
PROXY_INSTRUCTION = "Colour and texture codes (a-p) of the cells, same layout as the grid asked for below.\n"
# A cell whose grey levels vary by at least this much (standard deviation, 0-255 scale) is "textured".
# Why: colour alone gives tree crowns and many crop fields the same code (dark green); texture is the
# generic image statistic that tells them apart (on the demo's training cells: median 9.0 for tree
# cells, 3.3 for field cells, 3.2 for water; measured once to choose this value, see docs/experiments.md).
TEXTURED_STD = 6.0
# How a cell's code is read: "mean" codes the cell's mean colour and grey-level spread (the shipped base);
# "majority" codes every pixel (lightly smoothed colour, grey-level spread in a TEXTURE_WINDOW square
# around it) and writes the commonest code, the way a cell's label is the majority of its pixels.
PROXY_RULES = ("mean", "majority")
TEXTURE_WINDOW = 9


def colour_codes(cell_rgb: np.ndarray, cell_std: np.ndarray) -> np.ndarray:
    """(h,w,3) mean RGB and (h,w) grey-level std per cell -> (h,w) code 0..15.

    Code = 4 x hue family (grey, green, blue, warm) + 2 x bright + textured (std >= ``TEXTURED_STD``).
    """
    rgb = cell_rgb.astype(float)
    spread = rgb.max(-1) - rgb.min(-1)
    family = np.select(
        [spread < 20, rgb.argmax(-1) == 2, rgb.argmax(-1) == 1],
        [0, 2, 1],
        default=3,
    )
    bright = rgb.mean(-1) >= 110
    textured = np.asarray(cell_std) >= TEXTURED_STD
    return (family * 4 + bright * 2 + textured).astype(int)


def cell_means(image, box: tuple[int, int, int, int], grid: int) -> np.ndarray:
    """(grid, grid, 3) mean RGB of a grid x grid split of ``box`` (left, top, right, bottom px) of a PIL image."""
    from PIL import Image

    small = image.convert("RGB").resize((grid, grid), Image.Resampling.BOX, box=box)
    return np.asarray(small)


def cell_stds(image, box: tuple[int, int, int, int], grid: int) -> np.ndarray:
    """(grid, grid) standard deviation of the grey levels in each cell of ``box`` (as ``cell_means``)."""
    from PIL import Image

    grey = np.asarray(image.convert("L"), dtype=np.float32)
    means = []
    for values in (grey, grey**2):
        small = Image.fromarray(values, mode="F").resize((grid, grid), Image.Resampling.BOX, box=box)
        means.append(np.asarray(small, dtype=np.float64))
    return np.sqrt(np.maximum(means[1] - means[0] ** 2, 0.0))


def pixel_codes(image) -> np.ndarray:
    """(H, W) code 0..15 of every pixel of a PIL image (``colour_codes`` of its Gaussian-smoothed colour
    (sigma 1) and of the grey-level spread in the ``TEXTURE_WINDOW`` square around it)."""
    from scipy import ndimage

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    smooth = np.stack([ndimage.gaussian_filter(rgb[..., c], 1.0) for c in range(3)], axis=-1)
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    mean = ndimage.uniform_filter(grey, TEXTURE_WINDOW)
    spread = np.sqrt(np.maximum(ndimage.uniform_filter(grey**2, TEXTURE_WINDOW) - mean**2, 0.0))
    return colour_codes(smooth, spread)


def majority_codes(image, box: tuple[int, int, int, int], grid: int) -> np.ndarray:
    """(grid, grid) commonest pixel code (``pixel_codes``) in each cell of ``box`` (left, top, right,
    bottom px; ties go to the lower code)."""
    left, top, right, bottom = box
    # The whole image is coded, then cut: a pixel at the box's edge gets its spread from its real neighbours.
    codes = pixel_codes(image)[top:bottom, left:right]
    rows = np.array_split(np.arange(codes.shape[0]), grid)
    cols = np.array_split(np.arange(codes.shape[1]), grid)
    out = np.zeros((grid, grid), dtype=int)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            out[i, j] = np.bincount(codes[np.ix_(r, c)].ravel(), minlength=len(PROXY_CODES)).argmax()
    return out


def cell_codes(image, box: tuple[int, int, int, int], grid: int, rule: str = "mean") -> np.ndarray:
    """(grid, grid) proxy codes of the cells of ``box`` read by ``rule`` (one of ``PROXY_RULES``)."""
    if rule == "mean":
        return colour_codes(cell_means(image, box, grid), cell_stds(image, box, grid))
    if rule == "majority":
        return majority_codes(image, box, grid)
    raise ValueError(f"proxy rule {rule!r} is not one of {PROXY_RULES}")


def encode_codes(codes: np.ndarray, encoding: str) -> str:
    """A code grid written like the label grids (plain ``a|b|...`` or run-length ``a *3| b *2``)."""
    rows = []
    for row in codes:
        letters = [PROXY_CODES[int(c)] for c in row]
        if encoding == "rle":
            runs, start = [], 0
            for j in range(1, len(letters) + 1):
                if j == len(letters) or letters[j] != letters[start]:
                    runs.append(f"{letters[start]} *{j - start}")
                    start = j
            rows.append("| ".join(runs))
        else:
            rows.append("|".join(letters))
    return "\n".join(rows)


def row_codes(row: dict, rule: str = "mean") -> np.ndarray:
    """(grid, grid) proxy codes of the cells a conversation row's answer describes (its patch of the tile
    image, or the whole tile), read by ``rule``."""
    tile = row["images"][0]
    top, bottom, left, right = prompts.row_bounds(row, (tile.height, tile.width))
    return cell_codes(tile, (left, top, right, bottom), len(row["gt_mask"]), rule)


def proxy_example(row: dict, rule: str = "mean") -> dict:
    """The label-free proxy version of one conversation: same images and prompt, codes as answer.

    The answer describes the same cells the real answer labels (the marked patch for MAgSeg, the
    whole tile for Text4Seg), so pretraining teaches the model to read the image at that layout;
    the LoRA SFT then has to learn which colours and textures are which class.
    """

    codes = row_codes(row, rule)
    prompt = json.loads(json.dumps(row["prompt"]))  # deep copy
    for part in prompt[-1]["content"]:
        if part.get("type") == "text":
            part["text"] = PROXY_INSTRUCTION + part["text"]
            break
    answer = encode_codes(codes, row.get("encoding") or "rle")
    return {
        "images": row["images"],
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
    }


def proxy_dataset(
    train_jsonls: Sequence[str | Path], max_examples: int | None = None, seed: int = 0, rule: str = "mean"
):
    """Proxy conversations built from the training conversations of every format (labels unused),
    an equal share of ``max_examples`` from each file, cells coded by ``rule``."""
    from datasets import Dataset

    share = None if max_examples is None else max(1, max_examples // len(train_jsonls))
    rows = []
    for path in train_jsonls:
        rows += [proxy_example(row, rule) for row in load_split(path, share, seed)]
    return Dataset.from_list(rows).shuffle(seed=seed)


def pretrain_proxy_base(
    base_model: str | Path,
    train_jsonls: Sequence[str | Path],
    models_dir: str | Path,
    *,
    max_steps: int = 600,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    max_examples: int | None = 4000,
    seed: int = 0,
    time_budget_s: float | None = None,
    logging_steps: int = 25,
) -> Path:
    """Full fine-tune of a randomly initialised tiny model on the label-free colour/texture-code task.

    Saved like a real checkpoint in ``models_dir/<name>-proxy-<hash>/`` and reused when present (the
    hash covers the base, the data files and these settings). Why: LoRA on a random base learns the
    greedy argmax but leaves the output distribution near uniform, so GRPO's samples would be noise.
    """
    base_model = Path(base_model)
    key_src = {
        "base": _folder_fingerprint(base_model),
        "data": [_file_fingerprint(Path(p)) for p in train_jsonls],
        "max_steps": max_steps,
        "lr": learning_rate,
        "bs": batch_size,
        "n": max_examples,
        "seed": seed,
        "codes": PROXY_INSTRUCTION + PROXY_CODES,
    }
    key = files.sha256_json(key_src)[:10]
    dest = Path(models_dir) / f"{base_model.name}-proxy-{key}"
    if (dest / "config.json").exists():
        print(f"proxy-pretrained base found: {dest}", flush=True)
        return dest
    work = dest.with_name(dest.name + ".partial")
    ds = proxy_dataset(train_jsonls, max_examples, seed)
    s = SFTSettings(
        base_model=str(base_model),
        train_jsonl=str(train_jsonls[0]),
        output_dir=str(work),
        full_finetune=True,
        learning_rate=learning_rate,
        max_steps=max_steps,
        batch_size=batch_size,
        warmup_steps=20,
        lr_scheduler="constant_with_warmup",  # as the shipped base was built (tiny_base recipe)
        save_steps=max(50, max_steps // 4),
        logging_steps=logging_steps,
        seed=seed,
        time_budget_s=time_budget_s,
        eval_max_examples=0,
        # its cache key names the recipe only: the run trains as the shipped base did, on any CPU
        torch_compile=False,
        cpu_autocast=False,
        group_by_length=False,
    )
    run_sft(s, train_ds=ds)
    model_dir = work / "model"  # completed here, then renamed: a found dest is always whole
    for name in ("log.csv", DONE_FILE):  # keep the pretraining's record beside the weights
        if (work / name).exists():
            files.move(work / name, model_dir / f"proxy_{name}")
    if (base_model / "tiny_spec.json").exists():  # models.model_info() still knows the shapes
        shutil.copy(base_model / "tiny_spec.json", model_dir / "tiny_spec.json")
    files.write_json(
        model_dir / "proxy_pretraining.json",
        {**key_src, "task": PROXY_INSTRUCTION.strip(), "n_examples": len(ds)},
    )
    files.replace_dir(model_dir, dest)
    shutil.rmtree(work, ignore_errors=True)
    return dest


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{files.sha256_file(path)[:16]}"


def _folder_fingerprint(folder: Path) -> str:
    cfg = folder / "config.json"
    return files.sha256_file(cfg)[:16] if cfg.exists() else str(folder)


NOTEBOOK_PARAMS = {  # notebook 03's parameter -> pretrain_proxy_base's keyword
    "pretrain_steps": "max_steps",
    "pretrain_lr": "learning_rate",
    "pretrain_batch_size": "batch_size",
    "pretrain_examples": "max_examples",
    "pretrain_time_budget_s": "time_budget_s",
    "seed": "seed",
}


def pretrain_from_params(base_model, params: dict, train_jsonls, models_dir) -> Path:
    """Notebook 03's proxy pretraining in one call: its ``pretrain_*`` parameters, named as above."""
    kw = {key: params[name] for name, key in NOTEBOOK_PARAMS.items() if name in params}
    return pretrain_proxy_base(base_model, train_jsonls, models_dir, **kw)


def describe(row: dict) -> str:
    """One proxy conversation as text: the question's last part, then the code answer."""
    question = row["prompt"][0]["content"][-1]["text"]
    return f"{question}\n---\n{row['completion'][0]['content'][0]['text']}"
