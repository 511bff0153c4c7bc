"""Field instances from a class mask, and their polygons.

- ``vote_segments`` (notebook 05's default) keeps the image segments of the classical watershed
  baseline (notebook 01, :mod:`magseg_nb.baseline`) that the predicted mask calls field: the model
  decides which segments are fields, the image where they end.
- ``field_instances`` splits the field class into fields with a boundary-aware watershed inside the
  mask; the gradient-watershed recipe (``image_gradient``, ``quantise_relief``, ``basin_markers``) is
  shared with the baseline.
- ``polygonize`` turns instance rasters into polygons with attributes, in the source CRS;
  ``scene_fields`` does both for one scene's refined mask; ``write_fields`` / ``read_mask`` are the
  files notebook 05 writes and reads.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from rasterio.features import shapes
from scipy import ndimage as ndi
from skimage import filters, measure, morphology, segmentation

from magseg_nb import files, layout
from magseg_nb.labels import CLASS_IDS, CLASSES, NODATA

FIELD = CLASS_IDS["field"]
MARKERS = ("edges", "distance", "confidence")  # field_instances
SPLITTERS = ("segments",) + MARKERS  # FieldSettings.markers: "segments" = vote_segments
FIELD_COLUMNS = ["class", "area_m2", "scene_id", "tile_id", "confidence", "instance_id"]


# --- field instances ------------------------------------------------------------------------------


# The gradient-watershed recipe, shared with the classical baseline (magseg_nb.baseline): smoothed
# colour gradient, relief quantised to uint16, one marker per basin deeper than h (h-minima).
LEVELS = 4000  # relief span in uint16 levels: skimage's reconstruction is several times faster on integers


def image_gradient(image: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Colour gradient of an RGB uint8 image: Gaussian smoothing (suppresses crop rows and noise),
    Sobel per band, the strongest band (unscaled)."""
    smooth = filters.gaussian(image[..., :3].astype(np.float32) / 255.0, sigma=sigma, channel_axis=-1)
    return np.max([filters.sobel(smooth[..., c]) for c in range(3)], axis=0)


def quantise_relief(relief: np.ndarray, lo: float, span: float) -> np.ndarray:
    """``(relief - lo) / span`` as uint16 levels 0..LEVELS (clipped to the uint16 range)."""
    return np.clip((relief - lo) / span * LEVELS, 0, 65535).astype(np.uint16)


def basin_markers(levels: np.ndarray, h_rel: float, mask: np.ndarray, connectivity: int) -> np.ndarray:
    """One marker per basin of ``levels`` deeper than ``h_rel`` of the quantised span, inside ``mask``."""
    return measure.label(
        morphology.h_minima(levels, max(1, int(h_rel * LEVELS))) & mask, connectivity=connectivity
    )


def image_edges(image: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Colour gradient of an RGB image in [0, 1] (``image_gradient`` scaled by its 99th percentile:
    field borders are edges)."""
    edges = image_gradient(image, sigma)
    top = np.quantile(edges, 0.99) if edges.size else 0.0
    return np.clip(edges / top, 0, 1).astype(np.float32) if top > 0 else np.zeros_like(edges)


def vote_segments(
    field_mask: np.ndarray, segments: np.ndarray, min_share: float = 0.5, min_area_px: int = 0
) -> np.ndarray:
    """Field instances (H,W) int32: the segments (int labels, 0 = none) whose pixels are at least
    ``min_share`` field in ``field_mask``, kept whole; smaller than ``min_area_px`` dropped; ids
    consecutive in segment order."""
    mask, segments = np.asarray(field_mask, bool), np.asarray(segments)
    if segments.shape != mask.shape:
        raise ValueError(f"segments have shape {segments.shape}, the field mask {mask.shape}")
    if segments.min(initial=0) < 0:
        raise ValueError("segments must be labels >= 0 (0 = no segment)")
    size = np.bincount(segments.ravel())
    share = np.bincount(segments.ravel(), weights=mask.ravel()) / np.maximum(size, 1)
    keep = (share >= min_share) & (size >= max(min_area_px, 1))
    keep[0] = False
    labels = np.where(keep[segments], segments, 0)
    return segmentation.relabel_sequential(labels)[0].astype(np.int32)


def vote_predicted(semantic: np.ndarray, segments: np.ndarray, min_area_px: int = 0) -> np.ndarray:
    """``vote_segments`` of a class mask's field class, within its predicted (non-NODATA) pixels."""
    semantic = np.asarray(semantic)
    inside = np.where(semantic != NODATA, segments, 0)
    return vote_segments(semantic == FIELD, inside, min_area_px=min_area_px)


def read_segments(run01, scene_id: str) -> np.ndarray:
    """Notebook 01's watershed segments of a scene, with a clear error when they are missing."""
    path = layout.baseline_instances(run01, scene_id)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run the watershed baseline (rerun notebook 01_dataset_prep), "
            "whose segments watershed_markers='segments' votes"
        )
    return read_mask(path)[0]


