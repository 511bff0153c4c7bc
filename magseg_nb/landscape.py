"""A generated, georeferenced smallholder landscape: RGB GeoTIFF + labelled polygons (GeoPackage).

The generator is deterministic by seed and meant to be *hard* for classical segmentation:

- fields are strip parcels (long and thin) or irregular power-diagram plots, with wiggly edges;
- neighbouring fields of one farm usually share a crop, and bunds between them are faint or missing;
- fields carry crop rows, patchy colour (soil showing through, uneven growth) and per-field jitter;
- orchards look like trees but are their own class; fallow land looks like ploughed fields;
- haze, cloud shadows, tree shadows, blur and sensor noise sit on top;
- three countries differ in field size, shape and palette (Vietnam: tiny paddy strips; Cambodia:
  larger rice plots; India: medium irregular plots with bund trees).

Not everything is field: villages (dense buildings, bare yards, home gardens full of trees, lanes and
ponds) sit along roads and canals, trees line roads and canal banks, and rivers, canals and ponds
cross the fields. A default demo scene is about 60% field, 15-20% others (roads, buildings, yards,
fallow), 15% tree and 5-8% water, so an all-field guess is not a good answer; tiles range from pure
field to pure village or river. ``Difficulty.villages``/``trees``/``water`` scale that mix.

Every step is vectorised numpy/scipy on whole rasters (no Python loops over pixels); a 1024 x 1024
scene takes a few seconds on a loaded 2-core machine. Labels are polygonised from the generated id raster, so rasterising them
back (``geo.prepare_scene``) reproduces the truth exactly unless ``label_misalignment_m`` shifts them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio.features
import shapely
from rasterio.transform import from_origin
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.measure import label as connected_label
from skimage.transform import resize

from magseg_nb import files, geo
from magseg_nb.manifest import SceneSource

# Pixel kinds inside the generator (the GeoPackage stores them as text classes).
OTHERS, FIELD, TREE, WATER, ROAD, BUILDING = range(6)
KIND_NAMES = {
    OTHERS: "others",
    FIELD: "field",
    TREE: "tree",
    WATER: "water",
    ROAD: "road",
    BUILDING: "building",
}


@dataclass
class Difficulty:
    """Knobs of how hard the landscape is (defaults: the demo's hard setting; 0 turns most effects off)."""

    bund_visibility: float = 0.35  # contrast of the bunds between fields (0 invisible, 1 crisp)
    bund_gap_frac: float = 0.5  # share of bund length that is missing entirely
    same_crop_prob: float = 0.75  # chance a field has its farm's crop (neighbours then look alike)
    colour_jitter: float = 0.05  # per-field brightness/hue spread around its crop colour
    within_field_variance: float = 0.6  # patchy growth / soil showing through inside a field
    row_texture: float = 0.5  # crop-row stripes amplitude
    orchard_frac: float = 0.04  # fields replaced by orchards (class tree, field-like shape)
    fallow_frac: float = 0.07  # plots left bare (class others, look like ploughed fields)
    haze: float = 0.3  # contrast loss under a spatially varying veil (0..1)
    cloud_shadows: int = 3  # number of cloud-shadow blobs per scene
    shadow_strength: float = 0.35  # darkening inside a cloud shadow (0..1)
    blur_sigma: float = 0.9  # optical blur in pixels
    noise: float = 5.0  # sensor noise sigma in digital numbers
    label_misalignment_m: float = 0.0  # shift of the label polygons against the image (co-registration)
    nodata_edge_frac: float = 0.0  # share of the scene cut off as a nodata swath edge (value 0)
    # Composition: multipliers of the country's usual cover (1 = typical mix, 0 = none of it).
    villages: float = 1.0  # villages: buildings, bare yards, home-garden trees, lanes, village ponds
    trees: float = 1.0  # tree clumps, scattered crowns, tree lines along bunds, roads and canals
    water: float = 1.0  # ponds, canals and rivers

    @classmethod
    def easy(cls) -> Difficulty:
        """Crisp bunds, distinct crops, no haze or noise: what a plain watershed handles."""
        return cls(1.0, 0.0, 0.0, 0.15, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class CountryStyle:
    """What makes one country's landscape look different."""

    code: str
    epsg: int
    origin: tuple[float, float]  # UTM easting, northing of the first scene's top-left corner
    field_area_m2: float  # median field area
    area_sigma: float  # lognormal spread of field areas
    strip_frac: float  # share of regions laid out as strips (the rest: irregular plots)
    strip_aspect: tuple[float, float]  # length/width of strip fields
    tree_cover: float
    water_cover: float
    canal_prob: float  # share of region edges that are canals
    bund_trees: float  # share of field edges lined with trees
    crops: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]  # (main colour, patch colour)
    village_cover: float = 0.12  # share of the scene in villages
    garden_trees: float = 0.4  # share of a village under home-garden trees
    river_prob: float = 0.5  # chance a scene has a river crossing it
    road_trees: float = 0.4  # share of road and canal banks lined with trees


COUNTRIES: dict[str, CountryStyle] = {
    # Mekong delta: tiny paddy strips, canals everywhere.
    "vietnam": CountryStyle(
        "vn",
        32648,
        (555_000.0, 1_128_000.0),
        450.0,
        0.5,
        0.75,
        (2.5, 7.0),
        0.08,
        0.05,
        0.35,
        0.02,
        (
            ((78, 118, 52), (96, 128, 70)),
            ((92, 132, 60), (70, 104, 50)),
            ((58, 84, 72), (80, 110, 70)),
            ((120, 128, 66), (100, 118, 58)),
            ((84, 112, 58), (110, 120, 80)),
        ),
        village_cover=0.25,
        garden_trees=0.45,
        river_prob=0.7,
        road_trees=0.5,
    ),
    # Battambang: larger rice plots, fewer trees, dry-season soil.
    "cambodia": CountryStyle(
        "kh",
        32648,
        (305_000.0, 1_449_000.0),
        2200.0,
        0.6,
        0.35,
        (1.5, 3.5),
        0.09,
        0.08,
        0.15,
        0.04,
        (
            ((110, 122, 70), (138, 128, 92)),
            ((140, 126, 96), (120, 116, 80)),
            ((86, 116, 58), (108, 122, 70)),
            ((150, 138, 104), (132, 120, 90)),
            ((96, 110, 64), (124, 122, 84)),
        ),
        village_cover=0.26,
        garden_trees=0.45,
        river_prob=0.45,
        road_trees=0.4,
    ),
    # Telangana: medium irregular plots, red soils, trees on bunds.
    "india": CountryStyle(
        "in",
        32644,
        (235_000.0, 1_937_000.0),
        1200.0,
        0.7,
        0.3,
        (1.5, 4.0),
        0.1,
        0.08,
        0.05,
        0.12,
        (
            ((140, 104, 82), (124, 96, 74)),
            ((96, 112, 62), (130, 110, 84)),
            ((152, 122, 96), (138, 108, 86)),
            ((110, 116, 70), (96, 100, 64)),
            ((126, 112, 84), (108, 104, 74)),
        ),
        village_cover=0.24,
        garden_trees=0.25,
        river_prob=0.25,
        road_trees=0.3,
    ),
}


@dataclass
class Scene:
    """One generated scene in memory."""

    scene_id: str
    country: str
    image: np.ndarray  # (H, W, 3) uint8, 0 = nodata
    kind: np.ndarray  # (H, W) uint8 pixel kinds (OTHERS..BUILDING)
    fields: np.ndarray  # (H, W) int32 field ids, 0 = no field
    labels: gpd.GeoDataFrame  # class, field_id, geometry (already misaligned if asked)
    crs: str
    transform: object
    res_m: float
    params: dict = field(default_factory=dict)


# --- noise helpers ------------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std noise with features about ``scale_px`` pixels across (float32)."""
    h, w = shape
    if scale_px <= 2:
        out = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), scale_px / 2)
    else:
        # Draw on a coarse grid and upsample: far cheaper than a wide Gaussian on the full raster.
        small = rng.standard_normal((int(np.ceil(h / scale_px)) + 2, int(np.ceil(w / scale_px)) + 2))
        small = ndi.gaussian_filter(small, 0.7).astype(np.float32)
        big = resize(small, (h + int(2 * scale_px), w + int(2 * scale_px)), order=1, preserve_range=True)
        out = big[int(scale_px) : int(scale_px) + h, int(scale_px) : int(scale_px) + w]
    out = out - out.mean()
    return (out / (out.std() + 1e-6)).astype(np.float32)


