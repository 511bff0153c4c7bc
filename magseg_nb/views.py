"""Test-time views: a tile answered as it is and flipped or turned, the answers voted per cell.

View ``v`` (0..7) flips the tile left-right when ``v >= 4``, then turns it ``v % 4`` quarter turns
counter-clockwise (``np.rot90``); view 0 is the tile as it is. A patch of the tile is a patch of every
view, at another place (:func:`view_patch`), and its answer grid maps back by the inverse move
(:func:`from_view`), because a block of cells turns as a whole with the tile. Each answer is decoded
in its view, mapped back, and the views vote per cell; a tie keeps the plain view's label.

Counts: 1 (off), 4 (the quarter turns) or 8 (turns of the tile and of its mirror image).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from magseg_nb import prompts, textgrid
from magseg_nb.labels import CLASSES

VIEW_COUNTS = (1, 4, 8)


def view_ids(n: int) -> list[int]:
    """The views a count stands for (view 0, the tile as it is, always first)."""
    if n not in VIEW_COUNTS:
        raise ValueError(f"test_views={n!r}: use one of {VIEW_COUNTS} (1: the tile as it is only)")
    return list(range(n))


def to_view(a: np.ndarray, v: int) -> np.ndarray:
    """Array ``a`` (H, W, ...) as view ``v`` sees it."""
    if v >= 4:
        a = np.flip(a, 1)
    return np.ascontiguousarray(np.rot90(a, v % 4))


def from_view(a: np.ndarray, v: int) -> np.ndarray:
    """The inverse of :func:`to_view`: an array seen in view ``v`` back in the tile's frame."""
    a = np.rot90(a, -(v % 4))
    if v >= 4:
        a = np.flip(a, 1)
    return np.ascontiguousarray(a)


def view_shape(shape, v: int) -> tuple:
    """The (rows, cols) of a grid of ``shape`` as view ``v`` sees it: a quarter turn swaps them."""
    return tuple(shape) if v % 2 == 0 else tuple(shape)[::-1]


def view_patch(patch, patch_layout: int, v: int):
    """Where ``patch`` (row, col) of the tile lies in view ``v`` (``None``, the whole tile, stays)."""
    if patch is None:
        return None
    index = np.arange(patch_layout * patch_layout).reshape(patch_layout, patch_layout)
    r, c = np.argwhere(to_view(index, v) == patch[0] * patch_layout + patch[1])[0]
    return (int(r), int(c))


def _rgb(image) -> np.ndarray:
    """An image (PIL or array) as an RGB array."""
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)


def view_example(
    tile_image, fmt: str, grid: int, encoding: str, patch, patch_layout: int, variant: str, v: int
) -> dict:
    """The prompt of one patch in view ``v``, built by the same function as the training data."""
    return prompts.make_example(
        to_view(_rgb(tile_image), v),
        fmt,
        grid,
        encoding,
        view_patch(patch, patch_layout, v),
        patch_layout,
        variant,
    )


def row_view_example(
    image, fmt: str, grid: int, encoding: str, patch, patch_layout: int, variant: str, v: int
) -> dict:
    """The prompt of a conversation row in view ``v``, from the row's first image (``prompts.row_prompt``
    gives the rest): the tile, or for a ``crop_only`` row, whose only image is its patch, that patch.

    The patch of the turned tile at :func:`view_patch` is the turned patch (when the tile's side divides
    into patches, as ``tests/test_views.py`` checks), so a ``crop_only`` row's view is its image turned."""
    if not (fmt == "magseg" and variant == "crop_only"):
        return view_example(image, fmt, grid, encoding, patch, patch_layout, variant, v)
    moved = view_patch(patch, patch_layout, v)
    text = prompts.instruction(fmt, grid, encoding, moved, patch_layout, variant)
    return {"images": [Image.fromarray(to_view(_rgb(image), v))], "prompt": prompts.user_message(1, text)}


def vote(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Per-cell majority of same-shaped class grids; a tie keeps the first grid's label."""
    stack = np.stack([np.asarray(m) for m in masks])
    counts = np.stack([(stack == c).sum(0) for c in range(len(CLASSES))]).astype(float)
    first = stack[0]
    inside = first < len(CLASSES)  # a nodata label in the first grid takes no tie bonus
    for c in range(len(CLASSES)):
        counts[c] += 0.5 * ((first == c) & inside)
    return counts.argmax(0).astype(first.dtype)


def voted_answer(texts: Sequence[str], views: Sequence[int], shape, encoding: str) -> tuple[np.ndarray, str]:
    """One patch's answers in ``views`` (same order): decoded, mapped back, voted; (mask, answer text)."""
    if len(texts) != len(views):
        raise ValueError(f"{len(texts)} answers for {len(views)} views")
    masks = []
    for text, v in zip(texts, views, strict=True):
        masks.append(from_view(textgrid.decode(text, shape=view_shape(shape, v), encoding=encoding).mask, v))
    mask = vote(masks)
    return mask, textgrid.encode(mask, encoding)