def field_instances(
    field_mask: np.ndarray,
    boundary_prob: np.ndarray | None = None,
    min_area_px: int = 16,
    markers: str = "distance",
    confidence: np.ndarray | None = None,
    h_px: float = 2.0,
    interior_threshold: float = 0.5,
    h_edges: float = 0.05,
    boundary_weight: float = 1.0,
    max_hole_px: int = 64,
    edges: np.ndarray | None = None,
    edge_weight: float = 0.5,
) -> np.ndarray:
    """Split a boolean field mask into field instances (H,W) int32, 0 = no field, 1..n = fields.

    Boundary-aware watershed inside the mask. Pixels where ``boundary_prob`` >= 0.5 (a boundary class,
    when the data has one) are cut out before seeding, and ``boundary_weight * boundary_prob`` is added
    to the relief. Markers:

    - ``"edges"``: the relief is the image gradient ``edges`` (e.g. ``image_edges``): one marker per
      gradient basin deeper than ``h_edges`` (the classical recipe, but inside the predicted fields);
    - ``"distance"``: the relief is minus the normalised distance to the mask's edge (plus
      ``edge_weight * edges`` when given); markers are distance peaks at least ``h_px`` px above
      their saddle, so a neck between two blobs splits them;
    - ``"confidence"``: markers are regions where ``confidence`` >= ``interior_threshold``.

    Every connected part of the mask gets at least one marker. Holes up to ``max_hole_px`` are filled
    first; fields smaller than ``min_area_px`` are dropped; ids are consecutive.
    """
    mask = np.asarray(field_mask, bool)
    if markers not in MARKERS:
        raise ValueError(f"markers must be one of {MARKERS}, got {markers!r}")
    if markers == "confidence" and confidence is None:
        raise ValueError("markers='confidence' needs a confidence map (H,W) in [0,1]")
    if markers == "edges" and edges is None:
        raise ValueError("markers='edges' needs an edge map (H,W) in [0,1], e.g. image_edges(image)")
    for name, arr in (("boundary_prob", boundary_prob), ("confidence", confidence), ("edges", edges)):
        if arr is not None and np.shape(arr) != mask.shape:
            raise ValueError(f"{name} has shape {np.shape(arr)}, the field mask {mask.shape}")
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    if max_hole_px:
        mask = morphology.remove_small_holes(mask, max_size=max_hole_px)
    interior = mask if boundary_prob is None else mask & (np.asarray(boundary_prob) < 0.5)
    dist = ndi.distance_transform_edt(interior)
    if markers == "edges":
        relief = np.asarray(edges, np.float32).copy()
    else:
        relief = -dist / max(dist.max(), 1.0)
        if edges is not None:
            relief = relief + edge_weight * np.asarray(edges, np.float32)
    if boundary_prob is not None:
        relief = relief + boundary_weight * np.asarray(boundary_prob, np.float32)
    if markers == "edges":
        relief = quantise_relief(relief, float(relief.min()), float(np.ptp(relief)) or 1.0)
        seeds = basin_markers(relief, h_edges, interior, connectivity=2)
    elif markers == "distance":
        # h-maxima: one marker per plateau of the distance transform standing h_px above its saddle,
        # so a rectangle's ridge is one marker and a neck splits two fields.
        seeds = measure.label(morphology.h_maxima(dist, h_px) > 0, connectivity=2)
    else:
        seeds = measure.label(interior & (np.asarray(confidence) >= interior_threshold), connectivity=1)
    seeds[~interior] = 0
    for prop in measure.regionprops(measure.label(interior, connectivity=1)):
        if not seeds[prop.slice][prop.image].any():  # no marker of its own: its innermost pixel
            rr, cc = np.nonzero(prop.image)
            k = np.argmax(dist[prop.slice][prop.image])
            seeds[prop.bbox[0] + rr[k], prop.bbox[1] + cc[k]] = seeds.max() + 1
    labels = segmentation.watershed(relief, seeds, mask=mask)
    small = np.bincount(labels.ravel()) < min_area_px
    small[0] = False
    labels[small[labels]] = 0
    labels, _, _ = segmentation.relabel_sequential(labels)
    return labels.astype(np.int32)


# --- polygons -------------------------------------------------------------------------------------


