"""Instruction formats: MAgSeg (whole tile as context, answer for ONE patch) and the Text4Seg baseline.

MAgSeg splits a tile into ``patch_layout x patch_layout`` patches; each conversation shows the whole
tile and asks for the ``grid x grid`` label grid of one patch, so the tile is described at
``patch_layout * grid`` cells per side while no single answer grows. Text4Seg asks for the whole tile
in one ``grid x grid`` answer. Variants say how the patch is named:

- ``index``: by its row/column in the prompt text only (one image);
- ``mark``: also a second image, the tile with the patch outlined;
- ``crop``: also a second image, the patch cut out (more pixels per cell for the model);
- ``crop_only``: the patch cut out and *no* tile (no global context; notebook 07's ablation).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from magseg_nb import files, geo, textgrid
from magseg_nb.labels import CLASSES, NODATA

FORMATS = ("magseg", "text4seg")
VARIANTS = ("index", "mark", "crop")
# crop_only is kept out of VARIANTS (the tokenizer corpus and notebook 02's budget table iterate it).
ALL_VARIANTS = (*VARIANTS, "crop_only")
DEFAULT_VARIANT = "crop"  # the paper's choice and every profile's: the tile plus a close-up of the patch
MARK_COLOR = (255, 0, 0)

_LABELS = ", ".join(CLASSES)
_INTRO = "This is a satellite image of a smallholder farm landscape."
_ENCODING_TEXT = {
    "plain": "Write one row per line, with the cells of a row separated by |.",
    "rle": "Write one row per line as runs of 'label *count' separated by |.",
}
_VARIANT_TEXT = {
    "index": "",
    "mark": " The second image shows the same tile with that patch outlined in red.",
    "crop": " The second image is a close-up of that patch.",
}


def instruction(
    fmt: str, grid: int, encoding: str, patch=None, patch_layout: int = 1, variant=DEFAULT_VARIANT
) -> str:
    """The user's text for one conversation."""
    enc = _ENCODING_TEXT[encoding]
    if fmt == "text4seg":
        return (
            f"{_INTRO} Segment the whole image into a {grid}x{grid} grid of cells. "
            f"Label each cell as one of: {_LABELS}. {enc}"
        )
    r, c = patch
    if variant == "crop_only":
        return (
            f"{_INTRO} The image is a close-up of the patch in row {r + 1}, column {c + 1} of a tile "
            f"divided into {patch_layout}x{patch_layout} patches; the rest of the tile is not shown. "
            f"Segment it into a {grid}x{grid} grid of cells. Label each cell as one of: {_LABELS}. {enc}"
        )
    return (
        f"{_INTRO} The image is divided into {patch_layout}x{patch_layout} patches. "
        f"Segment the patch in row {r + 1}, column {c + 1} (counted from the top left) "
        f"into a {grid}x{grid} grid of cells.{_VARIANT_TEXT[variant]} "
        f"Label each cell as one of: {_LABELS}. {enc}"
    )


def corpus_sentences() -> list[str]:
    """Every instruction wording, for training the tiny model's tokenizer."""
    out = []
    for enc in textgrid.ENCODINGS:
        for grid in (4, 8, 16, 32):
            out.append(instruction("text4seg", grid, enc))
            for layout in (2, 4, 8):
                for variant in VARIANTS:
                    out.append(instruction("magseg", grid, enc, (layout - 1, 0), layout, variant))
    return out


