"""Whole-tile and whole-scene inference: prompts -> batched greedy answers -> label grids -> masks.

MAgSeg asks once per patch of a ``patch_layout x patch_layout`` split of the tile; Text4Seg asks once
for the whole tile. Each answer is decoded with ``textgrid.decode`` (never raises), its ``grid x grid``
cells are upsampled to the patch's pixels, patches make a tile mask and tiles a scene mask, where
overlapping tiles vote (weighted by how well-formed their answers were).

Rules for bad input (tested):

- a variant whose adapter does not fit the base model: ``models.AdapterMismatchError`` naming both;
- a scene with no test tiles: ``infer_scene`` raises ``ValueError``; ``run_variant`` raises when the
  whole test split is empty (nothing would be written) and names notebook 01 as the fix;
- a nodata tile (an all-zero image, the nodata value of notebook 01's images, or ``nodata_frac`` >=
  ``max_nodata_frac``): skipped, counted in ``skipped_tiles.csv``; its pixels stay NODATA (255)
  unless another tile covers them; a scene of nodata tiles gives all-NODATA masks and no fields;
- an answer with no label grid at all: counted as malformed and unparsed; its patch is filled with
  ``others`` (class 0, textgrid's fill) at confidence 0, and in overlaps any parsed answer outvotes it.
  Partly repaired answers count as malformed and vote with weight ``1 - repaired_fraction``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from magseg_nb import files, geo, instances, layout, models, prompts, refine, textgrid
from magseg_nb import views as views_mod
from magseg_nb.labels import CLASSES, NODATA
from magseg_nb.rewards import mean_dice

TRAININGS = (("03_sft", "sft"), ("04_grpo", "grpo"))
MIN_WEIGHT = 1e-3  # the vote of an unparsed answer: a fill, outvoted by any parsed answer


# --- variants ---------------------------------------------------------------------------------------


@dataclass
class FormatSpec:
    """How a format's prompts were built in notebook 02 (read from its JSONL rows, never retyped)."""

    fmt: str
    grid: int
    patch_layout: int
    encoding: str
    prompt_variant: str = prompts.DEFAULT_VARIANT


def format_spec(run02: Path, fmt: str) -> FormatSpec:
    """The grid, patch layout, encoding and prompt variant of ``fmt`` (notebook 02's formats.json)."""
    known = prompts.read_formats(run02)
    if fmt not in known:
        raise FileNotFoundError(
            f"{Path(run02) / prompts.FORMATS_FILE} has no {fmt!r} (it has {sorted(known)}): "
            "run notebook 02_instruction_format with this format"
        )
    rec = known[fmt]
    return FormatSpec(fmt, rec["grid"], rec["patch_layout"], rec["encoding"], rec["variant"])