def _area_m2(gdf: gpd.GeoDataFrame) -> np.ndarray:
    if gdf.empty:
        return np.zeros(0)
    crs = gdf.crs
    if crs is None:
        raise ValueError("polygons have no CRS; pass the source raster's CRS")
    if crs.is_geographic:
        return gdf.to_crs(gdf.estimate_utm_crs()).area.to_numpy()
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return gdf.area.to_numpy() * factor**2


def empty_fields(crs) -> gpd.GeoDataFrame:
    """A fields table with the agreed columns and no rows (a scene without fields)."""
    cols = {
        "class": pd.Series(dtype=str),
        "area_m2": pd.Series(dtype=float),
        "scene_id": pd.Series(dtype=str),
        "tile_id": pd.Series(dtype=str),
        "confidence": pd.Series(dtype=float),
        "instance_id": pd.Series(dtype="int64"),
    }
    return gpd.GeoDataFrame(cols, geometry=gpd.GeoSeries([], crs=crs))


def _tile_of(rows: np.ndarray, cols: np.ndarray, tiles: pd.DataFrame) -> list[str]:
    """The first tile (tiles.csv window columns) holding each pixel, '' when none does."""
    r0, c0 = tiles.row_off.to_numpy(), tiles.col_off.to_numpy()
    r, c = np.asarray(rows)[:, None], np.asarray(cols)[:, None]
    inside = (r0 <= r) & (r < r0 + tiles.height.to_numpy()) & (c0 <= c) & (c < c0 + tiles.width.to_numpy())
    ids = tiles.tile_id.astype(str).to_numpy()
    return [ids[k] if hit else "" for k, hit in zip(inside.argmax(axis=1), inside.any(axis=1), strict=True)]


def polygonize(
    instances: np.ndarray,
    semantic: np.ndarray,
    transform,
    crs,
    attrs: dict | None = None,
    confidence: np.ndarray | None = None,
    tiles: pd.DataFrame | None = None,
    simplify_tolerance: float = 0.0,
) -> gpd.GeoDataFrame:
    """One valid (multi)polygon per instance id > 0, in ``crs``, with the columns class (the majority
    class name under the instance), area_m2, scene_id, tile_id (the tile of ``tiles`` holding the
    polygon's representative point), confidence (mean of ``confidence`` over the instance, NaN
    without one), instance_id, plus any constants in ``attrs``. ``simplify_tolerance`` is in CRS
    units (topology-preserving)."""
    instances = np.asarray(instances)
    if instances.shape != np.shape(semantic):
        raise ValueError(f"instances {instances.shape} and semantic {np.shape(semantic)} differ in size")
    attrs = dict(attrs or {})
    ids = np.unique(instances[instances > 0])
    if ids.size == 0:
        gdf = empty_fields(crs)
        for key, value in attrs.items():
            if key not in gdf:
                gdf[key] = pd.Series(dtype=type(value))
        return gdf
    polys: dict[int, list] = {}
    for geom, value in shapes(instances.astype(np.int32), mask=instances > 0, transform=transform):
        polys.setdefault(int(value), []).append(shapely.geometry.shape(geom))
    geoms = [shapely.union_all(polys[int(i)]) for i in ids]
    geoms = shapely.make_valid(shapely.simplify(geoms, simplify_tolerance, preserve_topology=True))
    # make_valid may return a collection with stray lines; keep the polygonal part only.
    geoms = [shapely.union_all([g for g in shapely.get_parts(geom) if g.area > 0]) for geom in geoms]
    sem = np.asarray(semantic).astype(np.int64)
    counts = ndi.labeled_comprehension(
        sem, instances, ids, lambda v: np.bincount(v[v != NODATA], minlength=len(CLASSES)).argmax(), int, 0
    )
    conf = (
        ndi.mean(np.asarray(confidence, np.float64), instances, ids)
        if confidence is not None
        else np.full(ids.size, np.nan)
    )
    gdf = gpd.GeoDataFrame(
        {
            "class": [CLASSES[int(k)] for k in counts],
            "confidence": np.asarray(conf, float),
            "instance_id": ids.astype(np.int64),
        },
        geometry=gpd.GeoSeries(geoms, crs=crs),
    )
    gdf = gdf[~gdf.geometry.is_empty].reset_index(drop=True)
    gdf["area_m2"] = _area_m2(gdf)
    gdf["scene_id"] = str(attrs.pop("scene_id", ""))
    if tiles is not None and len(gdf):
        pts = gdf.geometry.representative_point()
        rows, cols = rasterio.transform.rowcol(transform, pts.x.to_numpy(), pts.y.to_numpy())
        gdf["tile_id"] = _tile_of(np.asarray(rows), np.asarray(cols), tiles)
    else:
        gdf["tile_id"] = str(attrs.pop("tile_id", ""))
    for key, value in attrs.items():
        gdf[key] = value
    extra = [c for c in gdf.columns if c not in FIELD_COLUMNS and c != "geometry"]
    return gdf[FIELD_COLUMNS + extra + ["geometry"]]


