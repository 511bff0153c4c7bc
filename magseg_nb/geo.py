"""Raster and vector I/O, masks from polygons, windowed tiling and the spatial split.

One code path serves generated and downloaded data: ``prepare_scene`` takes any raster + polygon file,
checks them, and writes the scene's semantic / boundary / instance masks; ``scan_tiles``,
``spatial_split`` and ``write_tiles`` cut scenes into tiles with rasterio windows.

Rules for bad input (each tested):

- a raster that cannot be opened or read (corrupt, truncated, not a GeoTIFF): ``GeoDataError`` naming
  the file and saying to re-download or regenerate it;
- a raster without a CRS: ``GeoDataError`` naming the file and how to assign one;
- labels in another CRS than the raster: reprojected to the raster's CRS, with a ``UserWarning`` and
  ``report["reprojected_from"]``; labels without a CRS: ``GeoDataError``;
- a label file with no features, or none inside the raster: ``GeoDataError``;
- overlapping polygons: polygons are drawn largest first, so where they overlap **the smaller polygon
  wins** (a tree inside a field, a field inside a farm block); overlapping pairs and pixels are counted
  in the report;
- nodata pixels of the raster: semantic 255, boundary 0, instance 0; tiles that are all nodata are
  skipped and counted.
"""

from __future__ import annotations

import multiprocessing
import shutil
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import rasterio.features
import shapely
from rasterio.errors import RasterioError
from rasterio.windows import Window

from magseg_nb import files, layout
from magseg_nb.labels import CLASS_IDS, CLASSES, NODATA

# Text classes in label files that are background ("others") in the masks.
BACKGROUND_CLASSES = ("road", "building", "bund", "bare")
SPLITS = ("train", "val", "test")


class GeoDataError(ValueError):
    """Input data that cannot be used; the message names the file and the fix."""


# --- writing ------------------------------------------------------------------------------------------


def geotiff_profile(shape, dtype, crs, transform, nodata=None) -> dict:
    """The creation options of every GeoTIFF written here, for a (bands, H, W) ``shape``."""
    count, height, width = shape
    dtype = np.dtype(dtype)
    profile = {
        "driver": "GTiff", "height": height, "width": width, "count": count, "dtype": dtype.name,
        "crs": crs, "transform": transform, "nodata": nodata, "compress": "deflate",
    }  # fmt: skip
    if height >= 256 and width >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if count == 3 and dtype == np.uint8:
        profile["photometric"] = "RGB"
    return profile


def _write_profiled(path: Path, array: np.ndarray, profile: dict) -> Path:
    """Write ``array`` (bands, H, W) with ``profile`` atomically (tmp + rename)."""
    with files.atomic(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(array.astype(profile["dtype"], copy=False))
    return path


def write_geotiff(path, array, crs, transform, nodata=None, dtype=None) -> Path:
    """Write (bands, H, W) or (H, W) ``array`` as a tiled, deflated GeoTIFF, atomically (tmp + rename)."""
    path = Path(path)
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected (bands, H, W) or (H, W), got shape {array.shape}")
    profile = geotiff_profile(array.shape, dtype or array.dtype, crs, transform, nodata)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_profiled(path, array, profile)


def write_vector(gdf: gpd.GeoDataFrame, path, layer: str = "labels") -> Path:
    """Write a GeoPackage layer atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic(path) as tmp:
        gdf.to_file(tmp, layer=layer, driver="GPKG")
    return path


def write_csv(df: pd.DataFrame, path) -> Path:
    """Write a CSV atomically (no index)."""
    path = Path(path)
    with files.atomic(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


# --- reading and checking -----------------------------------------------------------------------------


def open_raster(path) -> rasterio.DatasetReader:
    """Open a raster for reading, with errors that name the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"raster {path} does not exist")
    try:
        src = rasterio.open(path)
    except RasterioError as err:
        raise GeoDataError(
            f"cannot open raster {path}: it is corrupt or not a GeoTIFF ({err}). "
            "Fix: re-download it (the manifest's sha256 check catches a bad download) or regenerate it."
        ) from err
    if src.crs is None:
        src.close()
        raise GeoDataError(
            f"raster {path} has no CRS, so its pixels cannot be matched to label polygons. Fix: assign "
            f"the right one, e.g. `rio edit-info --crs EPSG:32648 {path}` (or gdal_edit.py -a_srs)."
        )
    return src


