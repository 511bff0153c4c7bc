"""Refinement of coarse class masks: SAM or image superpixels.

- ``load_sam`` gives a ``segment_anything.SamPredictor`` for a backend: ``none`` (no refinement),
  ``tiny`` (a small randomly initialised SAM built from segment-anything's own classes, for tests and
  the CPU profiles: it proves the wiring, it cannot improve a mask), ``vit_b`` / ``vit_h`` (the real
  checkpoints, fetched with SHA-256 from ``data_manifests/sam_checkpoints.yaml``; meant for GPUs).
- ``sam_refine`` turns each class of a coarse mask into SAM prompts (mask logits, positive and
  negative points, optionally one box per connected component), iterates feeding back SAM's
  low-resolution logits, and paints the refined classes by their highest logit.
- ``SuperpixelRefiner`` snaps a coarse mask to image superpixels (CPU, no weights).
- ``SelfTrainedRefiner`` fits a per-pixel classifier to the model's own coarse labels of the tiles it
  refines, then votes its pixel labels per superpixel (CPU, no weights, no ground truth).

Field instances and polygons are :mod:`magseg_nb.instances`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage import measure
from skimage.segmentation import slic

from magseg_nb import manifest
from magseg_nb.labels import CLASS_IDS, CLASSES, NODATA

# Refinement backends of notebook 05: none, image superpixels (CPU, no weights), or SAM (tiny random
# weights for wiring checks; vit_b / vit_h real checkpoints).
SAM_BACKENDS = ("none", "superpixels", "selftrained", "tiny", "vit_b", "vit_h")
SAM_MANIFEST = Path(__file__).resolve().parents[1] / "data_manifests" / "sam_checkpoints.yaml"
FIELD = CLASS_IDS["field"]
LOGIT = 10.0  # magnitude of the logits a binary coarse mask is turned into (SAM's own outputs are ~±10)


# --- SAM ------------------------------------------------------------------------------------------


def build_tiny_sam(seed: int = 0, img_size: int = 256, embed_dim: int = 64, depth: int = 2):
    """A small random SAM from the same classes as ``segment_anything.build_sam`` (0.17 M parameters).

    Deterministic for a seed. Its mask prompt is 1 x M x M logits with M = 4 * img_size / 16 = 64.
    """
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    patch, prompt_dim = 16, 32
    emb = img_size // patch
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=depth,
                embed_dim=embed_dim,
                img_size=img_size,
                mlp_ratio=2,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=2,
                patch_size=patch,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=[depth - 1],
                window_size=4,
                out_chans=prompt_dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=prompt_dim,
                image_embedding_size=(emb, emb),
                input_image_size=(img_size, img_size),
                mask_in_chans=8,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=1, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2),
                transformer_dim=prompt_dim,
                iou_head_depth=2,
                iou_head_hidden_dim=32,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    finally:
        torch.random.set_rng_state(gen_state)  # building a test model must not move the caller's RNG
    return sam.eval()


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sam_checkpoint(backend: str, cache_dir: Path, manifest_path: Path = SAM_MANIFEST) -> Path:
    """Download (resumable, SHA-256 checked) the checkpoint of ``vit_b``/``vit_h`` into ``cache_dir``."""
    entry = manifest.manifest_entry(Path(manifest_path), "models", backend)
    return manifest.fetch(entry, Path(cache_dir))


def load_sam(
    backend: str,
    checkpoint: str | os.PathLike | None = None,
    device: str = "auto",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
):
    """A ``SamPredictor`` for ``backend``, a :class:`SuperpixelRefiner` for ``"superpixels"``, an unfitted
    :class:`SelfTrainedRefiner` for ``"selftrained"``, or None for ``"none"``.

    ``tiny`` is random (seeded); ``vit_b``/``vit_h`` load ``checkpoint`` or, when it is None, fetch the
    manifest's checkpoint into ``cache_dir`` (default ``~/.cache/magseg_nb/sam``).
    """
    if backend not in SAM_BACKENDS:
        raise ValueError(f"unknown SAM backend {backend!r}; use one of {', '.join(SAM_BACKENDS)}")
    if backend == "none":
        return None
    if backend == "superpixels":
        return SuperpixelRefiner()
    if backend == "selftrained":
        return SelfTrainedRefiner(seed=seed)
    import torch
    from segment_anything import SamPredictor, sam_model_registry

    if backend == "tiny":
        sam = build_tiny_sam(seed)
        if checkpoint is not None:
            sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    else:
        if checkpoint is None:
            cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "magseg_nb" / "sam"
            checkpoint = sam_checkpoint(backend, cache)
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(
                f"SAM checkpoint {checkpoint} does not exist; pass checkpoint=None to fetch it from "
                f"{SAM_MANIFEST.name}, or use backend 'tiny' / 'none' on a CPU"
            )
        sam = sam_model_registry[backend](checkpoint=str(checkpoint))
    return SamPredictor(sam.to(_device(device)).eval())


@dataclass(frozen=True)
class SuperpixelRefiner:
    """Refinement from the image alone: SLIC superpixels, each taking the majority class of the coarse
    mask inside it, so class borders snap to the image's colour edges instead of the cell grid.

    It needs no weights (the CPU profiles' real refinement; SAM checkpoints are for GPU runs). Defaults
    were chosen on generated training scenes from an ideal coarse mask (the truth at 16x16 cells per
    128 px tile): mIoU 0.811 -> 0.829 with ~300 segments per tile, compactness 10.
    """

    n_segments: int = 300  # per 128 x 128 px tile; scaled with the tile's area
    compactness: float = 10.0  # SLIC: higher = squarer segments, lower = closer to colour edges

    def refine(self, image: np.ndarray, coarse: np.ndarray, confidence: np.ndarray | None = None):
        """(refined uint8 class ids, probability float32): the coarse labels voted per superpixel,
        weighted by the coarse confidence when given; NODATA stays NODATA."""
        coarse = np.asarray(coarse)
        valid = coarse != NODATA
        if not valid.any():
            return coarse.astype(np.uint8), np.zeros(coarse.shape, np.float32)
        n = max(1, int(round(self.n_segments * coarse.size / 128**2)))
        segments = slic(image[..., :3], n_segments=n, compactness=self.compactness, start_label=1, mask=valid)
        weight = (
            np.ones(coarse.shape) if confidence is None else np.clip(np.asarray(confidence, float), 1e-3, 1)
        )
        votes = np.zeros((segments.max() + 1, len(CLASSES)))
        np.add.at(votes, (segments[valid], coarse[valid].astype(int)), weight[valid])
        share = votes / np.maximum(votes.sum(1, keepdims=True), 1e-9)
        refined = np.where(valid, votes.argmax(1)[segments], NODATA).astype(np.uint8)
        prob = np.where(valid, share.max(1)[segments], 0).astype(np.float32)
        return refined, prob


@dataclass(frozen=True)
class SelfTrainedRefiner:
    """Refinement by a pixel classifier that the model teaches: the baseline's features and classifier
    (:mod:`magseg_nb.pixel_baseline`) fitted to the model's coarse labels of every tile being refined,
    then each pixel's predicted class voted per superpixel (:class:`SuperpixelRefiner`).

    A coarse cell labels all its pixels with its majority class, so the minority pixels of mixed cells are
    mislabelled, most of them near the borders of the coarse regions. Fitted on the pixels at least
    ``margin_px`` inside a region of one coarse class, pooled over all tiles, the classifier learns what each
    class looks like from the pixels the model got right and labels every border pixel by its own look. It
    sees no ground truth: what it knows of the classes comes from the model's answers, so a part that never
    holds a cell's majority (a tree line thinner than half a cell, everywhere) stays as the cells say. Chosen
    on the demo's validation tiles (docs/experiments.md): a margin of 2 px, and one classifier for all tiles
    (one per scene was unstable with few tiles).
    """

    margin_px: int = 2  # training pixels lie at least this far inside a region of one coarse class
    seed: int = 0  # pixel sampling and the classifier's random state
    superpixels: SuperpixelRefiner = SuperpixelRefiner()
    model: object | None = None  # the fitted pixel_baseline.PixelModel (None: not fitted yet)
    fallback: bool = False  # fitted on one class only: refine as SuperpixelRefiner does

    def training_pixels(self, image: np.ndarray, coarse: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of up to ``samples_per_tile`` pixels of one tile well inside its coarse regions."""
        from magseg_nb import geo, pixel_baseline

        coarse = np.asarray(coarse)
        inside = np.zeros(coarse.shape, bool)
        for k in np.unique(coarse[coarse != NODATA]):
            region = coarse == k
            inside |= (
                ndi.binary_erosion(region, iterations=self.margin_px, border_value=1)
                if self.margin_px
                else region
            )
        settings = self.pixel_settings
        idx = pixel_baseline.sample_pixels(
            np.where(inside, coarse, NODATA), geo.valid_pixels(image), settings.samples_per_tile,
            settings.sampling, rng,
        )  # fmt: skip
        feats = pixel_baseline.pixel_features(image, settings)
        return feats.reshape(-1, feats.shape[-1])[idx], coarse.ravel()[idx].astype(np.uint8)

    def fit(self, tiles) -> SelfTrainedRefiner:
        """A fitted copy, from ``tiles``: (image, coarse mask) pairs, the tiles about to be refined."""
        from magseg_nb import pixel_baseline

        rng = np.random.default_rng(self.seed)
        parts = [self.training_pixels(image, coarse, rng) for image, coarse in tiles]
        if not parts:
            raise ValueError(
                "SelfTrainedRefiner.fit got no tiles: it learns from the coarse masks it refines"
            )
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if len(np.unique(y)) < 2:  # nothing to tell apart: the superpixel vote of the coarse mask
            return replace(self, model=None, fallback=True)
        return replace(self, model=pixel_baseline.fit(x, y, self.pixel_settings))

    @property
    def pixel_settings(self):
        """The pixel baseline's settings (its one source of defaults), with this refiner's seed."""
        from magseg_nb import pixel_baseline

        return pixel_baseline.PixelSettings(seed=self.seed)

    @property
    def fitted(self) -> bool:
        return self.model is not None or self.fallback

    def refine(self, image: np.ndarray, coarse: np.ndarray, confidence: np.ndarray | None = None):
        """(refined uint8 class ids, probability float32) as :meth:`SuperpixelRefiner.refine` returns them,
        voting the classifier's pixel labels; NODATA stays NODATA."""
        from magseg_nb import pixel_baseline

        if not self.fitted:
            raise RuntimeError(
                "SelfTrainedRefiner is not fitted: call .fit(tiles) with the tiles to refine first"
            )
        coarse = np.asarray(coarse)
        if self.fallback:
            return self.superpixels.refine(image, coarse, confidence)
        labels = pixel_baseline.predict_tile(self.model, image)
        labels = np.where(coarse == NODATA, NODATA, labels).astype(np.uint8)
        return self.superpixels.refine(image, labels)


def mask_prompt(binary: np.ndarray, predictor) -> np.ndarray:
    """SAM's dense prompt for a binary mask: 1 x M x M logits aligned with the resized, padded input.

    SamPredictor resizes the longest image side to ``img_size`` and pads bottom/right; its low-res
    masks (M = ``prompt_encoder.mask_input_size``) live in that padded frame, so the mask must too.
    """
    import torch

    m = predictor.model.prompt_encoder.mask_input_size[0]
    h, w = predictor.transform.get_preprocess_shape(binary.shape[0], binary.shape[1], m)
    frac = torch.nn.functional.interpolate(
        torch.as_tensor(binary, dtype=torch.float32)[None, None], size=(h, w), mode="area"
    )[0, 0].numpy()
    out = np.full((1, m, m), -LOGIT, np.float32)
    out[0, :h, :w] = (frac * 2 - 1) * LOGIT
    return out


def prompt_points(binary: np.ndarray, n_pos: int, n_neg: int, rng: np.random.Generator):
    """(coords (N,2) x/y, labels (N,)): ``n_pos`` positives at the innermost pixel of the largest
    components (then at random deep inside), ``n_neg`` negatives at random among the pixels farthest
    outside the mask."""
    comps = measure.label(binary, connectivity=1)
    coords, labels = [], []
    if comps.max():
        dist = ndi.distance_transform_edt(binary)
        areas = np.bincount(comps.ravel())[1:]
        for k in np.argsort(-areas)[:n_pos] + 1:
            flat = np.argmax(np.where(comps == k, dist, -1))
            r, c = np.unravel_index(flat, binary.shape)
            coords.append((c, r))
            labels.append(1)
        # Fewer parts than points: the rest go to random pixels deep inside the mask.
        deep = np.flatnonzero(dist >= np.quantile(dist[binary], 0.5))
        extra = min(n_pos - len(coords), deep.size)
        for flat in rng.choice(deep, size=max(0, extra), replace=False):
            r, c = np.unravel_index(flat, binary.shape)
            coords.append((c, r))
            labels.append(1)
    outside = ~binary
    if n_neg and outside.any():
        dist_out = ndi.distance_transform_edt(outside)
        far = np.flatnonzero(dist_out >= np.quantile(dist_out[outside], 0.5))
        for flat in rng.choice(far, size=min(n_neg, far.size), replace=False):
            r, c = np.unravel_index(flat, binary.shape)
            coords.append((c, r))
            labels.append(0)
    return np.asarray(coords, np.float32).reshape(-1, 2), np.asarray(labels, np.int64)


def _sam_logits(predictor, binary, points, labels, box, iterations: int) -> np.ndarray:
    """Full-resolution logits after ``iterations`` rounds, each fed the previous low-res logits."""
    mask_input = mask_prompt(binary, predictor)
    logits = None
    for _ in range(max(1, iterations)):
        masks, _, low_res = predictor.predict(
            point_coords=points if len(points) else None,
            point_labels=labels if len(points) else None,
            box=box,
            mask_input=mask_input,
            multimask_output=False,
            return_logits=True,
        )
        logits, mask_input = masks[0], low_res
    return np.asarray(logits, np.float32)


def class_logits(
    predictor,
    binary: np.ndarray,
    iterations: int = 2,
    n_pos: int = 3,
    n_neg: int = 3,
    use_boxes: bool = False,
    max_boxes: int = 16,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """SAM's logits for one class (image already set). With boxes: one prediction per connected
    component (largest ``max_boxes``), united by max; other components keep their coarse pixels."""
    rng = rng or np.random.default_rng(0)
    if not use_boxes:
        points, labels = prompt_points(binary, n_pos, n_neg, rng)
        return _sam_logits(predictor, binary, points, labels, None, iterations)
    comps = measure.label(binary, connectivity=1)
    props = sorted(measure.regionprops(comps), key=lambda p: -p.area)
    out = np.full(binary.shape, -LOGIT, np.float32)
    prompted = np.zeros_like(binary)
    for prop in props[:max_boxes]:
        comp = comps == prop.label
        r0, c0, r1, c1 = prop.bbox
        points, labels = prompt_points(comp, 1, n_neg, rng)
        box = np.array([c0, r0, c1 - 1, r1 - 1], np.float32)
        out = np.maximum(out, _sam_logits(predictor, comp, points, labels, box, iterations))
        prompted |= comp
    # Components that got no prompt of their own stay as they were in the coarse mask.
    rest = binary & ~prompted
    return np.where(rest, np.maximum(out, LOGIT), out)


def sam_refine(
    image: np.ndarray,
    coarse: np.ndarray,
    predictor,
    classes=(FIELD, CLASS_IDS["tree"], CLASS_IDS["water"]),
    iterations: int = 2,
    n_pos: int = 3,
    n_neg: int = 3,
    use_boxes: bool = False,
    max_boxes: int = 16,
    min_iou: float = 0.0,
    seed: int = 0,
    return_prob: bool = False,
):
    """Refine a coarse (H,W) class mask with SAM; returns (H,W) uint8 (and the winner's probability).

    Each class in ``classes`` gets SAM logits from its own prompts; a pixel takes the class with the
    highest logit when that logit is > 0, else ``others``. Classes not in ``classes`` keep their coarse
    pixels; NODATA stays NODATA. ``min_iou`` > 0 keeps a class's coarse pixels when SAM's answer
    overlaps them less than that (a guard against a prompt SAM misread). ``predictor=None`` returns
    the coarse mask unchanged (probability 1).
    """
    coarse = np.asarray(coarse)
    if image.shape[:2] != coarse.shape:
        raise ValueError(f"image {image.shape[:2]} and coarse mask {coarse.shape} differ in size")
    if predictor is None:
        out = coarse.astype(np.uint8)
        return (out, np.ones(coarse.shape, np.float32)) if return_prob else out
    rng = np.random.default_rng(seed)
    valid = coarse != NODATA
    stack = np.full((len(CLASSES),) + coarse.shape, -LOGIT, np.float32)
    stack[0] = 0.0  # "others" wins wherever no class logit is positive
    predictor.set_image(np.ascontiguousarray(image[..., :3], dtype=np.uint8))
    for cid in range(1, len(CLASSES)):
        binary = (coarse == cid) & valid
        if cid not in classes:
            stack[cid] = np.where(binary, 2 * LOGIT, -2 * LOGIT)  # kept as is
            continue
        if not binary.any():
            continue
        logits = class_logits(predictor, binary, iterations, n_pos, n_neg, use_boxes, max_boxes, rng)
        refined = logits > 0
        iou = (refined & binary).sum() / max(1, (refined | binary).sum())
        stack[cid] = logits if iou >= min_iou else np.where(binary, LOGIT, -LOGIT)
    out = np.argmax(stack, axis=0).astype(np.uint8)
    out[~valid] = NODATA
    if not return_prob:
        return out
    best = stack[1:].max(axis=0)
    prob = 1 / (1 + np.exp(-np.clip(best, -30, 30)))
    prob = np.where(out == 0, 1 - prob, prob).astype(np.float32)
    prob[~valid] = 0.0
    return out, prob


@dataclass
class SamSettings:
    """The SAM prompt settings of notebook 05 (``sam_refine``'s keywords); defaults = the demo profile."""

    iterations: int = 2  # rounds feeding SAM's low-res logits back as the mask prompt
    n_pos: int = 3  # positive points per class
    n_neg: int = 3  # negative points per class
    use_boxes: bool = False  # also one box prompt per connected part of a class
    min_iou: float = 0.0  # keep a class's coarse pixels when SAM's answer overlaps them less than this
    seed: int = 0  # negative prompt points

    # notebook parameter -> field
    NOTEBOOK = {
        "sam_iterations": "iterations",
        "sam_points": "n_pos",
        "sam_negative_points": "n_neg",
        "sam_boxes": "use_boxes",
        "sam_min_iou": "min_iou",
        "seed": "seed",
    }

    @classmethod
    def from_params(cls, params: dict) -> SamSettings:
        """From notebook 05's parameters (names in ``NOTEBOOK``); absent ones keep their default."""
        return cls(**{field: params[name] for name, field in cls.NOTEBOOK.items() if name in params})

    def kwargs(self) -> dict:
        return asdict(self)