def _edges(ids: np.ndarray, size: int = 3) -> np.ndarray:
    """Pixels whose neighbourhood holds another id."""
    return ndi.maximum_filter(ids, size) != ndi.minimum_filter(ids, size)


# --- geometry: regions, fields, roads, water, trees, buildings ---------------------------------------


def _layout_fields(rng, style: CountryStyle, shape, res_m) -> tuple[np.ndarray, np.ndarray]:
    """Field ids (H, W) int32 and region ids: each region is a strip or a plot layout."""
    h, w = shape
    side = np.sqrt(style.field_area_m2) / res_m  # typical field side in pixels
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Domain warp gives wiggly, hand-made boundaries instead of straight Voronoi edges.
    warp = 0.18 * side
    wy = yy + warp * smooth_noise(rng, shape, 1.5 * side)
    wx = xx + warp * smooth_noise(rng, shape, 1.5 * side)
    n_regions = max(2, int(round(h * w / (7 * side) ** 2 / 4)))
    rseeds = rng.uniform([0, 0], [h, w], (n_regions, 2))
    big_wy = yy + 0.06 * h * smooth_noise(rng, shape, h / 3)
    big_wx = xx + 0.06 * w * smooth_noise(rng, shape, w / 3)
    region = cKDTree(rseeds).query(np.stack([big_wy.ravel(), big_wx.ravel()], 1))[1].reshape(shape)
    ids = np.zeros(shape, np.int64)
    for r in range(n_regions):
        m = region == r
        if not m.any():
            continue
        theta = rng.uniform(0, np.pi)
        u = wx[m] * np.cos(theta) + wy[m] * np.sin(theta)
        v = -wx[m] * np.sin(theta) + wy[m] * np.cos(theta)
        areas = np.exp(rng.normal(np.log(style.field_area_m2), style.area_sigma, 4096)) / res_m**2
        if rng.random() < style.strip_frac:
            aspect = rng.uniform(*style.strip_aspect, 4096)
            widths = np.sqrt(areas / aspect)
            edges = np.cumsum(widths) + u.min() - rng.uniform(0, widths[0])
            band = np.minimum(np.searchsorted(edges, u), len(edges) - 1)
            lengths = np.sqrt(areas * aspect)[band]
            seg = np.floor((v + rng.uniform(0, 4096, 4096)[band]) / lengths).astype(np.int64)
            local = band * 100_000 + seg
        else:
            # Power diagram (weighted Voronoi): straight-ish edges, cells of varied size.
            step = side * rng.uniform(0.9, 1.2)
            gu, gv = np.meshgrid(
                np.arange(u.min() - step, u.max() + step, step),
                np.arange(v.min() - step, v.max() + step, step),
            )
            seeds = np.stack([gu.ravel(), gv.ravel()], 1) + rng.uniform(-0.4, 0.4, (gu.size, 2)) * step
            stretch = rng.uniform(1.0, 1.8)
            seeds[:, 0] *= stretch
            weight = (step * rng.uniform(0.0, 0.6, len(seeds))) ** 2
            pts = np.stack([u * stretch, v], 1)
            k = min(8, len(seeds))
            dist, idx = cKDTree(seeds).query(pts, k=k)
            dist, idx = dist.reshape(len(pts), k), idx.reshape(len(pts), k)
            best = np.argmin(dist**2 - weight[idx], axis=1)
            local = idx[np.arange(len(pts)), best]
        ids[m] = r * 10_000_000 + local
    ids = np.unique(ids, return_inverse=True)[1].reshape(shape).astype(np.int32) + 1
    return ids, region


