"""MAgSeg at the cost of one tile: one multi-turn conversation per tile, and prefix-cached generation.

Per-patch MAgSeg repeats the tile image in each of its ``patch_layout**2`` conversations. Here:

- training: :func:`tile_conversation` holds the tile image once, then a question and an answer per
  patch (the same question text and answer encoding as ``prompts.make_example``/``prompts.completion``);
  :class:`MultiTurnCollator` puts the loss on every answer and its ``<end_of_turn>``, nothing else
  (Gemma 3's chat template has no ``{% generation %}`` tags, so TRL's ``assistant_only_loss`` cannot
  find the answers; the collator finds them by token: after each ``<start_of_turn>model\\n``);
- generation: :func:`generate_prefix_cached` encodes the tile's prompt prefix (everything up to the
  end of the tile image) once and reuses its KV cache for every patch's question. The prefix always
  ends on a whole image, because Gemma 3's image tokens attend to each other bidirectionally.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from magseg_nb import files, prompts
from magseg_nb.labels import NODATA

IGNORE = -100
LAYOUTS = ("per_patch", "per_tile")


# --- building -----------------------------------------------------------------------------------------


def tile_conversation(
    tile_image,
    grid: int,
    encoding: str,
    patch_layout: int,
    variant: str = prompts.DEFAULT_VARIANT,
    tile_mask=None,
) -> dict:
    """One tile as one conversation: ``dict(images, messages, patches, gt_masks)``.

    The first user turn holds the tile image, every user turn holds its patch's second image (``mark``,
    ``crop``) and question; with ``tile_mask`` each question is followed by its answer.
    """
    if isinstance(tile_image, np.ndarray):
        tile_image = Image.fromarray(tile_image)
    tile_image = tile_image.convert("RGB")
    images, messages, gts = [], [], []
    patches = prompts.patches("magseg", patch_layout)
    for i, patch in enumerate(patches):
        ex = prompts.make_example(tile_image, "magseg", grid, encoding, patch, patch_layout, variant)
        content = ex["prompt"][0]["content"]
        turn_images = ex["images"] if i == 0 else ex["images"][1:]  # the tile image only once
        if i > 0:
            content = content[1:]  # drop the tile's image placeholder
        images.extend(turn_images)
        messages.append({"role": "user", "content": content})
        if tile_mask is not None:
            target = prompts.patch_target(tile_mask, patch, patch_layout, grid)
            gts.append(target)
            messages.extend(prompts.completion(target, encoding))
    return {"images": images, "messages": messages, "patches": patches, "gt_masks": gts}


def tile_row(
    tile: prompts.TileRecord, out_dir: Path, grid: int, encoding: str, patch_layout: int, variant: str
) -> dict:
    """The JSONL row of one tile's multi-turn conversation (images written to ``out_dir/images``)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    conv = tile_conversation(tile.image, grid, encoding, patch_layout, variant, tile.semantic)
    paths = [f"images/{tile.tile_id}.png"]
    for (r, c), _img in zip(conv["patches"], conv["images"][1:], strict=False):
        paths.append(f"images/{tile.tile_id}__p{r}_{c}_{variant}.png")
    for img, rel in zip(conv["images"], paths, strict=True):
        prompts.save_png(img, out_dir / rel)
    return {
        "id": tile.tile_id,
        "tile_id": tile.tile_id,
        "scene_id": tile.scene_id,
        "split": tile.split,
        "format": "magseg",
        "layout": "per_tile",
        "encoding": encoding,
        "variant": variant,
        "patch_layout": patch_layout,
        "grid": grid,
        "image_paths": paths,
        "messages": conv["messages"],
        "gt_mask": [g.tolist() for g in conv["gt_masks"]],  # one grid per patch (row_weights takes 3-D)
        "nodata_frac": float(np.mean(np.asarray(tile.semantic) == NODATA)),
    }


def tiles_jsonl(run02: Path, split: str) -> Path:
    return Path(run02) / f"magseg_tiles_{split}.jsonl"


def write_tile_conversations(
    tiles, out_dir: Path, grid: int, encoding: str, patch_layout: int, variant: str, splits=("train",)
) -> dict[str, Path]:
    """``magseg_tiles_<split>.jsonl`` (one multi-turn row per tile) for ``splits``; returns {split: path}.

    The per-patch files stay as they are: evaluation, GRPO and inference read those.
    """
    by_split: dict[str, list[dict]] = {}
    for tile in tiles:
        if tile.split in splits:
            by_split.setdefault(tile.split, []).append(
                tile_row(tile, out_dir, grid, encoding, patch_layout, variant)
            )
    return {s: files.write_jsonl(tiles_jsonl(out_dir, s), rows) for s, rows in sorted(by_split.items())}