def write_fields(gdf: gpd.GeoDataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``fields.gpkg`` (layer "fields") and ``fields.parquet`` atomically (temp name + rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"gpkg": out_dir / layout.FIELDS_GPKG, "parquet": out_dir / layout.FIELDS_PARQUET}
    with files.atomic(paths["gpkg"]) as tmp:
        gdf.to_file(tmp, layer="fields", driver="GPKG")
    with files.atomic(paths["parquet"]) as tmp:
        gdf.to_parquet(tmp)
    return paths


def read_mask(path: str | os.PathLike):
    """(array, crs, transform) of band 1 of a GeoTIFF, with a clear error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run notebook 05 (inference) for this variant first")
    with rasterio.open(path) as src:
        return src.read(1), src.crs, src.transform


def scene_fields(
    refined: np.ndarray,
    transform,
    crs,
    scene_id: str,
    confidence: np.ndarray | None = None,
    tiles: pd.DataFrame | None = None,
    image: np.ndarray | None = None,
    boundary_prob: np.ndarray | None = None,
    min_area_px: int = 16,
    simplify_tolerance: float = 0.0,
    segments: np.ndarray | None = None,
    **watershed,
) -> tuple[np.ndarray, gpd.GeoDataFrame]:
    """Field instances and their polygons for one scene's refined class mask: ``markers="segments"``
    votes ``segments`` (``vote_segments``); otherwise a watershed inside the mask, its markers from the
    image's edges when ``image`` is given, else from the distance transform."""
    if watershed.get("markers") == "segments":
        if segments is None:
            raise ValueError("markers='segments' needs the image segments (notebook 01's watershed baseline)")
        inst = vote_predicted(refined, segments, min_area_px=min_area_px)
    else:
        edges = image_edges(image) if image is not None else None
        if edges is None and watershed.get("markers") == "edges":
            watershed["markers"] = "distance"  # no image to take edges from
        watershed.setdefault("markers", "edges" if edges is not None else "distance")
        inst = field_instances(
            refined == FIELD,
            boundary_prob=boundary_prob,
            min_area_px=min_area_px,
            confidence=confidence,
            edges=edges,
            **watershed,
        )
    gdf = polygonize(
        inst,
        refined,
        transform,
        crs,
        attrs={"scene_id": scene_id},
        confidence=confidence,
        tiles=tiles,
        simplify_tolerance=simplify_tolerance,
    )
    return inst, gdf


@dataclass
class FieldSettings:
    """Field instances and polygons of notebook 05 (``scene_fields`` / ``inference.polygonize_saved``
    keywords); defaults = the demo profile."""

    min_area_px: int = 150  # fields smaller than this are dropped (the watershed baseline's min_area_px)
    # "segments": the watershed baseline's segments voted by the mask (vote_segments); "edges",
    # "distance" or "confidence": a watershed inside the mask (field_instances)
    markers: str = "segments"
    h_edges: float = 0.05  # "edges": a basin must be this deep (share of the 99th-percentile gradient)
    h_px: float = 2.0  # "distance": a peak must stand this many px above its saddle
    max_hole_px: int = 64  # holes up to this size inside fields are filled
    use_image_edges: bool = True  # take the scene image's gradient (needed by "edges")
    simplify_tolerance: float = 0.0  # polygon simplification in CRS units (m)

    # notebook parameter -> field
    NOTEBOOK = {
        "min_field_px": "min_area_px",
        "watershed_markers": "markers",
        "watershed_h_edges": "h_edges",
        "watershed_h_px": "h_px",
        "max_hole_px": "max_hole_px",
        "use_image_edges": "use_image_edges",
        "simplify_m": "simplify_tolerance",
    }

    def __post_init__(self):
        if self.markers not in SPLITTERS:
            raise ValueError(f"watershed_markers must be one of {SPLITTERS}, got {self.markers!r}")

    @classmethod
    def from_params(cls, params: dict) -> FieldSettings:
        """From notebook 05's parameters (names in ``NOTEBOOK``); absent ones keep their default."""
        return cls(**{field: params[name] for name, field in cls.NOTEBOOK.items() if name in params})

    def kwargs(self) -> dict:
        return asdict(self)