@dataclass
class Variant:
    """One trained model to run: ``<format>-<sft|grpo>``."""

    name: str
    fmt: str
    training: str
    weights_dir: Path  # a PEFT adapter folder, or a full model folder (full fine-tune)
    is_adapter: bool
    base_model: str  # the base the adapter was trained on ("" for a full model)


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on (PEFT's adapter_config.json); a shipped model recorded
    at another checkout's path is this checkout's copy (``models.shipped_base``)."""
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.exists():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: rerun the training notebook")
    return models.shipped_base(json.loads(config.read_text()).get("base_model_name_or_path") or "")


def find_variants(run_dir: Path) -> list[Variant]:
    """Every trained model in a run folder: 03_sft/<fmt>/{adapter,model}, 04_grpo/<fmt>/adapter."""
    found = []
    for stage, training in TRAININGS:
        for fmt in prompts.FORMATS:
            folder = Path(run_dir) / stage / fmt
            if (folder / "adapter" / "adapter_config.json").exists():
                weights = folder / "adapter"
                found.append(
                    Variant(f"{fmt}-{training}", fmt, training, weights, True, adapter_base(weights))
                )
            elif (folder / "model" / "config.json").exists():
                found.append(Variant(f"{fmt}-{training}", fmt, training, folder / "model", False, ""))
    return found


def select_variants(found: Sequence[Variant], requested) -> list[Variant]:
    """``requested``: "all" or a list of names such as ["magseg-sft", "magseg-grpo"]."""
    if requested == "all" or requested == ["all"]:
        if not found:
            raise FileNotFoundError(
                "no trained model in 03_sft/<format>/ or 04_grpo/<format>/: run notebooks 03 and 04 first"
            )
        return list(found)
    if isinstance(requested, str):
        requested = [requested]
    by_name = {v.name: v for v in found}
    missing = [r for r in requested if r not in by_name]
    if missing:
        raise ValueError(
            f"variants {missing} have no trained model in this run folder; present: "
            f"{sorted(by_name) or 'none'} (run notebook 03/04 for that format, or change `variants`)"
        )
    return [by_name[r] for r in requested]


def load_variant(variant: Variant, base_model: str | None = None, device: str = "auto"):
    """(model, processor) for a variant; ``base_model`` overrides the adapter's own base (checked by
    ``models.load_model_and_processor``, which raises ``AdapterMismatchError`` naming both)."""

    if not variant.is_adapter:
        return models.load_model_and_processor(str(variant.weights_dir), device=device)
    base = base_model or variant.base_model
    trained_on = variant.base_model
    if base_model and trained_on and Path(trained_on.rstrip("/")).name != Path(base_model.rstrip("/")).name:
        # Checked before loading: a mismatch should not cost loading a multi-GB base model first.
        raise models.AdapterMismatchError(
            f"adapter {variant.weights_dir} ({variant.name}) was trained on base model {trained_on!r}, "
            f"but base_model={base_model!r} was asked for; leave base_model empty to use the adapter's own"
        )
    if not base:
        raise ValueError(f"{variant.weights_dir}/adapter_config.json names no base model; pass base_model")
    return models.load_model_and_processor(base, adapter_dir=variant.weights_dir, device=device)


# --- one tile ---------------------------------------------------------------------------------------


def upsample_grid(grid_mask: np.ndarray, shape) -> np.ndarray:
    """Nearest upsampling of a (g, g) cell grid to (h, w) pixels, cell i covering rows i*h//g.. as
    in ``prompts.downsample_mask``."""
    grid_mask = np.asarray(grid_mask)
    h, w = shape
    rows = np.searchsorted(np.arange(grid_mask.shape[0]) * h // grid_mask.shape[0], np.arange(h), "right") - 1
    cols = np.searchsorted(np.arange(grid_mask.shape[1]) * w // grid_mask.shape[1], np.arange(w), "right") - 1
    return grid_mask[np.ix_(rows, cols)]


@dataclass
class TilePrediction:
    mask: np.ndarray  # (H, W) uint8 class ids
    confidence: np.ndarray  # (H, W) float32: 1 - repaired fraction of the answer behind each pixel
    reports: list = field(default_factory=list)  # textgrid.RepairReport per answer
    answers: list[str] = field(default_factory=list)
    patches: list = field(default_factory=list)  # (row, col) per answer, None for Text4Seg

    @property
    def n_malformed(self) -> int:
        return sum(not r.valid for r in self.reports)

    @property
    def n_unparsed(self) -> int:
        return sum(not r.parsed for r in self.reports)


def tile_patches(spec: FormatSpec) -> list:
    return prompts.patches(spec.fmt, spec.patch_layout if spec.fmt == "magseg" else 1)


def tile_examples(tile_image: np.ndarray, spec: FormatSpec) -> list[dict]:
    """The prompts of one tile, built by the same function as the training data."""
    layout = spec.patch_layout if spec.fmt == "magseg" else 1
    return [
        prompts.make_example(tile_image, spec.fmt, spec.grid, spec.encoding, p, layout, spec.prompt_variant)
        for p in tile_patches(spec)
    ]


def patch_boxes(shape, spec: FormatSpec) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) pixel bounds of each patch of a tile, in ``tile_patches`` order."""
    h, w = shape[:2]
    return [
        (0, h, 0, w) if patch is None else prompts.patch_bounds((h, w), patch, spec.patch_layout)
        for patch in tile_patches(spec)
    ]


def stitch_grids(shape, spec: FormatSpec, grids: Sequence[np.ndarray]) -> np.ndarray:
    """(H, W) uint8 tile mask from one class grid per patch (``tile_patches`` order), each spread
    (nearest) over its own patch."""
    mask = np.zeros(shape[:2], np.uint8)
    for (top, bottom, left, right), grid in zip(patch_boxes(shape, spec), grids, strict=True):
        mask[top:bottom, left:right] = upsample_grid(grid, (bottom - top, right - left))
    return mask


def assemble_tile(shape, spec: FormatSpec, answers: Sequence[str]) -> TilePrediction:
    """Decode one tile's answers (in ``tile_patches`` order) and stitch them into a tile mask."""
    patches = tile_patches(spec)
    if len(answers) != len(patches):
        raise ValueError(f"{len(answers)} answers for a tile of {len(patches)} patches")
    decoded = [textgrid.decode(text, (spec.grid, spec.grid), spec.encoding) for text in answers]
    conf = np.zeros(shape[:2], np.float32)
    for (top, bottom, left, right), dec in zip(patch_boxes(shape, spec), decoded, strict=True):
        conf[top:bottom, left:right] = 0.0 if not dec.report.parsed else 1.0 - dec.report.repaired_fraction
    mask = stitch_grids(shape, spec, [dec.mask for dec in decoded])
    return TilePrediction(mask, conf, [dec.report for dec in decoded], list(answers), patches)