def _check(fmt: str, encoding: str, variant: str, patch, patch_layout: int, grid: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")
    if encoding not in textgrid.ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {textgrid.ENCODINGS}")
    if variant not in ALL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {ALL_VARIANTS}")
    if grid < 1 or patch_layout < 1:
        raise ValueError(f"grid ({grid}) and patch_layout ({patch_layout}) must be >= 1")
    if fmt == "magseg":
        if patch is None:
            raise ValueError("the magseg format needs patch=(row, col)")
        r, c = patch
        if not (0 <= r < patch_layout and 0 <= c < patch_layout):
            raise ValueError(f"patch {patch} is outside a {patch_layout}x{patch_layout} layout")


def effective_grid(patch_layout: int, magseg_grid: int) -> int:
    """Cells per tile side that MAgSeg describes (and Text4Seg is asked for, to compare like with like)."""
    return int(patch_layout) * int(magseg_grid)


def patch_bounds(shape, patch, patch_layout: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of a patch; the same for targets, crops and marks."""
    h, w = shape[:2]
    r, c = patch
    return (
        r * h // patch_layout,
        (r + 1) * h // patch_layout,
        c * w // patch_layout,
        (c + 1) * w // patch_layout,
    )


def downsample_mask(mask, size: int) -> np.ndarray:
    """(size, size) class ids by majority vote over the pixels of each cell; NODATA pixels do not vote.

    A cell with no valid pixel becomes 0 (``others``); ties go to the lower class id.
    """
    return cell_class_counts(mask, size).argmax(axis=0).astype(np.uint8)


def cell_class_counts(mask, size: int) -> np.ndarray:
    """(classes, size, size) pixel counts of each class in each cell (the cells of :func:`downsample_mask`)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"downsample_mask needs a non-empty 2-D mask, got shape {mask.shape}")
    # Upsample (nearest) a side shorter than the grid, so every cell holds at least one pixel.
    for axis in (0, 1):
        if mask.shape[axis] < size:
            mask = np.take(mask, np.arange(size) * mask.shape[axis] // size, axis=axis)
    h, w = mask.shape
    rows = np.arange(size) * h // size
    cols = np.arange(size) * w // size
    counts = np.stack([(mask == k) for k in range(len(CLASSES))]).astype(np.int32)
    return np.add.reduceat(np.add.reduceat(counts, rows, axis=1), cols, axis=2)


def patch_purity(tile_mask, patch, patch_layout: int, grid: int) -> np.ndarray:
    """(grid, grid) share of each cell's valid pixels that hold its majority label (NaN: no valid pixel).

    A cell of purity 1 holds one class; near 0.5, its label depends on counting pixels."""
    shares = cell_shares(tile_mask, patch, patch_layout, grid)
    return np.where(shares.sum(axis=1) > 0, shares.max(axis=1), np.nan).reshape(grid, grid)


def row_purity(row: dict, tile_mask) -> np.ndarray:
    """``patch_purity`` of the cells a conversation row's answer describes, from its tile's pixel labels."""
    return patch_purity(tile_mask, row_patch(row), row_layout(row), int(row["grid"]))


def cell_shares(tile_mask, patch, patch_layout: int, grid: int) -> np.ndarray:
    """(grid * grid, classes) share of each cell's valid pixels held by each class, cells row-major (the
    order an answer writes them); a cell without a valid pixel is all zeros."""
    counts = cell_class_counts(patch_pixels(tile_mask, patch, patch_layout), grid).astype(np.float64)
    total = counts.sum(axis=0)
    shares = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    return shares.reshape(len(counts), -1).T


def patch_target(tile_mask, patch, patch_layout: int, grid: int) -> np.ndarray:
    """(grid, grid) class ids of one patch of a tile's semantic mask (patch=None: the whole tile)."""
    return downsample_mask(patch_pixels(tile_mask, patch, patch_layout), grid)


def patch_pixels(tile_mask, patch, patch_layout: int) -> np.ndarray:
    """The pixels of one patch of a tile array (patch=None: the whole tile)."""
    tile_mask = np.asarray(tile_mask)
    if patch is None:
        return tile_mask
    top, bottom, left, right = patch_bounds(tile_mask.shape, patch, patch_layout)
    return tile_mask[top:bottom, left:right]


def row_patch(row: dict):
    """A conversation row's patch (row, col), or None for a whole-tile row (Text4Seg)."""
    return None if row.get("patch_row") is None else (int(row["patch_row"]), int(row["patch_col"]))


def row_layout(row: dict) -> int:
    """A conversation row's patch layout (patches per tile side; 1 for a whole-tile row)."""
    return int(row.get("patch_layout") or 1)


def row_bounds(row: dict, shape) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixels of ``shape`` that a conversation row's answer describes: its
    patch's bounds, or the whole tile for a whole-tile row."""
    patch = row_patch(row)
    if patch is None:
        return 0, int(shape[0]), 0, int(shape[1])
    return patch_bounds(shape, patch, row_layout(row))


def row_prompt(row: dict) -> tuple:
    """(format, grid, encoding, patch, patch_layout, variant): what :func:`make_example` takes to rebuild
    a conversation row's prompt for another image of its tile (``magseg_nb.views``)."""
    # Text4Seg rows say variant "tile"; its prompt ignores the variant, so any valid one builds it
    variant = row["variant"] if row["format"] == "magseg" else DEFAULT_VARIANT
    return row["format"], int(row["grid"]), row["encoding"], row_patch(row), row_layout(row), variant


def mark_patch(tile_image: Image.Image, patch, patch_layout: int, width: int | None = None) -> Image.Image:
    """The tile with the patch outlined; the line is thick enough to survive resizing to 64 px."""
    img = tile_image.convert("RGB").copy()
    top, bottom, left, right = patch_bounds((img.height, img.width), patch, patch_layout)
    width = width or max(2, img.width // 48)
    ImageDraw.Draw(img).rectangle([left, top, right - 1, bottom - 1], outline=MARK_COLOR, width=width)
    return img


def crop_patch(tile_image: Image.Image, patch, patch_layout: int) -> Image.Image:
    top, bottom, left, right = patch_bounds((tile_image.height, tile_image.width), patch, patch_layout)
    return tile_image.convert("RGB").crop((left, top, right, bottom))


def second_image(tile_image: Image.Image, patch, patch_layout: int, variant: str) -> Image.Image | None:
    if variant == "mark":
        return mark_patch(tile_image, patch, patch_layout)
    if variant == "crop":
        return crop_patch(tile_image, patch, patch_layout)
    return None


def make_example(
    tile_image: Image.Image,
    fmt: str,
    grid: int,
    encoding: str,
    patch=None,
    patch_layout: int = 1,
    variant: str = DEFAULT_VARIANT,
) -> dict:
    """One conversation's input: ``dict(images=[PIL...], prompt=[user message])``.

    Used to write the training data AND at inference, so both see exactly the same prompt.
    """
    _check(fmt, encoding, variant, patch, patch_layout, grid)
    if isinstance(tile_image, np.ndarray):
        tile_image = Image.fromarray(tile_image)
    tile_image = tile_image.convert("RGB")
    images = [tile_image]
    if fmt == "magseg" and variant == "crop_only":
        images = [crop_patch(tile_image, patch, patch_layout)]
    elif fmt == "magseg" and variant != "index":
        images.append(second_image(tile_image, patch, patch_layout, variant))
    text = instruction(fmt, grid, encoding, patch, patch_layout, variant)
    return {"images": images, "prompt": user_message(len(images), text)}


def user_message(n_images: int, text: str) -> list[dict]:
    """The prompt's one user turn: ``n_images`` image slots, then the instruction."""
    content = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def completion(mask, encoding: str) -> list[dict]:
    """The assistant turn for a target grid."""
    return [{"role": "assistant", "content": [{"type": "text", "text": textgrid.encode(mask, encoding)}]}]


def patches(fmt: str, patch_layout: int) -> list:
    """The patches one tile yields: every (row, col) for MAgSeg, [None] for Text4Seg."""
    if fmt == "text4seg":
        return [None]
    return [(r, c) for r in range(patch_layout) for c in range(patch_layout)]


@dataclass
class TileRecord:
    """What the dataset builder needs of one tile (geo.read_tile gives image and semantic)."""

    tile_id: str
    scene_id: str
    split: str
    image: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) class ids, NODATA allowed


def tile_records(run01, splits=("train", "val", "test"), max_per_split: int = 0) -> list[TileRecord]:
    """Notebook 01's tiles as TileRecords (the first ``max_per_split`` of each split; 0 = all)."""

    table = geo.read_tiles_table(run01)
    unknown = set(table["split"]) - set(splits)
    table = table[table["split"].isin(splits)]
    if table.empty:
        raise ValueError(
            f"{run01}/tiles.csv has no tiles in splits {list(splits)} (it has {sorted(unknown)})"
        )
    if max_per_split:
        table = table.groupby("split", sort=False).head(max_per_split)
    out = []
    for row in table.itertuples():
        tile = geo.read_tile(run01, row.tile_id)
        out.append(TileRecord(row.tile_id, str(row.scene_id), row.split, tile.image, tile.semantic))
    return out


def save_png(img: Image.Image, path: Path) -> None:
    """Write an image once (kept when present: tiles are shared by formats), atomically."""
    if path.exists():
        return
    with files.atomic(path) as tmp:
        img.save(tmp, format="PNG")


def conversation_rows(
    tile: TileRecord,
    out_dir: Path,
    fmt: str,
    grid: int,
    encoding: str,
    patch_layout: int = 1,
    variant: str = DEFAULT_VARIANT,
) -> list[dict]:
    """The JSONL rows of one tile (its images are written to ``out_dir/images``)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(tile.image, dtype=np.uint8)).convert("RGB")
    tile_png = f"images/{files.safe_id(tile.tile_id, 'tile id')}.png"
    save_png(image, out_dir / tile_png)
    layout = patch_layout if fmt == "magseg" else 1
    rows = []
    for patch in patches(fmt, layout):
        ex = make_example(image, fmt, grid, encoding, patch, layout, variant)
        paths = [tile_png]
        suffix = f"__p{patch[0]}_{patch[1]}" if patch else ""
        if fmt == "magseg" and variant == "crop_only":  # the crop replaces the tile
            paths = [f"images/{tile.tile_id}{suffix}_{variant}.png"]
            save_png(ex["images"][0], out_dir / paths[0])
        elif len(ex["images"]) > 1:
            paths.append(f"images/{tile.tile_id}{suffix}_{variant}.png")
            save_png(ex["images"][1], out_dir / paths[1])
        target = patch_target(tile.semantic, patch, layout, grid)
        rows.append(
            {
                "id": f"{tile.tile_id}{suffix}",
                "tile_id": tile.tile_id,
                "scene_id": tile.scene_id,
                "split": tile.split,
                "format": fmt,
                "encoding": encoding,
                "variant": variant if fmt == "magseg" else "tile",
                "patch_row": patch[0] if patch else None,
                "patch_col": patch[1] if patch else None,
                "patch_layout": layout,
                "grid": grid,
                "image_paths": paths,
                "prompt": ex["prompt"],
                "completion": completion(target, encoding),
                "gt_mask": target.tolist(),
                "nodata_frac": float(np.mean(np.asarray(tile.semantic) == NODATA)),
            }
        )
    return rows


def write_conversations(
    tiles: Iterable[TileRecord],
    out_dir: Path,
    fmt: str,
    grid: int,
    encoding: str,
    patch_layout: int = 1,
    variant: str = DEFAULT_VARIANT,
) -> dict[str, Path]:
    """Write ``<fmt>_<split>.jsonl`` files (+ images/) for the tiles; returns {split: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[dict]] = {}
    for tile in tiles:
        rows = conversation_rows(tile, out_dir, fmt, grid, encoding, patch_layout, variant)
        by_split.setdefault(tile.split, []).extend(rows)
    paths = {}
    for split, rows in sorted(by_split.items()):
        paths[split] = files.write_jsonl(out_dir / f"{fmt}_{split}.jsonl", rows)
    record_format(out_dir, fmt, grid, encoding, patch_layout if fmt == "magseg" else 1, variant)
    return paths


FORMATS_FILE = "formats.json"  # how each format's conversations were built; read by read_formats only


def record_format(out_dir, fmt: str, grid: int, encoding: str, patch_layout: int, variant: str) -> Path:
    """Add ``fmt``'s settings to ``out_dir/formats.json`` (the one record later stages read)."""
    path = Path(out_dir) / FORMATS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(path.read_text()) if path.exists() else {}
    known[fmt] = {
        "grid": int(grid),
        "patch_layout": int(patch_layout),
        "encoding": encoding,
        "variant": variant if fmt == "magseg" else "index",
        "cells_per_tile_side": effective_grid(patch_layout, grid),
    }
    return files.write_json(path, known, sort_keys=True)


def read_formats(run02) -> dict[str, dict]:
    """``formats.json`` of notebook 02's folder: {format: grid, patch_layout, encoding, variant, cells}."""
    path = Path(run02) / FORMATS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run notebook 02_instruction_format (it writes it)")
    return json.loads(path.read_text())


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run notebook 02_instruction_format first")
    rows = []
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {i}: not valid JSON ({err}); rerun notebook 02") from err
    return rows


def answer_lengths(tokenizer, jsonl_path) -> np.ndarray:
    """Tokens of each answer in a JSONL file, +1 for <end_of_turn> (sets max_new_tokens downstream)."""
    texts = [row["completion"][0]["content"][0]["text"] for row in read_jsonl(jsonl_path)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([len(x) + 1 for x in ids])


def load_conversations(jsonl_path, limit: int | None = None):
    """A ``datasets.Dataset`` that TRL's SFTTrainer and GRPOTrainer take directly.

    Columns: ``images`` (list of PIL images, opened lazily), ``prompt`` and ``completion``
    (conversational), ``gt_mask`` (target grid), and the metadata of the JSONL rows.
    """
    import datasets

    jsonl_path = Path(jsonl_path)
    rows = read_jsonl(jsonl_path)[:limit]
    if not rows:
        raise ValueError(f"{jsonl_path} holds no conversations; check the split and rerun notebook 02")
    for row in rows:
        paths = [jsonl_path.parent / p for p in row.pop("image_paths")]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{jsonl_path}: images {missing} are missing; rerun notebook 02")
        row["images"] = [str(p) for p in paths]
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per small cast clutters notebooks
    try:
        ds = datasets.Dataset.from_list(rows)
        return ds.cast_column("images", datasets.List(datasets.Image()))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# --- token budget -----------------------------------------------------------------------------------


def budget_settings(resolutions, patch_grids, encodings=textgrid.ENCODINGS, variants=VARIANTS) -> list[dict]:
    """The (format, variant, encoding, effective resolution, layout, grid) rows of the token-budget table.

    Both formats describe a tile at the same effective resolution E: Text4Seg answers one E x E grid,
    MAgSeg answers (E/g)^2 grids of g x g (one per patch).
    """
    out = []
    for eff in resolutions:
        for enc in encodings:
            out.append(
                dict(format="text4seg", variant="tile", encoding=enc, effective=eff, patch_layout=1, grid=eff)
            )
            for g in patch_grids:
                if eff % g or eff // g < 2:
                    continue
                for variant in variants:
                    out.append(
                        dict(
                            format="magseg",
                            variant=variant,
                            encoding=enc,
                            effective=eff,
                            patch_layout=eff // g,
                            grid=g,
                        )
                    )
    return out


def _prompt_tokens(processor, example: dict) -> tuple[int, int]:
    """(all prompt tokens incl. image tokens, image tokens) as the model sees them."""
    text = processor.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
    ids = processor(text=[text], images=[example["images"]], return_tensors="np")["input_ids"][0]
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.image_token)
    return len(ids), int((ids == image_token).sum())


def _answer_tokens(tokenizer, mask, encoding: str) -> int:
    # +1: the <end_of_turn> the model must also write to stop.
    return len(tokenizer(textgrid.encode(mask, encoding), add_special_tokens=False)["input_ids"]) + 1


def token_budget(
    processor,
    tiles: list[TileRecord],
    settings: list[dict],
    image_tokens_real: int = 256,
    real_tokenizer=None,
    max_patches: int = 16,
    seed: int = 0,
    tokenizer: str = "",
    estimate: bool = False,
):
    """Measured token counts per conversation and per tile, one row per setting (a pandas DataFrame).

    Prompt tokens include the image tokens; ``gemma3_*`` columns swap in ``image_tokens_real`` soft tokens
    per image (real gemma-3-4b-it: 256), and count answers with ``real_tokenizer`` when one is given.
    ``tokenizer`` names the processor's tokenizer (column ``tokenizer``); ``estimate=True`` says it is not
    the profile model's own (its weights are not here), so the counts are an estimate (column
    ``estimate``). ``gemma3_estimate`` is True when no ``real_tokenizer`` counted the ``gemma3_*`` answers.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for s in settings:
        fmt, enc, layout, grid = s["format"], s["encoding"], s["patch_layout"], s["grid"]
        variant = s["variant"] if fmt == "magseg" else "index"
        tile_image = Image.fromarray(np.asarray(tiles[0].image, dtype=np.uint8))
        first = patches(fmt, layout)[0]
        example = make_example(tile_image, fmt, grid, enc, first, layout, variant)
        prompt, image = _prompt_tokens(processor, example)
        answers, real_answers = [], []
        for tile in tiles:
            chosen = patches(fmt, layout)
            if len(chosen) > max_patches:  # a sample of patches is enough for a mean
                chosen = [chosen[i] for i in rng.choice(len(chosen), max_patches, replace=False)]
            for patch in chosen:
                target = patch_target(tile.semantic, patch, layout, grid)
                answers.append(_answer_tokens(processor.tokenizer, target, enc))
                if real_tokenizer is not None:
                    real_answers.append(_answer_tokens(real_tokenizer, target, enc))
        n_conv = layout * layout
        n_images = len(example["images"])
        answer = float(np.mean(answers))
        real_answer = float(np.mean(real_answers)) if real_answers else answer
        real_prompt = prompt - image + n_images * image_tokens_real
        rows.append(
            {
                **s,
                "conversations_per_tile": n_conv,
                "images_per_conversation": n_images,
                "image_tokens": image,
                "prompt_tokens": prompt,
                "answer_tokens_mean": round(answer, 1),
                "answer_tokens_max": int(np.max(answers)),
                "total_tokens": round(prompt + answer, 1),
                "tile_tokens": round(n_conv * (prompt + answer)),
                "gemma3_prompt_tokens": real_prompt,
                "gemma3_answer_tokens_mean": round(real_answer, 1),
                "gemma3_total_tokens": round(real_prompt + real_answer, 1),
                "gemma3_tile_tokens": round(n_conv * (real_prompt + real_answer)),
                "tokenizer": tokenizer or processor.tokenizer.name_or_path,
                "estimate": bool(estimate),
                "gemma3_estimate": real_tokenizer is None,
            }
        )
    return pd.DataFrame(rows)


def budget_note(budget, model_id: str) -> str:
    """One sentence under the token-budget table: which tokenizer counted, and whether it is an estimate."""
    first = budget.iloc[0]
    name = first["tokenizer"]
    if first["estimate"]:
        out = (f"Token counts are an estimate: made with the {name}, not with the tokenizer of {model_id}, "
               "whose weights are not on this machine.")  # fmt: skip
    else:
        out = f"Token counts made with the {name}, the tokenizer of {model_id}."
    if first["gemma3_estimate"]:
        out += (" The gemma3_* columns put in gemma-3-4b-it's image tokens but count answers with that same "
                "tokenizer: an estimate of the real Gemma 3.")  # fmt: skip
    else:
        out += " The gemma3_* columns count answers with the real Gemma 3 tokenizer."
    return out