def _read(src, path, **kw) -> np.ndarray:
    try:
        return src.read(**kw)
    except RasterioError as err:
        raise GeoDataError(
            f"raster {path} is truncated or corrupt; reading failed ({err}). "
            "Fix: re-download it or regenerate it."
        ) from err


def read_labels(
    labels_path, crs, layer: str | None = None, class_field: str = "class", class_map: dict | None = None
) -> tuple[gpd.GeoDataFrame, dict]:
    """Read label polygons as columns ``class`` (text), ``class_id``, ``field_id``, geometry, in ``crs``.

    ``class_map`` maps the file's values of ``class_field`` to our classes (``field``, ``tree``,
    ``water``, ``others``, or ``road``/``building``, which count as others, or ``nodata``: unlabelled,
    NODATA in the masks). Returns (labels, notes).
    """
    labels_path = Path(labels_path)
    if not labels_path.exists():
        raise FileNotFoundError(f"label file {labels_path} does not exist")
    try:
        gdf = gpd.read_file(labels_path, layer=layer)
    except Exception as err:  # pyogrio raises several types for unreadable files
        raise GeoDataError(f"cannot read label file {labels_path} (layer={layer!r}): {err}") from err
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if gdf.empty:
        raise GeoDataError(
            f"label file {labels_path} (layer={layer!r}) has no features. Fix: check that it is the "
            "right file and layer (list layers with `pyogrio.list_layers(path)`)."
        )
    if class_field not in gdf.columns:
        raise GeoDataError(
            f"label file {labels_path} has no column {class_field!r}; columns are {list(gdf.columns)}. "
            "Fix: pass class_field=<the column holding the class>."
        )
    if gdf.crs is None:
        raise GeoDataError(
            f"label file {labels_path} has no CRS. Fix: set it, e.g. `ogr2ogr -a_srs EPSG:4326 out.gpkg "
            f"{labels_path.name}` or gdf.set_crs(...)."
        )
    # Points and lines are not areas: dropped and counted. Invalid polygons (self-intersections, common in
    # hand-digitised labels) are repaired with make_valid, keeping their polygonal part, and counted.
    polygonal = gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
    invalid = polygonal & ~gdf.geometry.is_valid
    if invalid.any():
        gdf = gdf.copy()
        gdf.loc[invalid, gdf.geometry.name] = shapely.buffer(
            shapely.make_valid(gdf.geometry[invalid].values), 0
        )
    notes = {"reprojected_from": None, "n_non_polygons_dropped": int((~polygonal).sum()),
             "n_invalid_repaired": int(invalid.sum())}  # fmt: skip
    gdf = gdf[polygonal & ~gdf.geometry.is_empty]
    if gdf.empty:
        raise GeoDataError(
            f"label file {labels_path} has no polygons (only points or lines); labels must be areas"
        )
    target = rasterio.crs.CRS.from_user_input(crs)
    if rasterio.crs.CRS.from_user_input(gdf.crs) != target:
        notes["reprojected_from"] = gdf.crs.to_string()
        warnings.warn(
            f"{labels_path}: labels are in {gdf.crs.to_string()}, the raster in {target.to_string()}; "
            "reprojected the labels to the raster's CRS",
            UserWarning,
            stacklevel=2,
        )
        gdf = gdf.to_crs(target.to_wkt())
    raw = gdf[class_field].astype(str)
    mapping = {str(k): str(v) for k, v in (class_map or {}).items()}
    names = raw.map(lambda v: mapping.get(v, v))
    known = set(CLASSES) | set(BACKGROUND_CLASSES) | {"nodata"}
    unknown = sorted(set(names) - known)
    if unknown:
        raise GeoDataError(
            f"label file {labels_path}: values {unknown[:10]} of column {class_field!r} are not classes "
            f"({', '.join(sorted(known))}). Fix: pass class_map={{value: class}} for them."
        )
    ids = names.map(lambda v: NODATA if v == "nodata" else CLASS_IDS.get(v, CLASS_IDS["others"])).astype(
        np.uint8
    )
    out = gpd.GeoDataFrame(
        {"class": names.values, "class_id": ids.values}, geometry=gdf.geometry.values, crs=gdf.crs
    )
    is_field = out["class_id"] == CLASS_IDS["field"]
    field_id = (
        pd.to_numeric(gdf["field_id"], errors="coerce").fillna(0)
        if "field_id" in gdf
        else pd.Series(0, gdf.index)
    )
    field_id = field_id.astype(np.int64).values * is_field.values
    missing = is_field.values & (field_id <= 0)
    field_id[missing] = field_id.max() + 1 + np.arange(missing.sum())  # fields without an id get new ones
    out["field_id"] = field_id.astype(np.int32)
    return out, notes