def _curve(rng, shape, half_width_px):
    """A gently curving band across the scene (main road or river)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    offset = rng.uniform(0.2, 0.8) * (h * abs(np.sin(theta)) + w * abs(np.cos(theta)))
    d = xx * np.sin(theta) - yy * np.cos(theta)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    d = d - d.min() - offset + 0.05 * h * np.sin(along / (0.4 * h) + rng.uniform(0, 6))
    width = half_width_px * (1 + 0.25 * smooth_noise(rng, shape, h / 4))
    return np.abs(d) < width


def _roads_and_canals(rng, style, d: Difficulty, region, shape, res_m, side):
    """Boolean road and water masks: a main road, tracks, canals along region edges, a river, ponds."""
    n_r = int(region.max()) + 1
    rmin, rmax = ndi.minimum_filter(region, 3), ndi.maximum_filter(region, 3)
    edge = rmin != rmax
    pair = rmin.astype(np.int64) * n_r + rmax
    choice = rng.random(n_r * n_r)
    track = edge & (choice[pair] < 0.5)
    canal = edge & (choice[pair] > 1 - style.canal_prob * min(d.water, 1.5))
    road = ndi.binary_dilation(track, iterations=max(1, int(1.5 / res_m)))
    road |= _curve(rng, shape, rng.uniform(3.0, 5.0) / res_m)
    water = ndi.binary_dilation(canal, iterations=max(1, int(2.5 / res_m)))
    # A river (delta distributary, irrigation channel or stream): wide, so whole tiles can be water.
    if rng.random() < style.river_prob * min(d.water, 1.0):
        water |= _curve(rng, shape, rng.uniform(8.0, 22.0) / res_m)
    # Ponds: blobs of smooth noise above a high quantile.
    cover = style.water_cover * d.water
    if cover > 0:
        pond = smooth_noise(rng, shape, 1.2 * side)
        water |= pond > np.quantile(pond, 1 - min(cover, 0.5) * 0.6)
    return road, water & ~road


def _trees(rng, style, d: Difficulty, ids, road, water, shape, res_m, side):
    """Boolean tree mask: clumps, scattered crowns, trees along some field edges, roads and canals."""
    cover = min(style.tree_cover * d.trees, 0.6)
    trees = np.zeros(shape, bool)
    if cover <= 0:
        return trees
    clumps = smooth_noise(rng, shape, 0.8 * side)
    trees |= clumps > np.quantile(clumps, 1 - cover * 0.5)
    pts = np.zeros(shape, bool)
    n_crowns = int(shape[0] * shape[1] * res_m**2 * cover / 300)
    pts[rng.integers(0, shape[0], n_crowns), rng.integers(0, shape[1], n_crowns)] = True
    radius = (2.5 + 1.5 * smooth_noise(rng, shape, 6)) / res_m
    trees |= ndi.distance_transform_edt(~pts) < radius
    # Bund trees: pick some field pairs and line their shared edge.
    lo, hi = ndi.minimum_filter(ids, 3), ndi.maximum_filter(ids, 3)
    key = (lo.astype(np.int64) * 7919 + hi) % 100_003
    lined = (lo != hi) & (rng.random(100_003)[key] < style.bund_trees * d.trees)
    trees |= ndi.binary_dilation(lined, iterations=max(1, int(2.0 / res_m)))
    # Tree lines on road and canal banks, with gaps.
    corridor = road | water
    bank = ndi.binary_dilation(corridor, iterations=max(2, int(4.0 / res_m))) & ~corridor
    gaps = smooth_noise(rng, shape, 25 / res_m)
    trees |= bank & (gaps > np.quantile(gaps, 1 - min(style.road_trees * d.trees, 1.0)))
    return trees


def _villages(rng, style, d: Difficulty, road, water, shape, res_m):
    """Village, building, garden-tree, lane and pond masks: villages sit along roads and canals.

    A village is bare yards (class others) around dense buildings, with home gardens full of trees,
    lanes and small ponds; so some tiles are mostly village rather than field.
    """
    h, w = shape
    empty = np.zeros(shape, bool)
    cover = min(style.village_cover * d.villages, 0.6)
    if cover <= 0:
        return empty, empty, empty, empty, empty
    near = ndi.distance_transform_edt(~(road | water)) * res_m
    score = smooth_noise(rng, shape, 90 / res_m) - near / 60.0
    village = score > np.quantile(score, 1 - cover)
    village &= ~(road | water)
    # Lanes: thin tracks on the edges of a coarse cell pattern, only inside villages.
    cells = smooth_noise(rng, shape, 30 / res_m)
    lanes = village & (np.abs(cells) < 0.06)
    # Home gardens: tree canopy in smooth blobs.
    canopy = smooth_noise(rng, shape, 8 / res_m) + 0.4 * smooth_noise(rng, shape, 3 / res_m)
    inside = canopy[village]
    gardens = village & (canopy > np.quantile(inside, 1 - style.garden_trees)) if inside.size else empty
    # Buildings: rotated rectangles dropped on village pixels (vectorised corners, one rasterize call).
    cand = np.argwhere(village & ~gardens & ~lanes)
    n = min(len(cand), int(village.sum() * res_m**2 / 400))
    buildings = empty
    if n:
        yx = cand[rng.choice(len(cand), n, replace=False)].astype(float)
        half = rng.uniform(2.5, 7.0, (n, 2)) / res_m
        ang = rng.uniform(0, np.pi / 2, n)
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
        cx = corners[None, :, 0] * half[:, None, 0]
        cy = corners[None, :, 1] * half[:, None, 1]
        px = yx[:, None, 1] + cx * np.cos(ang)[:, None] - cy * np.sin(ang)[:, None]
        py = yx[:, None, 0] + cx * np.sin(ang)[:, None] + cy * np.cos(ang)[:, None]
        polys = shapely.polygons(np.stack([px, py], -1))
        buildings = rasterio.features.rasterize(polys, out_shape=shape, default_value=1, dtype="uint8") > 0
        buildings &= village & ~lanes
    # Village ponds (fish ponds in the deltas, tanks in India).
    pond_noise = smooth_noise(rng, shape, 12 / res_m)
    ponds = village & (pond_noise > np.quantile(pond_noise, 1 - 0.06 * min(d.water, 2.0))) & ~buildings
    return village, buildings, gardens & ~buildings & ~ponds, lanes & ~buildings, ponds


# --- rendering ----------------------------------------------------------------------------------------


def _render(rng, style, d: Difficulty, kind, ids, village, shape, res_m, side) -> np.ndarray:
    """The RGB image (float, 0..255) of a kind raster and field ids."""
    h, w = shape
    n = int(ids.max()) + 1
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Farms: clusters of neighbouring fields that mostly grow the same crop.
    counts = np.maximum(np.bincount(ids.ravel(), minlength=n), 1)
    cy = np.bincount(ids.ravel(), yy.ravel(), minlength=n) / counts
    cx = np.bincount(ids.ravel(), xx.ravel(), minlength=n) / counts
    farm_seeds = rng.uniform([0, 0], [h, w], (max(2, int(h * w / (3 * side) ** 2)), 2))
    farm = cKDTree(farm_seeds).query(np.stack([cy, cx], 1))[1]
    farm_crop = rng.integers(len(style.crops), size=len(farm_seeds))
    crop = np.where(rng.random(n) < d.same_crop_prob, farm_crop[farm], rng.integers(len(style.crops), size=n))
    main = np.array([c[0] for c in style.crops], np.float32)[crop]
    patch = np.array([c[1] for c in style.crops], np.float32)[crop]
    # Fields of one farm share a brightness offset; each field adds a little of its own.
    farm_tint = 1 + d.colour_jitter * rng.normal(0, 1, (len(farm_seeds), 1))
    tint = farm_tint[farm] * (1 + d.colour_jitter * rng.normal(0, 0.6, (n, 3)))
    main, patch = main * tint, patch * tint
    # Patchy growth: mix the two colours of each crop with smooth noise.
    t = np.clip(0.5 + d.within_field_variance * 0.5 * smooth_noise(rng, shape, 0.5 * side), 0, 1)
    t2 = np.clip(0.5 + d.within_field_variance * 0.5 * smooth_noise(rng, shape, 6 / res_m), 0, 1)
    mix = (0.6 * t + 0.4 * t2)[..., None]
    img = main[ids] * (1 - mix) + patch[ids] * mix
    # Crop rows: stripes with a per-field orientation and period.
    ang = rng.uniform(0, np.pi, n)
    period = rng.uniform(1.5, 4.0, n) / res_m
    phase = (xx * np.cos(ang[ids]) + yy * np.sin(ang[ids])) / period[ids]
    img += (d.row_texture * 8 * np.sin(2 * np.pi * phase))[..., None]
    # Bunds: light soil or grass lines on field edges, faint and with gaps.
    bund = _edges(ids) & (kind == FIELD)
    gap_noise = smooth_noise(rng, shape, 15 / res_m)
    gaps = gap_noise > np.quantile(gap_noise, d.bund_gap_frac) if d.bund_gap_frac > 0 else True
    alpha = (bund & gaps) * d.bund_visibility * rng.uniform(0.4, 1.0)
    bund_col = (
        np.array([150, 140, 110], np.float32) if rng.random() < 0.6 else np.array([90, 120, 70], np.float32)
    )
    img = img * (1 - alpha[..., None]) + bund_col * alpha[..., None]
    # Fallow plots: bare soil inside a field shape.
    soil = np.array([150, 128, 100], np.float32) * (1 + 0.08 * smooth_noise(rng, shape, 4 / res_m))[..., None]
    fallow = kind == OTHERS
    img[fallow] = soil[fallow]
    # Village yards: packed earth, lighter and blotchier than fallow soil.
    yard = fallow & village
    blotch = (1 + 0.12 * smooth_noise(rng, shape, 3 / res_m))[..., None]
    img[yard] = (np.array([172, 158, 132], np.float32) * blotch)[yard]
    # Trees: dark crowns with strong texture; orchards get a regular crown grid.
    crown = smooth_noise(rng, shape, 2.5 / res_m)
    tree_col = np.array([42, 72, 38], np.float32) * (1 + 0.25 * crown)[..., None]
    img[kind == TREE] = tree_col[kind == TREE]
    # Water: dark, smooth, turbid or clear.
    wcol = np.array([48, 70, 78] if rng.random() < 0.5 else [92, 96, 70], np.float32)
    water = wcol * (1 + 0.05 * smooth_noise(rng, shape, 10 / res_m))[..., None]
    img[kind == WATER] = water[kind == WATER]
    img[kind == ROAD] = np.array([168, 158, 140], np.float32) * rng.uniform(0.9, 1.1)
    roofs = np.array([[178, 90, 70], [170, 170, 175], [90, 110, 150], [200, 190, 170]], np.float32)
    bld_id = connected_label(kind == BUILDING)
    roof = roofs[rng.integers(len(roofs), size=bld_id.max() + 1)]
    img[kind == BUILDING] = roof[bld_id[kind == BUILDING]]
    # Shadows of trees and buildings, cast to the south-east.
    tall = (kind == TREE) | (kind == BUILDING)
    cast = max(1, int(2.0 / res_m))
    shadow = np.zeros(shape, bool)
    shadow[cast:, cast:] = tall[:-cast, :-cast]
    img[shadow & ~tall] *= 0.65
    return img


def _atmosphere(rng, d: Difficulty, img, shape) -> np.ndarray:
    """Haze, cloud shadows, blur and noise."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 1 + 0.06 * smooth_noise(rng, shape, h / 2)
    img = img * light[..., None]
    if d.cloud_shadows and d.shadow_strength:
        dark = np.zeros(shape, np.float32)
        edge_noise = smooth_noise(rng, shape, h / 12)
        for _ in range(d.cloud_shadows):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.08, 0.2) * h
            dist = np.hypot(yy - cy, (xx - cx) * rng.uniform(0.6, 1.4)) / r + 0.3 * edge_noise
            dark = np.maximum(dark, np.clip(1.5 - dist, 0, 1))
        img = img * (1 - d.shadow_strength * dark)[..., None]
    if d.haze:
        veil = np.clip(d.haze * (0.6 + 0.4 * smooth_noise(rng, shape, h / 3)), 0, 0.9)[..., None]
        img = img * (1 - veil) + np.array([196, 200, 206], np.float32) * veil
    if d.blur_sigma:
        img = ndi.gaussian_filter(img, (d.blur_sigma, d.blur_sigma, 0))
    img += rng.normal(0, d.noise, img.shape).astype(np.float32) if d.noise else 0
    return img