def train_jsonl(run02: Path, fmt: str, layout: str) -> Path:
    """The training conversations of ``fmt`` for a conversation layout (Text4Seg has one per tile anyway)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown conversation_layout {layout!r}; use one of {LAYOUTS}")
    if layout == "per_patch" or fmt != "magseg":
        return Path(run02) / f"{fmt}_train.jsonl"
    path = tiles_jsonl(run02, "train")
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: rerun notebook 02_instruction_format with conversation_layout: per_tile"
        )
    return path


# --- loss mask ----------------------------------------------------------------------------------------


def answer_marker(tokenizer) -> list[int]:
    """Token ids that open an assistant answer: ``<start_of_turn>model\\n``."""
    return [tokenizer.convert_tokens_to_ids("<start_of_turn>")] + tokenizer(
        "model\n", add_special_tokens=False
    )["input_ids"]


def answer_labels(input_ids, tokenizer) -> np.ndarray:
    """Labels for one or more token sequences: the ids of every answer and its ``<end_of_turn>``,
    -100 everywhere else (prompt, images, the turn markers, padding)."""
    ids = np.atleast_2d(np.asarray(input_ids))
    marker = answer_marker(tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    labels = np.full_like(ids, IGNORE)
    m = len(marker)
    for b, row in enumerate(ids):
        i = 0
        while i <= len(row) - m:
            if list(row[i : i + m]) == marker:
                j = i + m
                while j < len(row) and row[j] != eot:
                    j += 1
                end = min(j + 1, len(row))  # include <end_of_turn>: the model must learn to stop
                labels[b, i + m : end] = row[i + m : end]
                i = end
            else:
                i += 1
    return labels


class MultiTurnCollator:
    """Batches ``dict(images, messages)`` rows for a vision LM with the loss on every answer only."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples: Sequence[dict]) -> dict:
        import torch

        texts = [self.processor.apply_chat_template(ex["messages"], tokenize=False) for ex in examples]
        images = [[img.convert("RGB") for img in ex["images"]] for ex in examples]
        batch = self.processor(
            text=texts,
            images=images,
            padding=True,
            padding_side="right",
            return_tensors="pt",
            add_special_tokens=False,  # the template already wrote <bos>
        )
        labels = torch.as_tensor(answer_labels(batch["input_ids"].numpy(), self.processor.tokenizer))
        labels[batch["attention_mask"] == 0] = IGNORE
        batch["labels"] = labels
        return batch


# --- prefix-cached generation -----------------------------------------------------------------------


def prefix_length(input_ids: Sequence[int], tokenizer, n_images: int = 1) -> int:
    """Tokens of the shared prefix: through the ``<end_of_image>`` of the ``n_images``-th image, so it
    holds whole images (their tokens attend to each other both ways) and nothing patch-specific."""
    eoi = tokenizer.convert_tokens_to_ids("<end_of_image>")
    seen = 0
    for i, t in enumerate(input_ids):
        if t == eoi:
            seen += 1
            if seen == n_images:
                return i + 1
    raise ValueError(f"the prompt holds {seen} images; the prefix needs {n_images}")


def _encode(processor, ex: dict, device):
    text = processor.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[list(ex["images"])], return_tensors="pt").to(device)


def generate_prefix_cached(
    model, processor, examples: list[dict], max_new_tokens: int, batch_size: int = 8, **generate_kwargs
) -> list[str]:
    """Greedy answers for the patch prompts of ONE tile (``inference.tile_examples``), in order, with
    the tile image encoded once: its prefix's KV cache is copied for each batch of continuations.

    Continuations of equal length are batched (no padding inside a cache); every prompt must start
    with the same tile image (the first image), which this checks.
    """
    import torch
    from transformers import DynamicCache

    if not examples:
        return []
    tok = processor.tokenizer
    dtype = model.dtype
    enc = [_encode(processor, ex, model.device) for ex in examples]
    p = prefix_length(enc[0]["input_ids"][0].tolist(), tok)
    for e in enc[1:]:
        if not torch.equal(e["input_ids"][0, :p], enc[0]["input_ids"][0, :p]) or not torch.equal(
            e["pixel_values"][0], enc[0]["pixel_values"][0]
        ):
            raise ValueError("prefix caching needs prompts that start with the same text and tile image")
    first = enc[0]
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.inference_mode():
        model(
            input_ids=first["input_ids"][:, :p],
            attention_mask=first["attention_mask"][:, :p],
            token_type_ids=first["token_type_ids"][:, :p],
            pixel_values=first["pixel_values"][:1].to(dtype),
            past_key_values=cache,
            use_cache=True,
        )
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(enc):
        groups.setdefault(e["input_ids"].shape[1], []).append(i)
    answers: list[str | None] = [None] * len(examples)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            ids = torch.cat([enc[i]["input_ids"] for i in chunk])
            kw = {}
            rest = [enc[i]["pixel_values"][1:] for i in chunk]  # the per-patch images (mark, crop)
            if rest[0].shape[0]:
                kw["pixel_values"] = torch.cat(rest).to(dtype)
            past = copy.deepcopy(cache)
            if len(chunk) > 1:
                past.batch_repeat_interleave(len(chunk))
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    token_type_ids=torch.cat([enc[i]["token_type_ids"] for i in chunk]),
                    past_key_values=past,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    top_k=None,
                    top_p=None,
                    temperature=None,
                    pad_token_id=tok.pad_token_id,
                    **kw,
                    **generate_kwargs,
                )
            texts = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, t in zip(chunk, texts, strict=True):
                answers[i] = t.strip()
    return [a or "" for a in answers]


def prefix_cached_generate(
    model, processor, examples: list[dict], max_new_tokens: int, batch_size: int = 8, **generate_kwargs
):
    """A drop-in for ``models.generate`` (``inference.predict_tiles(generate=...)``): the examples are
    split into runs of prompts sharing a tile image, each run generated with one prefix cache."""
    out: list[str] = []
    start = 0
    while start < len(examples):
        end = start + 1
        tile = np.asarray(examples[start]["images"][0])
        while end < len(examples) and np.array_equal(np.asarray(examples[end]["images"][0]), tile):
            end += 1
        out += generate_prefix_cached(
            model, processor, examples[start:end], max_new_tokens, batch_size, **generate_kwargs
        )
        start = end
    return out