@dataclass
class Masks:
    semantic: np.ndarray  # (H, W) uint8 class ids, NODATA outside valid pixels
    boundary: np.ndarray  # (H, W) uint8 0/1, field edge pixels
    instances: np.ndarray  # (H, W) int32 field ids
    report: dict


def inner_boundaries(instances: np.ndarray) -> np.ndarray:
    """uint8 0/1: field pixels (> 0) with a 4-neighbour of another id; the image edge is no boundary.

    The same as ``skimage.segmentation.find_boundaries(instances, connectivity=1, mode="inner") &
    (instances > 0)`` (tested), by shifted comparisons instead of two grey-morphology passes.
    """
    out = np.zeros(instances.shape, bool)
    vertical = instances[1:] != instances[:-1]
    out[1:] |= vertical
    out[:-1] |= vertical
    horizontal = instances[:, 1:] != instances[:, :-1]
    out[:, 1:] |= horizontal
    out[:, :-1] |= horizontal
    return (out & (instances > 0)).astype(np.uint8)


def rasterize_labels(
    labels: gpd.GeoDataFrame, shape, transform, valid: np.ndarray | None = None, presence_only: bool = False
) -> Masks:
    """Semantic, boundary and instance masks from ``read_labels`` output (smaller polygons win overlaps).

    ``valid`` marks the raster's data pixels (others become NODATA); ``presence_only`` means only
    some classes were labelled, so pixels outside every polygon are NODATA instead of ``others``.
    """
    geoms = np.asarray(labels.geometry.values, dtype=object)
    order = np.argsort(-shapely.area(geoms), kind="stable")  # largest first, ties in file order
    # One pass burns each pixel's top polygon (1-based position in ``order``); classes and ids follow.
    # rasterio takes shapely geometries as they are: a GeoJSON round trip cost more than the burn itself.
    top = rasterio.features.rasterize(
        zip(geoms[order], range(1, len(order) + 1), strict=True), out_shape=shape, transform=transform,
        fill=0, dtype="int32",
    )  # fmt: skip
    fill = NODATA if presence_only else CLASS_IDS["others"]
    class_ids = labels["class_id"].to_numpy()[order]
    class_lut = np.concatenate([[fill], class_ids]).astype(np.uint8)
    is_field = class_ids == CLASS_IDS["field"]
    field_ids = np.where(is_field, labels["field_id"].to_numpy()[order], 0)
    id_lut = np.concatenate([[0], field_ids]).astype(np.int32)
    semantic, instances = class_lut[top], id_lut[top]
    if valid is not None:
        semantic[~valid] = NODATA
        instances[~valid] = 0
    boundary = inner_boundaries(instances)
    # Bounding-box pairs, then one DE-9IM test: only pairs whose interiors meet can overlap (neighbours
    # sharing an edge do not). A tree query with predicate="intersects" first cost more than it saved.
    pairs = shapely.STRtree(geoms).query(geoms)
    pairs = pairs[:, pairs[0] < pairs[1]]
    a, b = geoms[pairs[0]], geoms[pairs[1]]
    inner = shapely.relate_pattern(a, b, "T********")
    inter = shapely.area(shapely.intersection(a[inner], b[inner]))
    overlap_px = 0
    if inner.any():  # count pixels covered twice, burning only the polygons involved
        involved = np.unique(pairs[:, inner])
        coverage = rasterio.features.rasterize(
            ((g, 1) for g in geoms[involved]), out_shape=shape, transform=transform, fill=0,
            dtype="uint8", merge_alg=rasterio.enums.MergeAlg.add,
        )  # fmt: skip
        overlap_px = int((coverage > 1).sum())
    pix_area = abs(transform.a * transform.e)
    n_valid = int((semantic != NODATA).sum())
    report = {
        "n_polygons": len(labels),
        "n_fields": int(np.unique(instances[instances > 0]).size),
        "n_overlap_pairs": int((inter > 0.01 * pix_area).sum()),
        "overlap_px": overlap_px,
        "nodata_frac": round(1 - n_valid / semantic.size, 6),
    }
    for cid, name in enumerate(CLASSES):
        report[f"frac_{name}"] = round(float((semantic == cid).sum()) / max(n_valid, 1), 6)
    return Masks(semantic, boundary, instances, report)