# --- labels -------------------------------------------------------------------------------------------


def _polygons(kind, fields, transform, crs) -> gpd.GeoDataFrame:
    """Polygonise the kind/field rasters: one row per field, and per blob of tree/water/road/building."""
    rows = []
    for geom, value in rasterio.features.shapes(fields, mask=fields > 0, transform=transform):
        rows.append(("field", int(value), shapely.geometry.shape(geom)))
    for k in (TREE, WATER, ROAD, BUILDING):
        mask = (kind == k).astype(np.uint8)
        for geom, _ in rasterio.features.shapes(mask, mask=mask > 0, transform=transform):
            rows.append((KIND_NAMES[k], 0, shapely.geometry.shape(geom)))
    df = pd.DataFrame(rows, columns=["class", "field_id", "geometry"])
    return gpd.GeoDataFrame(df, geometry="geometry", crs=crs)


def generate_scene(
    scene_id: str,
    country: str,
    size: int | tuple[int, int] = 1024,
    res_m: float = 0.8,
    seed: int = 0,
    difficulty: Difficulty | None = None,
    origin: tuple[float, float] | None = None,
) -> Scene:
    """One scene of ``country`` (a key of ``COUNTRIES``), deterministic for (scene_id, country, seed)."""
    if country not in COUNTRIES:
        raise ValueError(f"unknown country {country!r}; choose from {sorted(COUNTRIES)}")
    if not 0.25 <= res_m <= 2.0:
        raise ValueError(
            f"res_m={res_m} is outside 0.25..2 m; the generator draws smallholder fields at 0.5-1 m"
        )
    d = difficulty or Difficulty()
    style = COUNTRIES[country]
    shape = (size, size) if isinstance(size, int) else tuple(size)
    key = [seed, list(COUNTRIES).index(country), *[ord(c) for c in scene_id]]
    rng = np.random.default_rng(key)
    side = np.sqrt(style.field_area_m2) / res_m
    ids, region = _layout_fields(rng, style, shape, res_m)
    road, water = _roads_and_canals(rng, style, d, region, shape, res_m, side)
    village, buildings, gardens, lanes, ponds = _villages(rng, style, d, road, water, shape, res_m)
    trees = _trees(rng, style, d, ids, road, water, shape, res_m, side)
    # Orchards and fallow plots keep a field's shape but not its class.
    n = int(ids.max()) + 1
    fate = rng.random(n)
    kind = np.full(shape, FIELD, np.uint8)
    kind[(fate < d.orchard_frac)[ids]] = TREE
    kind[((fate >= d.orchard_frac) & (fate < d.orchard_frac + d.fallow_frac))[ids]] = OTHERS
    kind[village] = OTHERS
    kind[trees & ~village] = TREE
    kind[gardens] = TREE
    kind[water | ponds] = WATER
    kind[road | lanes] = ROAD
    kind[buildings] = BUILDING
    # Fields cut by roads or canals become separate instances; slivers become bare ground.
    fields = connected_label(np.where(kind == FIELD, ids, 0), background=0, connectivity=1).astype(np.int32)
    area = np.bincount(fields.ravel())
    tiny = area < max(20, 0.08 * side**2)
    tiny[0] = False
    kind[tiny[fields]] = OTHERS
    fields[tiny[fields]] = 0
    fields = np.unique(fields, return_inverse=True)[1].reshape(shape).astype(np.int32)
    img = _render(rng, style, d, kind, ids, village, shape, res_m, side)
    img = _atmosphere(rng, d, img, shape)
    image = np.clip(img, 1, 255).astype(np.uint8)  # 0 is reserved for nodata
    if d.nodata_edge_frac > 0:
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
        cut = (xx / shape[1] + yy / shape[0]) / 2 > 1 - d.nodata_edge_frac * 2
        image[cut] = 0
    transform = from_origin(*(origin or style.origin), res_m, res_m)
    crs = f"EPSG:{style.epsg}"
    labels = _polygons(kind, fields, transform, crs)
    if d.label_misalignment_m:
        angle = rng.uniform(0, 2 * np.pi)
        labels["geometry"] = labels.geometry.translate(
            d.label_misalignment_m * np.cos(angle), d.label_misalignment_m * np.sin(angle)
        )
    params = {"seed": seed, "size": list(shape), "res_m": res_m, "difficulty": asdict(d)}
    return Scene(scene_id, country, image, kind, fields, labels, crs, transform, res_m, params)