def predict_tiles(
    model,
    processor,
    images: Sequence[np.ndarray],
    spec: FormatSpec,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    generate: Callable | None = None,
    test_views: int = 1,
) -> list[TilePrediction]:
    """Tile masks for several tiles with one batched greedy generation over all their prompts.

    With ``test_views`` > 1 every tile is also answered flipped/turned and the views vote per cell
    (:mod:`magseg_nb.views`): the mask is the vote's; answers, reports and confidence stay the plain
    view's (what the model wrote for the tile as it is)."""
    if generate is None:
        from magseg_nb.models import generate
    views = views_mod.view_ids(test_views)
    patches = tile_patches(spec)
    layout_ = spec.patch_layout if spec.fmt == "magseg" else 1
    examples = [ex for img in images for ex in tile_examples(img, spec)]
    for v in views[1:]:
        examples += [
            views_mod.view_example(
                img, spec.fmt, spec.grid, spec.encoding, p, layout_, spec.prompt_variant, v
            )
            for img in images
            for p in patches
        ]
    answers = generate(model, processor, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    n, per_view = len(patches), len(images) * len(patches)
    out = []
    for i, img in enumerate(images):
        pred = assemble_tile(img.shape, spec, answers[i * n : (i + 1) * n])
        if len(views) > 1:
            voted = [
                views_mod.voted_answer(
                    [answers[k * per_view + i * n + j] for k in range(len(views))],
                    views,
                    (spec.grid, spec.grid),
                    spec.encoding,
                )[0]
                for j in range(n)
            ]
            pred = replace(pred, mask=stitch_grids(img.shape, spec, voted))
        out.append(pred)
    return out


def predict_tile(
    model,
    processor,
    tile_image: np.ndarray,
    fmt: str,
    grid: int,
    patch_layout: int,
    encoding: str,
    variant: str = prompts.DEFAULT_VARIANT,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    generate: Callable | None = None,
    test_views: int = 1,
) -> TilePrediction:
    """The (H, W) class mask of one tile (every patch for MAgSeg, the whole tile for Text4Seg)."""
    spec = FormatSpec(fmt, grid, patch_layout, encoding, variant)
    return predict_tiles(
        model, processor, [tile_image], spec, batch_size, max_new_tokens, generate, test_views
    )[0]


def answer_budget(processor, spec: FormatSpec, run02: Path | None = None, margin: float = 1.25) -> int:
    """max_new_tokens for generation: the longest reference answer of notebook 02's training
    conversations of this format times ``margin`` (as training's evaluation does), or, without them,
    the longest well-formed answer (a grid whose every run has length one)."""
    texts = []
    path = Path(run02) / f"{spec.fmt}_train.jsonl" if run02 else None
    if path is not None and path.exists():
        with open(path) as fh:
            texts = [json.loads(line)["completion"][0]["content"][0]["text"] for line in fh if line.strip()]
    if not texts:
        cells = np.arange(spec.grid * spec.grid).reshape(spec.grid, spec.grid)
        texts, margin = [textgrid.encode((cells + cells // spec.grid) % len(CLASSES), spec.encoding)], 1.0
    longest = max(len(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return int(longest * margin) + 8


# --- a scene ----------------------------------------------------------------------------------------


class SceneVotes:
    """Per-class vote sums over a scene grid; pixels nobody voted for stay NODATA."""

    def __init__(self, shape):
        self.votes = np.zeros((len(CLASSES),) + tuple(shape), np.float32)
        self.count = np.zeros(tuple(shape), np.float32)

    def add(self, row_off: int, col_off: int, mask: np.ndarray, weight) -> None:
        """Add one prediction of a window; its NODATA pixels do not vote."""
        h, w = mask.shape
        weight = np.broadcast_to(np.maximum(np.asarray(weight, np.float32), MIN_WEIGHT), (h, w))
        win = (slice(row_off, row_off + h), slice(col_off, col_off + w))
        for k in range(len(CLASSES)):
            self.votes[k][win] += np.where(mask == k, weight, 0)
        self.count[win] += mask != NODATA

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels uint8, confidence float32 = the winner's vote / number of votes)."""
        labels = self.votes.argmax(axis=0).astype(np.uint8)
        seen = self.count > 0
        conf = np.where(seen, self.votes.max(axis=0) / np.maximum(self.count, 1), 0).astype(np.float32)
        labels[~seen] = NODATA
        conf[conf <= MIN_WEIGHT] = 0.0  # only fills voted there
        return labels, np.clip(conf, 0, 1)


def is_nodata_tile(image: np.ndarray, nodata_frac: float | None = None, max_nodata_frac: float = 1.0) -> bool:
    """True for an all-zero image (notebook 01's image nodata) or ``nodata_frac >= max_nodata_frac``."""
    if not np.asarray(image).any():
        return True
    return nodata_frac is not None and np.isfinite(nodata_frac) and nodata_frac >= max_nodata_frac


@dataclass
class SceneResult:
    scene_id: str
    coarse: np.ndarray  # (H, W) uint8, NODATA outside inferred tiles
    confidence: np.ndarray  # (H, W) float32
    crs: object
    transform: object
    tiles: pd.DataFrame  # one row per test tile: status, n_answers, n_malformed, ...
    answers: list[dict]


def scene_grid(run01: Path, scene_id: str):
    """(shape, crs, transform) of a scene's image from notebook 01."""
    import rasterio

    path = geo.scene_paths(run01, scene_id)["image"]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: rerun notebook 01_dataset_prep")
    with rasterio.open(path) as src:
        return (src.height, src.width), src.crs, src.transform


def infer_scene(
    model,
    processor,
    run01: Path,
    scene_tiles: pd.DataFrame,
    spec: FormatSpec,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    tiles_per_call: int = 8,
    max_nodata_frac: float = 1.0,
    generate: Callable | None = None,
    log: Callable[[str], None] | None = None,
    test_views: int = 1,
) -> SceneResult:
    """The coarse mask of one scene from its tiles (rows of tiles.csv, all of one scene)."""

    if scene_tiles.empty:
        raise ValueError("infer_scene got no tiles: this scene has no test-split tiles to infer")
    scene_ids = scene_tiles.scene_id.astype(str).unique()
    if len(scene_ids) != 1:
        raise ValueError(f"infer_scene takes the tiles of one scene, got scenes {list(scene_ids)}")
    scene_id = files.safe_id(scene_ids[0], "scene id in tiles.csv")  # it names output files
    shape, crs, transform = scene_grid(run01, scene_id)
    votes = SceneVotes(shape)
    records, answers = [], []
    rows = list(scene_tiles.itertuples(index=False))
    for start in range(0, len(rows), tiles_per_call):
        chunk, images = [], []
        for t in rows[start : start + tiles_per_call]:
            image = geo.read_tile(run01, t.tile_id).image
            if is_nodata_tile(image, getattr(t, "nodata_frac", None), max_nodata_frac):
                records.append({"tile_id": t.tile_id, "scene_id": scene_id, "status": "skipped_nodata"})
                continue
            chunk.append(t)
            images.append(image)
        if not chunk:
            continue
        t0 = time.perf_counter()
        preds = predict_tiles(
            model, processor, images, spec, batch_size, max_new_tokens, generate, test_views
        )
        seconds = (time.perf_counter() - t0) / len(chunk)
        for t, pred in zip(chunk, preds, strict=True):
            votes.add(int(t.row_off), int(t.col_off), pred.mask, pred.confidence)
            records.append(_tile_record(t, scene_id, pred, seconds))
            answers.extend(_answer_rows(t.tile_id, scene_id, pred))
        if log:
            log(f"{scene_id}: {min(start + tiles_per_call, len(rows))}/{len(rows)} tiles")
    coarse, conf = votes.result()
    return SceneResult(scene_id, coarse, conf, crs, transform, pd.DataFrame(records), answers)


def _tile_record(t, scene_id: str, pred: TilePrediction, seconds: float) -> dict:
    return {
        "tile_id": t.tile_id,
        "scene_id": scene_id,
        "status": "inferred",
        "row_off": int(t.row_off),
        "col_off": int(t.col_off),
        "height": int(t.height),
        "width": int(t.width),
        "n_answers": len(pred.reports),
        "n_malformed": pred.n_malformed,
        "n_unparsed": pred.n_unparsed,
        "repaired_fraction": float(np.mean([r.repaired_fraction for r in pred.reports])),
        "infer_s": seconds,
    }


def _answer_rows(tile_id: str, scene_id: str, pred: TilePrediction) -> list[dict]:
    return [
        {
            "tile_id": tile_id,
            "scene_id": scene_id,
            "patch_row": None if p is None else p[0],
            "patch_col": None if p is None else p[1],
            "answer": a,
            **r.as_dict(),
        }
        for p, a, r in zip(pred.patches, pred.answers, pred.reports, strict=True)
    ]


def refine_scene(
    run01: Path,
    scene_tiles: pd.DataFrame,
    coarse: np.ndarray,
    confidence: np.ndarray,
    predictor,
    **sam_kw,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Refinement (SAM, image superpixels, or a fitted self-trained pixel classifier) tile by tile on the
    scene's coarse mask; overlaps vote by the refinement's probability.

    Returns (refined uint8, probability float32, seconds per tile id). ``predictor=None`` copies the
    coarse mask and its confidence.
    """

    if predictor is None:
        return coarse.copy(), confidence.copy(), {}
    votes = SceneVotes(coarse.shape)
    seconds = {}
    for t in scene_tiles.itertuples(index=False):
        win = _window(t)
        tile_coarse = coarse[win]
        if (tile_coarse == NODATA).all():
            continue
        t0 = time.perf_counter()
        image = geo.read_tile(run01, t.tile_id).image
        if hasattr(predictor, "refine"):  # an image-only refiner (refine.SuperpixelRefiner's signature)
            refined, prob = predictor.refine(image, tile_coarse, confidence[win])
        else:
            refined, prob = refine.sam_refine(image, tile_coarse, predictor, return_prob=True, **sam_kw)
        seconds[t.tile_id] = time.perf_counter() - t0
        votes.add(int(t.row_off), int(t.col_off), refined, prob)
    labels, prob = votes.result()
    return labels, prob, seconds


# --- a variant: every test scene, written to disk -------------------------------------------------------


def select_test_tiles(tiles: pd.DataFrame) -> pd.DataFrame:
    """The test-split rows of tiles.csv, with a clear error when there are none."""
    test = tiles[tiles["split"] == "test"]
    if test.empty:
        raise ValueError(
            "tiles.csv has no test-split tiles, so there is nothing to infer: rerun notebook "
            "01_dataset_prep with a test split (its split fractions)"
        )
    return test


def limit_tiles(tiles: pd.DataFrame, n: int) -> pd.DataFrame:
    """At most ``n`` tiles (0: all), taken in turn from each scene so that every scene is represented."""
    if not n or len(tiles) <= n:
        return tiles.sort_values("tile_id")
    ordered = tiles.sort_values("tile_id")
    rank = ordered.groupby("scene_id", sort=True).cumcount()
    return ordered.assign(_rank=rank).sort_values(["_rank", "scene_id"]).head(n).drop(columns="_rank")


def _window(t) -> tuple[slice, slice]:
    """A tile's (rows, cols) window in its scene, from a row of tiles.csv."""
    return (
        slice(int(t.row_off), int(t.row_off) + int(t.height)),
        slice(int(t.col_off), int(t.col_off) + int(t.width)),
    )


def _inferred(res: SceneResult) -> pd.DataFrame:
    return res.tiles[res.tiles.status == "inferred"] if len(res.tiles) else res.tiles


def _learns_from_coarse(predictor) -> bool:
    return isinstance(predictor, refine.SelfTrainedRefiner) and not predictor.fitted


def fit_refiner(predictor, run01: Path, results: Sequence[SceneResult]):
    """The refiner ready for ``results``: an unfitted :class:`refine.SelfTrainedRefiner` is fitted on the
    coarse masks of all their inferred tiles at once; any other refiner is returned as it is."""
    if not _learns_from_coarse(predictor):
        return predictor
    if not any(len(_inferred(res)) for res in results):  # nothing to learn from, nothing to refine
        return predictor
    tiles = (
        (geo.read_tile(run01, t.tile_id).image, res.coarse[_window(t)])
        for res in results
        for t in _inferred(res).itertuples(index=False)
    )
    return predictor.fit(tiles)


def refine_results(run01: Path, results: Iterable[SceneResult], predictor=None, sam_kw=None):
    """Each scene of ``results`` refined on its inferred tiles, one at a time as they come, unless the
    refiner learns from the coarse masks (:func:`fit_refiner`): then every scene is inferred before any is
    refined. Yields (SceneResult, refined, confidence, seconds per tile, seconds), the fit's seconds
    counted in the first scene's."""
    fit_s = 0.0
    if _learns_from_coarse(predictor):
        results = list(results)
        t0 = time.perf_counter()
        predictor = fit_refiner(predictor, run01, results)
        fit_s = time.perf_counter() - t0
    for res in results:
        t0 = time.perf_counter()
        refined, prob, ref_s = refine_scene(
            run01, _inferred(res), res.coarse, res.confidence, predictor, **(sam_kw or {})
        )
        yield res, refined, prob, ref_s, time.perf_counter() - t0 + fit_s
        fit_s = 0.0


def run_variant(
    model,
    processor,
    run01: Path,
    tiles: pd.DataFrame,
    spec: FormatSpec,
    out_dir: Path,
    predictor=None,
    sam_kw: dict | None = None,
    field_kw: dict | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_nodata_frac: float = 1.0,
    generate: Callable | None = None,
    log: Callable[[str], None] | None = print,
    test_views: int = 1,
) -> dict:
    """Infer every test tile of ``tiles`` and write ``out_dir`` (05_inference/<variant>/):
    coarse/, confidence/, refined/, instances/ GeoTIFFs per scene, fields.gpkg + fields.parquet,
    answers.jsonl, tiles.csv (inferred tiles), skipped_tiles.csv. Returns a summary dict."""

    out_dir = Path(out_dir)
    test = select_test_tiles(tiles)
    records, answers, timings = [], [], {"infer_s": 0.0, "refine_s": 0.0, "polygonize_s": 0.0}
    infer_kw = dict(
        batch_size=batch_size, max_new_tokens=max_new_tokens, max_nodata_frac=max_nodata_frac,
        generate=generate, log=log, test_views=test_views,
    )  # fmt: skip
    results = (
        infer_scene(model, processor, run01, scene_tiles, spec, **infer_kw)
        for _, scene_tiles in test.groupby("scene_id", sort=True)
    )
    for res, refined, prob, ref_s, refine_s in refine_results(run01, results, predictor, sam_kw):
        timings["refine_s"] += refine_s
        tile_rows = res.tiles.assign(refine_s=res.tiles.tile_id.map(ref_s)) if len(res.tiles) else res.tiles
        for name, arr in (("coarse", res.coarse), ("refined", refined)):
            geo.write_geotiff(
                layout.mask_path(out_dir, name, res.scene_id), arr, res.crs, res.transform, nodata=NODATA
            )
        geo.write_geotiff(layout.mask_path(out_dir, "confidence", res.scene_id), prob, res.crs, res.transform)
        records.append(tile_rows)
        answers.extend(res.answers)
        timings["infer_s"] += float(tile_rows.get("infer_s", pd.Series(dtype=float)).sum())
    table = pd.concat(records, ignore_index=True)
    inferred = table[table.status == "inferred"].drop(columns="status")
    skipped = table[table.status != "inferred"][["tile_id", "scene_id", "status"]]
    geo.write_csv(inferred, out_dir / layout.TILES_CSV)
    geo.write_csv(skipped, out_dir / "skipped_tiles.csv")
    files.write_jsonl(out_dir / layout.ANSWERS, answers)
    fields = polygonize_saved(out_dir, run01, test, **(field_kw or {}))
    timings["polygonize_s"] = fields["seconds"]
    n_answers = int(inferred.n_answers.sum()) if len(inferred) else 0
    return {
        "scenes": int(test.scene_id.nunique()),
        "tiles_inferred": len(inferred),
        "tiles_skipped_nodata": len(skipped),
        "answers": n_answers,
        "malformed": int(inferred.n_malformed.sum()) if len(inferred) else 0,
        "unparsed": int(inferred.n_unparsed.sum()) if len(inferred) else 0,
        "fields": fields["fields"],
        "test_views": test_views,
        **{k: round(v, 3) for k, v in timings.items()},
    }


def polygonize_saved(
    variant_dir: Path,
    run01: Path,
    tiles: pd.DataFrame | None = None,
    use_image_edges: bool = True,
    simplify_tolerance: float = 0.0,
    **watershed,
) -> dict:
    """Field instances + polygons from the masks a variant saved (refined/ and confidence/), without the
    model (``markers="segments"`` votes notebook 01's watershed segments of each scene): writes instances/<scene>.tif, fields.gpkg (layer "fields") and fields.parquet."""
    import geopandas as gpd
    import rasterio

    variant_dir = Path(variant_dir)
    scenes = sorted((variant_dir / "refined").glob("*.tif"))
    if not scenes:
        raise FileNotFoundError(
            f"{variant_dir / 'refined'} holds no scene masks: run notebook 05 with polygonize_only=False first"
        )
    frames, n_fields, t0 = [], 0, time.perf_counter()
    for path in scenes:
        scene_id = path.stem
        refined, crs, transform = instances.read_mask(path)
        conf_path = variant_dir / "confidence" / path.name
        conf = instances.read_mask(conf_path)[0] if conf_path.exists() else None
        image = segments = None
        if watershed.get("markers") == "segments":
            segments = instances.read_segments(run01, scene_id)
        elif use_image_edges:
            with rasterio.open(geo.scene_paths(run01, scene_id)["image"]) as src:
                image = src.read().transpose(1, 2, 0)
        scene_tiles = None if tiles is None else tiles[tiles.scene_id.astype(str) == scene_id]
        inst, gdf = instances.scene_fields(
            refined, transform, crs, scene_id, confidence=conf, tiles=scene_tiles, image=image,
            segments=segments, simplify_tolerance=simplify_tolerance, **watershed,
        )  # fmt: skip
        geo.write_geotiff(
            layout.mask_path(variant_dir, "instances", scene_id), inst, crs, transform, dtype="int32"
        )
        frames.append(gdf)
        n_fields += len(gdf)
    crs = frames[0].crs
    frames = [f.to_crs(crs) if f.crs != crs else f for f in frames]  # one layer needs one CRS
    gdf = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs)
    instances.write_fields(gdf, variant_dir)
    return {"fields": n_fields, "seconds": time.perf_counter() - t0}


# --- notebook helpers ---------------------------------------------------------------------------------


def stage_needs(run_dir: Path, requested) -> list[str]:
    """The stages notebook 05 depends on: 01-03, and 04 when a GRPO variant is asked for (or, with
    "all", when 04 has run)."""
    needs = ["01_dataset_prep", "02_instruction_format", "03_sft"]
    names = [requested] if isinstance(requested, str) else list(requested)
    wants_grpo = any(n.endswith("-grpo") for n in names)
    if wants_grpo or ("all" in names and (Path(run_dir) / "04_grpo" / "state.json").exists()):
        needs.append("04_grpo")
    return needs


SAVED = ("coarse", "confidence", "refined", layout.ANSWERS, layout.TILES_CSV, "skipped_tiles.csv")


def reuse_saved(previous: Path, out_dir: Path) -> None:
    """Copy a variant's saved masks and tables (not its instances or polygons) for ``polygonize_saved``."""

    previous, out_dir = Path(previous), Path(out_dir)
    if not (previous / "refined").is_dir():
        raise FileNotFoundError(
            f"{previous / 'refined'} does not exist: run notebook 05 once with polygonize_only=False"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SAVED:
        src, dst = previous / name, out_dir / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, dst)


def _crop_box(mask: np.ndarray, pad: int = 0):
    rows, cols = np.nonzero(mask != NODATA)
    if rows.size == 0:
        return slice(None), slice(None)
    return (
        slice(max(rows.min() - pad, 0), rows.max() + 1 + pad),
        slice(max(cols.min() - pad, 0), cols.max() + 1 + pad),
    )


def scene_outputs(variant_dir: Path, run01: Path, scene_id: str, crop: bool = True) -> dict:
    """A scene's image, ground truth, coarse, refined and instance rasters, cropped to the inferred area."""
    import rasterio

    paths = geo.scene_paths(run01, scene_id)
    with rasterio.open(paths["image"]) as src:
        image = src.read().transpose(1, 2, 0)
    out = {"image": image, "truth": instances.read_mask(paths["semantic"])[0]}
    for name in ("coarse", "refined", "instances"):
        out[name] = instances.read_mask(layout.mask_path(Path(variant_dir), name, scene_id))[0]
    if crop:
        box = _crop_box(out["coarse"])
        out = {k: v[box] for k, v in out.items()}
    return out


def quick_scores(variant_dir: Path, run01: Path) -> pd.DataFrame:
    """Per scene: mean Dice of the coarse and the refined mask against the ground truth, on the
    inferred pixels (a first look; notebook 06 scores properly), and the share of pixels SAM changed."""

    rows = []
    for path in sorted((Path(variant_dir) / "coarse").glob("*.tif")):
        s = scene_outputs(variant_dir, run01, path.stem, crop=False)
        valid = (s["coarse"] != NODATA) & (s["truth"] != NODATA)
        if not valid.any():
            rows.append({"scene_id": path.stem, "pixels": 0})
            continue
        gt = s["truth"][valid]
        rows.append(
            {
                "scene_id": path.stem,
                "pixels": int(valid.sum()),
                "mean_dice_coarse": mean_dice(gt, s["coarse"][valid]),
                "mean_dice_refined": mean_dice(gt, s["refined"][valid]),
                "changed_by_sam": float((s["coarse"][valid] != s["refined"][valid]).mean()),
                "fields": int(np.unique(s["instances"][s["instances"] > 0]).size),
            }
        )
    return pd.DataFrame(rows)


# --- the whole map scene (shown on 06's map, never scored) ---------------------------------------------


def map_scene_ids(all_tiles: pd.DataFrame, test_tiles: pd.DataFrame, map_scenes) -> list[str]:
    """Scenes to predict whole for the map: "first" (the first scene of the inferred test tiles, the
    one 06 maps by default), "" or "none" (none), "all" (every scene with test tiles), or a list of
    scene ids (checked against tiles.csv)."""
    known = set(all_tiles["scene_id"].astype(str))
    tested = sorted(set(test_tiles["scene_id"].astype(str)))
    if map_scenes in ("", "none", None, False) or not tested:
        return []
    if map_scenes == "first":
        return tested[:1]
    if map_scenes == "all":
        return tested
    wanted = [map_scenes] if isinstance(map_scenes, str) else [str(s) for s in map_scenes]
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise ValueError(f"map_scenes names unknown scenes {unknown}; scenes in tiles.csv: {sorted(known)}")
    return wanted


def map_variant(chosen: Sequence[Variant]) -> Variant | None:
    """The variant 06's map shows by default: MAgSeg after GRPO, else after SFT, else the first."""
    by_name = {v.name: v for v in chosen}
    return by_name.get("magseg-grpo") or by_name.get("magseg-sft") or (chosen[0] if chosen else None)


def map_only_tiles(all_tiles: pd.DataFrame, test_tiles: pd.DataFrame, scene_ids) -> pd.DataFrame:
    """The tiles of ``scene_ids`` that were not inferred as test tiles (their predictions are for the
    map only and never enter the scored coarse/ refined/ rasters)."""
    tested = set(test_tiles["tile_id"].astype(str))
    keep = all_tiles["scene_id"].astype(str).isin([str(s) for s in scene_ids])
    keep &= ~all_tiles["tile_id"].astype(str).isin(tested)
    return all_tiles[keep].sort_values("tile_id")


def run_map_scenes(
    model,
    processor,
    run01: Path,
    all_tiles: pd.DataFrame,
    test_tiles: pd.DataFrame,
    scene_ids,
    spec: FormatSpec,
    variant_dir: Path,
    predictor=None,
    sam_kw: dict | None = None,
    field_kw: dict | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_nodata_frac: float = 1.0,
    generate: Callable | None = None,
    log: Callable[[str], None] | None = print,
    test_views: int = 1,
) -> dict:
    """Predict the non-test tiles of ``scene_ids`` for the map, into ``<variant_dir>/whole_scene/``.

    Its coarse/, refined/, confidence/ hold the whole scene: the scored test-tile pixels exactly as in
    ``<variant_dir>/coarse|refined/`` (read from there, so the map shows what was scored) and the
    map-only prediction elsewhere; instances/ and fields.gpkg are drawn from that; tiles.csv lists the
    map-only tiles. The scored rasters and tiles.csv of the variant are not touched."""

    variant_dir = Path(variant_dir)
    out = variant_dir / layout.WHOLE_SCENE
    extra = map_only_tiles(all_tiles, test_tiles, scene_ids)
    t0, rows = time.perf_counter(), []
    infer_kw = dict(
        batch_size=batch_size, max_new_tokens=max_new_tokens, max_nodata_frac=max_nodata_frac,
        generate=generate, log=log, test_views=test_views,
    )  # fmt: skip
    scene_ids = [str(s) for s in scene_ids]
    scene_tiles = {s: extra[extra["scene_id"].astype(str) == s] for s in scene_ids}
    # the scenes with map-only tiles, refined in this order as the loop below reaches them
    refined_scenes = refine_results(
        run01,
        (infer_scene(model, processor, run01, t, spec, **infer_kw) for t in scene_tiles.values() if len(t)),
        predictor,
        sam_kw,
    )
    for scene_id in scene_ids:
        shape, crs, transform = scene_grid(run01, scene_id)
        if len(scene_tiles[scene_id]):
            res, refined, prob, _, _ = next(refined_scenes)
            coarse, conf = res.coarse, res.confidence
            rows.append(res.tiles)
        else:
            coarse = refined = np.full(shape, NODATA, np.uint8)
            conf = prob = np.zeros(shape, np.float32)
        for name, arr in (("coarse", coarse), ("refined", refined)):
            scored = layout.mask_path(variant_dir, name, scene_id)
            if scored.exists():  # the scored prediction wins where it exists
                test_arr = instances.read_mask(scored)[0]
                arr = np.where(test_arr != NODATA, test_arr, arr).astype(np.uint8)
            geo.write_geotiff(layout.mask_path(out, name, scene_id), arr, crs, transform, nodata=NODATA)
        conf_arr = prob if predictor is not None else conf
        scored_conf = layout.mask_path(variant_dir, "confidence", scene_id)
        if scored_conf.exists() and (layout.mask_path(variant_dir, "coarse", scene_id)).exists():
            test_mask = instances.read_mask(layout.mask_path(variant_dir, "coarse", scene_id))[0] != NODATA
            conf_arr = np.where(test_mask, instances.read_mask(scored_conf)[0], conf_arr)
        geo.write_geotiff(
            layout.mask_path(out, "confidence", scene_id), conf_arr.astype(np.float32), crs, transform
        )
    table = (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(columns=["tile_id", "scene_id", "status"])
    )
    geo.write_csv(table, out / layout.TILES_CSV)
    fields = polygonize_saved(out, run01, None, **(field_kw or {})) if scene_ids else {"fields": 0}
    return {
        "map_scenes": [str(s) for s in scene_ids],
        "map_tiles": int((table["status"] == "inferred").sum()) if len(table) else 0,
        "map_fields": fields["fields"],
        "map_s": round(time.perf_counter() - t0, 3),
    }


def reuse_map_scenes(previous: Path, variant_dir: Path) -> bool:
    """``polygonize_only``: keep the whole-scene map prediction of the last run (True when there was one)."""

    src = Path(previous) / layout.WHOLE_SCENE
    if not (src / "refined").is_dir():
        return False
    shutil.copytree(src, Path(variant_dir) / layout.WHOLE_SCENE, dirs_exist_ok=True)
    return True