def percentile_stretch(array: np.ndarray, valid: np.ndarray, low: float = 2, high: float = 98) -> np.ndarray:
    """(bands, H, W) of any dtype -> (3, H, W) uint8: each band's ``low``-``high`` percentile range over
    ``valid`` mapped linearly onto 1..255 (clipped); 0 where not valid."""
    out = np.zeros((3, *array.shape[1:]), np.uint8)
    for b in range(3):
        lo, hi = np.percentile(array[b][valid], [low, high]) if valid.any() else (0, 1)
        out[b] = np.clip(1 + 254 * (array[b].astype(np.float32) - lo) / max(hi - lo, 1e-6), 1, 255)
    out[:, ~valid] = 0
    return out


def valid_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels with any non-zero band (notebook 01's images use 0 in every band as nodata)."""
    return np.asarray(image)[..., :3].any(axis=-1)


def stretched_tile(image: np.ndarray) -> np.ndarray:
    """An (H, W, >=3) tile as the pixel classifier sees it: (H, W, 3) uint8, each band stretched from its
    2nd to its 98th percentile over the valid pixels (any band non-zero) onto 1..255, nodata left 0. Per
    tile, so a haze veil's loss of contrast is mostly undone. The model is shown the tiles unstretched: on
    its stretched tiles it gained on one landscape and lost on two (docs/experiments.md)."""
    image = np.asarray(image)
    valid = valid_pixels(image)
    return np.ascontiguousarray(
        percentile_stretch(image[..., :3].transpose(2, 0, 1), valid).transpose(1, 2, 0)
    )


def to_rgb8(array: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(bands, H, W) of any dtype -> (3, H, W) uint8 with a 2-98 % stretch per band; 0 = nodata."""
    out = array[:3].copy() if array.dtype == np.uint8 else percentile_stretch(array, valid)
    out[:, ~valid] = 0
    out[:, valid] = np.maximum(out[:, valid], 1)  # keep 0 for nodata only
    return out


def prepare_scene(
    image_path,
    labels_path,
    out_dir,
    class_field: str = "class",
    class_map: dict | None = None,
    layer=None,
    presence_only: bool = False,
) -> dict:
    """Check a raster + label file and write ``out_dir``/{image.tif, labels.gpkg, semantic.tif, boundary.tif,
    instances.tif}. The image becomes RGB uint8 (nodata 0); labels are reprojected to its CRS.

    Returns the paths (``image``, ``labels``, ``semantic``, ``boundary``, ``instances``) and ``report``
    (sizes, CRS, resolution, polygon/field counts, overlaps, reprojection, nodata and class fractions).
    """
    image_path, labels_path, out_dir = Path(image_path), Path(labels_path), Path(out_dir)
    with open_raster(image_path) as src:
        if src.count < 3:
            raise GeoDataError(f"raster {image_path} has {src.count} band(s); an RGB image needs 3")
        data = _read(src, image_path, indexes=[1, 2, 3])
        crs, transform, (h, w) = src.crs, src.transform, src.shape
        nodata, n_bands = src.nodata, src.count
    # A pixel is nodata when all three bands hold the nodata value.
    valid = np.ones((h, w), bool) if nodata is None else ~(data == nodata).all(axis=0)
    labels, notes = read_labels(labels_path, crs, layer=layer, class_field=class_field, class_map=class_map)
    left, bottom, right, top = rasterio.transform.array_bounds(h, w, transform)
    if not labels.intersects(shapely.box(left, bottom, right, top)).any():
        raise GeoDataError(
            f"no polygon of {labels_path} lies inside raster {image_path} (bounds {left:.0f},{bottom:.0f},"
            f"{right:.0f},{top:.0f} in {crs}). Fix: check that the two files belong together and their CRS."
        )
    masks = rasterize_labels(labels, (h, w), transform, valid, presence_only)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / name for kind, name in layout.SCENE_FILES.items()}
    if image_path.resolve() != paths["image"].resolve():
        if data.dtype == np.uint8 and nodata == 0 and n_bands == 3:
            with files.atomic(paths["image"]) as tmp:
                shutil.copyfile(image_path, tmp)
        else:
            write_geotiff(paths["image"], to_rgb8(data, valid), crs, transform, nodata=0)
    write_vector(labels[["class", "field_id", "geometry"]], paths["labels"], layer="labels")
    write_geotiff(paths["semantic"], masks.semantic, crs, transform, nodata=NODATA)
    write_geotiff(paths["boundary"], masks.boundary, crs, transform)
    write_geotiff(paths["instances"], masks.instances, crs, transform)
    res = abs(transform.a)
    report = {"crs": crs.to_string(), "res_m": res, "width": w, "height": h, **notes, **masks.report}
    return {**paths, "report": report}


def run_each(fn, jobs, workers: int = 1, executor=None) -> list:
    """``[fn(*args) for args in jobs]``, in order: here, in ``workers`` processes, or on ``executor``.

    ``executor`` is anything with ``submit(fn, *args)`` returning futures with ``result()``: a
    ``concurrent.futures`` pool or a ``dask.distributed.Client`` (imagery beyond one machine).
    """
    jobs = list(jobs)
    if executor is not None:
        return [f.result() for f in [executor.submit(fn, *args) for args in jobs]]
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*args) for args in jobs]
    # forkserver, not fork: a notebook kernel (or a Dask client) runs threads, and a forked copy of a
    # process with threads can hang or die. The server imports the geo stack once, then forks workers.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["magseg_nb.geo"])
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
        return [f.result() for f in [pool.submit(fn, *args) for args in jobs]]


def prepare_scenes(sources, scenes_dir, log=print, workers: int = 1, executor=None) -> pd.DataFrame:
    """``prepare_scene`` for each ``SceneSource`` into ``scenes_dir/<scene_id>/``; the scenes.csv table.

    Scenes are independent: ``workers`` > 1 prepares them in that many processes, ``executor`` (e.g. a
    ``dask.distributed.Client``) on a cluster; the files and the table are the same either way.
    """
    jobs = [(src.image_path, src.labels_path, files.safe_path(scenes_dir, src.scene_id, what="scene id"), src.class_field,
             src.class_map, src.layer, getattr(src, "presence_only", False)) for src in sources]  # fmt: skip
    rows = []
    for src, out in zip(sources, run_each(prepare_scene, jobs, workers, executor), strict=True):
        rep = out["report"]
        rows.append({"scene_id": src.scene_id, "country": src.country, **rep,
                     "dataset_split": getattr(src, "split", None)})  # fmt: skip
        log(f"{src.scene_id}: {rep['width']}x{rep['height']} px, {rep['n_fields']} fields, "
            f"{rep['n_overlap_pairs']} overlapping pairs" + (f", labels reprojected from {rep['reprojected_from']}"
            if rep["reprojected_from"] else ""))  # fmt: skip
    return pd.DataFrame(rows)


def scene_paths(run01, scene_id: str) -> dict[str, Path]:
    """Where notebook 01 put a scene's files."""
    return {kind: layout.scene_file(run01, scene_id, kind) for kind in layout.SCENE_FILES}


# --- tiling and the spatial split ---------------------------------------------------------------------


def tile_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Window offsets along one axis: stride ``tile_size - overlap``, the last tile flush with the edge."""
    if not 0 <= overlap < tile_size:
        raise ValueError(f"tile_overlap={overlap} must be >= 0 and smaller than tile_size={tile_size}")
    if length < tile_size:
        raise GeoDataError(
            f"a scene side of {length} px is smaller than tile_size={tile_size}; lower tile_size"
        )
    starts = list(range(0, length - tile_size + 1, tile_size - overlap))
    if starts[-1] != length - tile_size:
        starts.append(length - tile_size)
    return starts


def scan_tiles(
    scene_dir, scene_id: str, country: str, tile_size: int, overlap: int
) -> tuple[pd.DataFrame, dict]:
    """Candidate tiles of one prepared scene with their nodata and class fractions (windowed reads).

    Tiles that are all nodata are left out; ``report`` counts them (``n_all_nodata``).
    """
    scene_dir = Path(scene_dir)
    rows, skipped = [], 0
    with open_raster(scene_dir / layout.SCENE_FILES["semantic"]) as src:
        h, w = src.shape
        for i, r in enumerate(tile_starts(h, tile_size, overlap)):
            for j, c in enumerate(tile_starts(w, tile_size, overlap)):
                sem = _read(
                    src,
                    scene_dir / layout.SCENE_FILES["semantic"],
                    indexes=1,
                    window=Window(c, r, tile_size, tile_size),
                )
                counts = np.bincount(sem.ravel(), minlength=256)
                n_valid = sem.size - counts[NODATA]
                if n_valid == 0:
                    skipped += 1
                    continue
                row = {"tile_id": f"{scene_id}_r{i}_c{j}", "scene_id": scene_id, "country": country,
                       "row_off": r, "col_off": c, "height": tile_size, "width": tile_size,
                       "nodata_frac": round(counts[NODATA] / sem.size, 6)}  # fmt: skip
                for cid, name in enumerate(CLASSES):
                    row[f"frac_{name}"] = round(counts[cid] / n_valid, 6)
                rows.append(row)
    return pd.DataFrame(rows), {"n_candidates": len(rows) + skipped, "n_all_nodata": skipped}


def spatial_split(
    tiles: pd.DataFrame, block_size: int, fractions: dict[str, float] | None = None, seed: int = 0
) -> tuple[pd.DataFrame, dict]:
    """Assign square blocks of ``block_size`` px to train/val/test, per country, and tiles by block.

    A tile's ``block_id`` is the block holding its centre. A tile that overlaps blocks of different
    splits is dropped (it would share pixels with a tile of another split); tiles spanning blocks of
    one split are kept. Blocks are shuffled by ``seed`` and given to the split furthest below its
    share of tiles, so each country gets val and test blocks when it has three blocks or more.
    """
    fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
    if set(fractions) != set(SPLITS) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"fractions must give train/val/test summing to 1, got {fractions}")
    if tiles.empty:
        raise GeoDataError("no tiles to split: every tile was nodata")
    size = int(tiles["height"].max())
    if block_size < size:
        raise ValueError(f"split_block_size={block_size} must be at least tile_size={size}")
    t = tiles.copy()
    by, bx = (t.row_off + t.height // 2) // block_size, (t.col_off + t.width // 2) // block_size
    t["block_id"] = t.scene_id + "_b" + by.astype(str) + "_" + bx.astype(str)
    rng = np.random.default_rng(seed)
    block_split = {}
    for _, group in t.groupby("country", sort=True):
        counts = group.block_id.value_counts().sort_index()
        blocks = counts.index.to_numpy()[rng.permutation(len(counts))]
        target = {s: fractions[s] * counts.sum() for s in SPLITS}
        have = dict.fromkeys(SPLITS, 0.0)
        # Small splits first, so that a country with few blocks still gets test and val.
        for k, block in enumerate(blocks):
            if k < 3 and len(blocks) >= 3:
                split = ("test", "val", "train")[k]
            else:
                split = max(SPLITS, key=lambda s: (target[s] - have[s]) / max(target[s], 1e-9))
            block_split[block] = split
            have[split] += counts[block]
    t["split"] = t.block_id.map(block_split)
    keep = np.ones(len(t), bool)
    for n, row in enumerate(t.itertuples()):
        ys = range(row.row_off // block_size, (row.row_off + row.height - 1) // block_size + 1)
        xs = range(row.col_off // block_size, (row.col_off + row.width - 1) // block_size + 1)
        touched = {block_split.get(f"{row.scene_id}_b{y}_{x}") for y in ys for x in xs} - {None}
        keep[n] = touched <= {row.split}
    report = {"n_blocks": len(block_split), "n_straddling_dropped": int((~keep).sum())}
    return t[keep].reset_index(drop=True), report


def write_scene_tiles(run01, scene_id: str, windows) -> int:
    """Write ``tiles/<tile_id>/{image,masks}.tif`` for ``windows`` = (tile_id, row_off, col_off, height,
    width) rows of one scene; returns how many. The GeoTIFF options are built once per scene."""
    run01 = Path(run01)
    paths = scene_paths(run01, scene_id)
    with rasterio.Env():  # one GDAL environment for the scene, not one per file opened
        srcs = {k: open_raster(paths[k]) for k in ("image", "semantic", "boundary", "instances")}
        try:
            crs, n = srcs["image"].crs, 0
            profiles = {}
            for tile_id, row_off, col_off, height, width in windows:
                win = Window(col_off, row_off, width, height)
                image = _read(srcs["image"], paths["image"], window=win)
                masks = np.empty((3, height, width), np.int32)
                for b, k in enumerate(("semantic", "boundary", "instances")):
                    masks[b] = _read(srcs[k], paths[k], indexes=1, window=win)
                if (height, width) not in profiles:
                    profiles[height, width] = (geotiff_profile(image.shape, image.dtype, crs, None, 0),
                                               geotiff_profile(masks.shape, np.int32, crs, None))  # fmt: skip
                image_profile, mask_profile = profiles[height, width]
                transform = srcs["image"].window_transform(win)
                folder = files.safe_path(run01, "tiles", tile_id, what="tile id")
                folder.mkdir(parents=True, exist_ok=True)
                _write_profiled(folder / layout.TILE_IMAGE, image, {**image_profile, "transform": transform})
                _write_profiled(folder / layout.TILE_MASKS, masks, {**mask_profile, "transform": transform})
                n += 1
        finally:
            for src in srcs.values():
                src.close()
    return n


def write_tiles(run01, tiles: pd.DataFrame, workers: int = 1, executor=None) -> None:
    """Write ``tiles/<tile_id>/image.tif`` and ``masks.tif`` (semantic, boundary, instance as int32).

    One job per scene (``write_scene_tiles``), run as ``run_each`` does: here, in ``workers``
    processes or on ``executor``.
    """
    cols = ["tile_id", "row_off", "col_off", "height", "width"]
    jobs = [(Path(run01), scene_id, [(str(t), int(r), int(c), int(h), int(w))
                                     for t, r, c, h, w in group[cols].itertuples(index=False)])
            for scene_id, group in tiles.groupby("scene_id", sort=False)]  # fmt: skip
    run_each(write_scene_tiles, jobs, workers, executor)


def write_split(tiles: pd.DataFrame, path) -> str:
    """Write split.csv (tile_id, scene_id, block_id, split) and return its sha256."""
    cols = ["tile_id", "scene_id", "block_id", "split"]
    return files.sha256_file(write_csv(tiles[cols].sort_values("tile_id"), path))


def split_by_scene(tiles: pd.DataFrame, scene_split: dict) -> tuple[pd.DataFrame, dict]:
    """Use a dataset's own split (one split per scene): ``block_id`` is the scene."""
    missing = sorted(set(tiles.scene_id) - {k for k, v in scene_split.items() if v in SPLITS})
    if missing:
        raise GeoDataError(
            f"scenes {missing[:5]} have no train/val/test split in the dataset; use split_mode='block'"
        )
    t = tiles.assign(block_id=tiles.scene_id, split=tiles.scene_id.map(scene_split))
    return t, {"n_blocks": t.scene_id.nunique(), "n_straddling_dropped": 0}


def make_tiles(
    run01,
    scenes: pd.DataFrame,
    tile_size: int,
    overlap: int,
    block_size: int,
    fractions: dict | None = None,
    seed: int = 0,
    split_mode: str = "block",
    workers: int = 1,
    executor=None,
) -> tuple[pd.DataFrame, dict]:
    """Scan, split and write the tiles of every prepared scene; writes tiles.csv and split.csv.

    ``split_mode``: "block" (spatial blocks, see ``spatial_split``) or "dataset" (the dataset's own
    per-scene split, column ``dataset_split`` of ``scenes``). Scanning and writing run per scene, in
    ``workers`` processes or on ``executor`` (see ``run_each``); the split needs every scene's tiles.
    Returns (tiles table, report with counts and ``split_sha256``).
    """
    run01 = Path(run01)
    found, counts = [], {"n_candidates": 0, "n_all_nodata": 0}
    jobs = [(run01 / "scenes" / scene.scene_id, scene.scene_id, scene.country, tile_size, overlap)
            for scene in scenes.itertuples()]  # fmt: skip
    for df, rep in run_each(scan_tiles, jobs, workers, executor):
        found.append(df)
        counts = {k: counts[k] + rep[k] for k in counts}
    candidates = pd.concat(found, ignore_index=True) if found else pd.DataFrame()
    if split_mode == "block":
        tiles, rep = spatial_split(candidates, block_size, fractions, seed)
    elif split_mode == "dataset":
        tiles, rep = split_by_scene(candidates, dict(zip(scenes.scene_id, scenes.dataset_split, strict=True)))
    else:
        raise ValueError(f"split_mode={split_mode!r}: use 'block' or 'dataset'")
    tiles = tiles[TILE_COLUMNS].sort_values("tile_id", kind="stable").reset_index(drop=True)
    write_tiles(run01, tiles, workers, executor)
    write_csv(tiles, run01 / layout.TILES_CSV)
    sha = write_split(tiles, run01 / "split.csv")
    per_split = {f"n_{s}": int((tiles.split == s).sum()) for s in SPLITS}
    return tiles, {**counts, **rep, "n_tiles": len(tiles), **per_split, "split_sha256": sha}


# --- reading notebook 01's outputs --------------------------------------------------------------------

TILE_COLUMNS = ["tile_id", "scene_id", "country", "row_off", "col_off", "height", "width", "block_id", "split",
                "nodata_frac", "frac_others", "frac_field", "frac_tree", "frac_water"]  # fmt: skip


def read_tiles_table(run01) -> pd.DataFrame:
    """tiles.csv of notebook 01 (columns ``TILE_COLUMNS``)."""
    path = Path(run01) / layout.TILES_CSV
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run notebook 01_dataset_prep first")
    return pd.read_csv(path, dtype={"tile_id": str, "scene_id": str, "block_id": str})


@dataclass
class Tile:
    tile_id: str
    image: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) uint8
    boundary: np.ndarray  # (H, W) uint8
    instance: np.ndarray  # (H, W) int32
    crs: object
    transform: object


def read_tile(run01, tile_id: str) -> Tile:
    """One tile's image and masks."""
    folder = files.safe_path(run01, "tiles", tile_id, what="tile id")
    with open_raster(folder / layout.TILE_IMAGE) as src:
        image = _read(src, folder / layout.TILE_IMAGE).transpose(1, 2, 0)
        crs, transform = src.crs, src.transform
    with open_raster(folder / layout.TILE_MASKS) as src:
        masks = _read(src, folder / layout.TILE_MASKS)
    return Tile(
        tile_id, image, masks[0].astype(np.uint8), masks[1].astype(np.uint8), masks[2], crs, transform
    )