def write_scene(scene: Scene, out_dir: Path) -> dict[str, Path]:
    """Write ``image.tif`` (RGB uint8, nodata 0) and ``labels.gpkg`` (layer "labels") into ``out_dir``."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = geo.write_geotiff(
        out_dir / "image.tif", scene.image.transpose(2, 0, 1), scene.crs, scene.transform, nodata=0
    )
    labels = geo.write_vector(scene.labels, out_dir / "labels.gpkg", layer="labels")
    return {"image": image, "labels": labels}


def scene_plan(countries: list[str], n_per_country: int) -> list[tuple[str, str, int]]:
    """(scene_id, country, index) for every scene of a generated dataset, e.g. ``vn0, vn1, kh0, ...``."""
    plan = []
    for country in countries:
        if country not in COUNTRIES:
            raise ValueError(f"unknown country {country!r}; choose from {sorted(COUNTRIES)}")
        plan += [(f"{COUNTRIES[country].code}{k}", country, k) for k in range(n_per_country)]
    return plan


def scene_origin(country: str, index: int, size: int, res_m: float) -> tuple[float, float]:
    """Scenes of one country sit side by side, 2 km apart, so they never overlap."""
    e, n = COUNTRIES[country].origin
    return e + index * (size * res_m + 2000.0), n


def generate_sources(
    scenes_dir,
    countries: list[str],
    n_per_country: int,
    size: int = 1024,
    res_m: float = 0.8,
    seed: int = 0,
    difficulty: Difficulty | dict | None = None,
    log=print,
) -> list:
    """Generate and write every scene; returns ``manifest.SceneSource`` rows, like a downloaded dataset."""

    if isinstance(difficulty, dict):
        difficulty = Difficulty(**difficulty)
    sources = []
    for scene_id, country, k in scene_plan(countries, n_per_country):
        scene = generate_scene(
            scene_id, country, size, res_m, seed, difficulty, scene_origin(country, k, size, res_m)
        )
        paths = write_scene(scene, files.safe_path(scenes_dir, scene_id, what="scene id"))
        log(
            f"{scene_id} ({country}, {scene.crs}): {int(scene.fields.max())} fields, {len(scene.labels)} polygons"
        )
        sources.append(SceneSource(scene_id, country, paths["image"], paths["labels"], "labels", "class", {}))
    return sources
