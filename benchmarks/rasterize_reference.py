"""``geo.rasterize_labels`` as it was before the tiling speed-up (commit c33f475), kept verbatim.

Two users: ``tests/test_tiling_parallel.py`` asserts that the current function gives identical masks and
reports, and ``bench_tiling.py`` times both on the same scene, side by side.
"""

from __future__ import annotations

import json

import numpy as np
import rasterio
import rasterio.enums
import rasterio.features
import shapely
from skimage.segmentation import find_boundaries

from magseg_nb import geo
from magseg_nb.labels import CLASS_IDS, CLASSES, NODATA


def reference_rasterize(labels, shape, transform, valid=None, presence_only=False) -> geo.Masks:
    """``geo.rasterize_labels`` as it was before the speed-up (GeoJSON shapes, skimage boundaries,
    predicate tree query), kept verbatim as the reference."""
    order = labels.assign(_area=labels.geometry.area).sort_values("_area", ascending=False, kind="stable")
    shapes = [json.loads(g) for g in shapely.to_geojson(order.geometry.values)]
    top = rasterio.features.rasterize(
        zip(shapes, range(1, len(shapes) + 1), strict=True), out_shape=shape, transform=transform, fill=0,
        dtype="int32",
    )  # fmt: skip
    fill = NODATA if presence_only else CLASS_IDS["others"]
    class_lut = np.concatenate([[fill], order["class_id"].to_numpy()]).astype(np.uint8)
    is_field = order["class_id"].to_numpy() == CLASS_IDS["field"]
    id_lut = np.concatenate([[0], np.where(is_field, order["field_id"].to_numpy(), 0)]).astype(np.int32)
    semantic, instances = class_lut[top], id_lut[top]
    if valid is not None:
        semantic[~valid] = NODATA
        instances[~valid] = 0
    boundary = (find_boundaries(instances, connectivity=1, mode="inner") & (instances > 0)).astype(np.uint8)
    pairs = labels.sindex.query(labels.geometry, predicate="intersects")
    pairs = pairs[:, pairs[0] < pairs[1]]
    a, b = labels.geometry.values[pairs[0]], labels.geometry.values[pairs[1]]
    inner = shapely.relate_pattern(a, b, "T********")
    inter = shapely.area(shapely.intersection(a[inner], b[inner]))
    overlap_px = 0
    if inner.any():
        involved = np.unique(pairs[:, inner])
        coverage = rasterio.features.rasterize(
            ((g, 1) for g in labels.geometry.values[involved]), out_shape=shape, transform=transform, fill=0,
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
    return geo.Masks(semantic, boundary, instances, report)
