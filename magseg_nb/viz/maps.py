"""An interactive leafmap (MapLibre) map of one scene that works offline as a single HTML file.

No basemap tiles, style, fonts or scripts come from the network: the style is a background colour
only, rasters are embedded as PNG data URIs placed at their true corners (after reprojection to
EPSG:4326), vectors are inline GeoJSON, and the MapLibre script is the one leafmap already inlines.
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from PIL import Image
from rasterio.features import rasterize
from rasterio.warp import Resampling, calculate_default_transform, reproject
from shapely.geometry import box

from magseg_nb import files, layout
from magseg_nb.evaluation import read_raster
from magseg_nb.labels import CLASS_COLORS, CLASSES, NODATA
from magseg_nb.metrics import scene_tables

TEST_TILES = "test tiles (scored)"
TEST_TILE_COLOUR = "#00e5ff"
BACKGROUND_STYLE = {
    "version": 8,
    "sources": {},
    "layers": [{"id": "background", "type": "background", "paint": {"background-color": "#f2f2ee"}}],
}
# Resource loads that would need the network: tags with src/href, CSS url(), and style keys.
_NETWORK = re.compile(
    r"""<script[^>]+src\s*=\s*["']?https?://|<link[^>]+href\s*=\s*["']?https?://|<img[^>]+src\s*=\s*["']?https?://"""
    r"""|url\(\s*["']?https?://|"(?:tiles|url|glyphs|sprite)"\s*:\s*\[?\s*"https?://""",
    re.IGNORECASE,
)


def to_wgs84(path: Path, max_size: int = 2048, resampling: str = "nearest"):
    """Reproject a GeoTIFF to EPSG:4326: (array (bands,H,W), [west, south, east, north], nodata)."""
    with rasterio.open(path) as src:
        if src.crs is None:
            raise ValueError(
                f"{path} has no CRS: write it with the scene's CRS so it can be placed on the map"
            )
        scale = max(1.0, max(src.width, src.height) / max_size)  # keep the embedded PNG small
        transform, width, height = calculate_default_transform(
            src.crs,
            "EPSG:4326",
            src.width,
            src.height,
            *src.bounds,
            dst_width=int(src.width / scale),
            dst_height=int(src.height / scale),
        )
        fill = src.nodata if src.nodata is not None else 0
        out = np.full((src.count, height, width), fill, dtype=src.dtypes[0])
        reproject(
            rasterio.band(src, list(range(1, src.count + 1))),
            out,
            dst_transform=transform,
            dst_crs="EPSG:4326",
            resampling=Resampling[resampling],
            dst_nodata=fill,
        )
    west, north = transform.c, transform.f
    east, south = west + transform.a * width, north + transform.e * height
    return out, [west, south, east, north], src.nodata


def _png_data_uri(rgba: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _webp_data_uri(rgba: np.ndarray, quality: int = 80) -> str:
    """Photographic imagery as lossy WebP with alpha: a tenth of the PNG's size (map.html stays small)."""
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="WEBP", quality=quality, method=6)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()


def class_rgba(mask: np.ndarray, alpha: int = 170) -> np.ndarray:
    """Class ids -> RGBA with the project colours; NODATA (and ids outside the classes) transparent."""
    lut = np.zeros((256, 4), np.uint8)
    for i, name in enumerate(CLASSES):
        lut[i, :3], lut[i, 3] = CLASS_COLORS[name], alpha
    lut[NODATA] = 0
    return lut[np.asarray(mask, np.uint8)]


def _corners(bounds):
    west, south, east, north = bounds
    return [[west, north], [east, north], [east, south], [west, south]]


def add_image_layer(
    m,
    layer_id: str,
    rgba: np.ndarray,
    bounds,
    visible: bool = True,
    opacity: float = 1.0,
    photo: bool = False,
):
    """An RGBA array as a MapLibre image source at its lon/lat bounds, shown as a raster layer
    (``photo``: lossy WebP for imagery; class masks stay lossless PNG)."""
    url = _webp_data_uri(rgba) if photo else _png_data_uri(rgba)
    m.add_source(layer_id, {"type": "image", "url": url, "coordinates": _corners(bounds)})
    m.add_layer(
        {"id": layer_id, "type": "raster", "source": layer_id, "paint": {"raster-opacity": opacity}},
        visible=visible,
    )


POPUP = ("truth_class", "predicted_class", "iou")  # the only properties a field carries into the page
POPUP_TEMPLATE = (  # triple braces: the values are escaped once, in _popup_gdf
    "truth class: <b>{{{truth_class}}}</b><br>predicted class: <b>{{{predicted_class}}}</b><br>IoU: {{iou}}"
)


def _popup_gdf(gdf, keep, simplify_m: float = 0.0, precision_deg: float = 1e-6):
    """WGS84 copy with only the ``keep`` columns, floats rounded to 2 decimals and text escaped; outlines
    simplified by ``simplify_m`` (in the scene's metric CRS: one pixel turns the polygonised staircases
    into straight edges, a third of the vertices) and coordinates kept to ``precision_deg`` (~0.1 m)."""
    out = gdf[[c for c in keep if c in gdf.columns] + ["geometry"]].copy()
    if simplify_m and out.crs is not None and out.crs.is_projected:
        out["geometry"] = out.geometry.simplify(simplify_m)
    out = out.to_crs("EPSG:4326")
    out["geometry"] = shapely.set_precision(out.geometry.values, precision_deg)
    out = out[~(out.geometry.is_empty | out.geometry.isna())]
    for col in out.columns:
        if col != "geometry" and out[col].dtype.kind == "f":
            out[col] = out[col].round(2)
        elif col != "geometry" and out[col].dtype.kind not in "iub":  # text from the data: escaped
            out[col] = out[col].map(lambda v: v if v is None else html_lib.escape(str(v)))
    return out


def _matched(table, other, id_column: str, class_columns: tuple[str, ...], missing: str):
    """The class of each row's match in ``other`` (``match_id`` -> ``id_column``), ``missing`` for
    match_id 0, "?" when the tables cannot say."""
    col = next((c for c in class_columns if other is not None and c in other), None)
    if col is None or "match_id" not in table or id_column not in other:
        return "?"
    look = other.drop_duplicates(id_column).set_index(id_column)[col].astype(str)
    return table["match_id"].map(look).fillna(missing)


def popup_fields(gt_fields, pred_fields):
    """The two field sets with exactly the popup columns truth_class, predicted_class and iou.

    Ground truth: ``truth_class`` (else its ``class``); ``predicted_class`` (else the class of the
    matched prediction, ``match_id`` -> ``instance_id``); ``iou``. Predictions: ``predicted_class``
    (else its ``class``); ``truth_class`` (else the class of the matched field, ``match_id`` ->
    ``field_id``); ``iou``. "no match" where match_id is 0, "?" where nothing says. Either may be None.
    """
    out = []
    for gdf, other, own, theirs, id_column in (
        (gt_fields, pred_fields, "truth_class", "predicted_class", "instance_id"),
        (pred_fields, gt_fields, "predicted_class", "truth_class", "field_id"),
    ):
        if gdf is None or len(gdf) == 0:
            out.append(None)
            continue
        g = gdf.copy()
        if own not in g:
            g[own] = g["class"].astype(str) if "class" in g else "?"
        if theirs not in g:
            g[theirs] = _matched(g, other, id_column, (theirs, "class"), "no match")
        if "iou" not in g:
            g["iou"] = "?"
        out.append(g[[*POPUP, "geometry"]])
    return tuple(out)


def add_field_set(m, name: str, gdf, colour: str, simplify_m: float) -> None:
    """One inline GeoJSON source drawn twice: an outline (``name``, in the layer switcher) and a nearly
    transparent fill (``name (click)``) that makes the whole polygon clickable for its popup."""
    source = f"{name} source"
    m.add_source(source, {"type": "geojson", "data": _popup_gdf(gdf, POPUP, simplify_m).__geo_interface__})
    click = f"{name} (click)"
    m.add_layer(
        {"id": click, "type": "fill", "source": source, "paint": {"fill-color": colour, "fill-opacity": 0.01}}
    )
    m.set_opacity(click, 0.01)
    m.add_popup(click, template=POPUP_TEMPLATE)
    m.add_layer(
        {"id": name, "type": "line", "source": source, "paint": {"line-color": colour, "line-width": 2}}
    )


def _pixel_m(path: Path) -> float:
    with rasterio.open(path) as src:
        return float(abs(src.transform.a)) if src.crs is not None and src.crs.is_projected else 0.0


def scene_map(
    image_path: Path,
    gt_fields,
    pred_fields,
    masks: dict[str, Path] | None = None,
    title: str = "",
    height: str = "600px",
    max_size: int = 2048,
    test_tiles=None,
    simplify_px: float = 1.0,
):
    """A leafmap MapLibre map of one scene: imagery, class masks (toggleable) and field polygons.

    ``gt_fields`` / ``pred_fields`` are GeoDataFrames (any CRS); a click on a field shows its truth
    class, predicted class and IoU (see :func:`popup_fields`; nothing else of the tables goes into
    the page). ``masks`` maps a layer name (e.g. "coarse", "refined") to a class-id GeoTIFF.
    ``test_tiles`` (a GeoDataFrame from :func:`tile_outlines`) are outlined as the scored test tiles.
    Rasters larger than ``max_size`` pixels are shrunk; imagery is WebP, masks are PNG, and field
    outlines are simplified by ``simplify_px`` image pixels, so a demo scene stays under 3 MB.
    """
    import leafmap.maplibregl as leafmap

    m = leafmap.Map(
        style=BACKGROUND_STYLE,
        use_message_queue=True,  # the widget state is replayed in the saved HTML
        controls={"navigation": "top-right", "scale": "bottom-left"},
        height=height,
        # leafmap's sidebars need ipyvuetify widgets that this ipyvuetify lacks; the plain
        # MapLibre widget shows inline in JupyterLab and has its own layer switcher.
        add_sidebar=False,
        add_floating_sidebar=False,
    )
    img, bounds, _ = to_wgs84(Path(image_path), max_size=max_size, resampling="bilinear")
    rgb = np.moveaxis(img[:3], 0, -1).astype(np.uint8)
    alpha = np.where(rgb.any(-1), 255, 0).astype(np.uint8)  # outside the rotated scene: transparent
    add_image_layer(m, "imagery", np.dstack([rgb, alpha]), bounds, photo=True)
    layer_ids = ["imagery"]
    for name, path in (masks or {}).items():
        arr, mbounds, _ = to_wgs84(Path(path), max_size=max_size)
        layer = html_lib.escape(name)
        add_image_layer(m, layer, class_rgba(arr[0]), mbounds, visible=name == list(masks)[-1])
        layer_ids.append(layer)
    simplify_m = simplify_px * _pixel_m(Path(image_path))
    gt, pred = popup_fields(gt_fields, pred_fields)
    for name, gdf, colour in (("ground truth", gt, "#ffffff"), ("predicted", pred, "#ff3df5")):
        if gdf is not None:
            add_field_set(m, name, gdf, colour, simplify_m)
            layer_ids.append(name)
    if test_tiles is not None and len(test_tiles):
        m.add_source(
            f"{TEST_TILES} source",
            {"type": "geojson", "data": _popup_gdf(test_tiles, ["tile_id", "scored"]).__geo_interface__},
        )
        m.add_layer(
            {
                "id": TEST_TILES,
                "type": "line",
                "source": f"{TEST_TILES} source",
                "paint": {"line-color": TEST_TILE_COLOUR, "line-width": 3, "line-dasharray": [2, 1]},
            }
        )
        m.add_popup(TEST_TILES)
        layer_ids.append(TEST_TILES)
    m.add_layer_control(layer_ids=layer_ids, position="top-left")
    m.add_legend(
        title=html_lib.escape(title or "classes"),  # scene ids come from the data: never raw markup
        legend_dict={
            **{n: "#{:02x}{:02x}{:02x}".format(*CLASS_COLORS[n]) for n in CLASSES},
            "ground-truth field": "#ffffff",
            "predicted field": "#ff3df5",
            **(
                {"scored test tile (outline)": TEST_TILE_COLOUR}
                if test_tiles is not None and len(test_tiles)
                else {}
            ),
            **(
                {"elsewhere: map only, not scored": "#f2f2ee"}
                if test_tiles is not None and len(test_tiles)
                else {}
            ),
        },
        position="bottom-right",
    )
    m.fit_bounds([[bounds[0], bounds[1]], [bounds[2], bounds[3]]], {"animate": False})
    return m


def network_loads(html: str) -> list[str]:
    """Resource loads in a page that would need the network (empty list = works offline)."""
    html = re.sub(r"<!--.*?-->", "", html, flags=re.S)
    return [html[max(0, m.start() - 40) : m.end() + 60] for m in _NETWORK.finditer(html)]


PAGE_STYLE = "<style>html, body {margin: 0; overflow: hidden}</style>"


def save_offline_html(m, path: Path, title: str = "MAgSeg predictions") -> Path:
    """Write the map as one self-contained HTML file (atomic) and check it loads nothing remote."""
    html = m.to_html(title=html_lib.escape(title), height="100vh")  # the template does not escape
    # leafmap leaves the CDN MapLibre tags commented out (the bundle already holds MapLibre): drop them.
    html = re.sub(r"<!--.*?-->", "", html, flags=re.S)
    # The map div is 100vh tall; with the body's default 8 px margin the page scrolls and a
    # scrollbar narrows and shifts the map.
    html = html.replace("</title>", "</title>\n" + PAGE_STYLE, 1)
    problems = network_loads(html)
    if problems:
        raise ValueError(f"the map for {path} would load resources from the network: {problems[:3]}")
    return files.write_text(path, html)


def attach_matches(gt_fields, pred_fields, field_tab, pred_tab):
    """Copies of the field polygons with the popup columns ``area_m2``, ``iou`` and ``match_id``.

    ``gt_fields`` has ``field_id`` (labels.gpkg; non-fields, field_id 0, are dropped) and
    ``pred_fields`` has ``instance_id`` (05's fields.gpkg); the tables come from
    :func:`magseg_nb.metrics.scene_tables`. IoU is 0 and match_id 0 where a polygon has no match.
    """
    gt = gt_fields[gt_fields["field_id"] > 0].copy()
    gt["area_m2"] = gt.geometry.area
    look = field_tab.set_index("gt_id")
    gt["iou"] = gt["field_id"].map(look["iou"]).fillna(0.0)
    gt["match_id"] = gt["field_id"].map(look["pred_id"]).fillna(0).astype(int)
    pred = pred_fields.copy()
    look = pred_tab.set_index("pred_id")
    pred["iou"] = pred["instance_id"].map(look["iou"]).fillna(0.0)
    pred["match_id"] = pred["instance_id"].map(look["gt_id"]).fillna(0).astype(int)
    return gt, pred


def tile_outlines(tiles, transform, crs, label: str = "test tile: scored in 06"):
    """Tile rectangles (rows of tiles.csv: row_off, col_off, height, width) in the scene's CRS."""
    geoms = []
    for t in tiles.itertuples(index=False):
        c0, r0 = int(t.col_off), int(t.row_off)
        c1, r1 = c0 + int(t.width), r0 + int(t.height)
        x0, y0 = (
            transform.c + transform.a * c0 + transform.b * r0,
            transform.f + transform.d * c0 + transform.e * r0,
        )
        x1, y1 = (
            transform.c + transform.a * c1 + transform.b * r1,
            transform.f + transform.d * c1 + transform.e * r1,
        )
        geoms.append(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    return gpd.GeoDataFrame(
        {"tile_id": list(tiles["tile_id"].astype(str)), "scored": label}, geometry=geoms, crs=crs
    )


def add_predicted_class(gdf, pred_semantic: np.ndarray, transform, class_column: str = "class"):
    """Copy of ``gdf`` with ``truth_class`` (its ``class_column``) and ``predicted_class``: the class the
    prediction gives most of the polygon's pixels ("not predicted" where it has no prediction)."""
    out = gdf.copy()
    pred = np.asarray(pred_semantic)
    index = rasterize(
        ((geom, i + 1) for i, geom in enumerate(out.geometry) if geom is not None and not geom.is_empty),
        out_shape=pred.shape,
        transform=transform,
        fill=0,
        dtype="int32",
    )
    valid = (index > 0) & (pred != NODATA)
    counts = np.zeros((len(out) + 1, len(CLASSES)), np.int64)
    np.add.at(counts, (index[valid], np.minimum(pred[valid], len(CLASSES) - 1)), 1)
    names = np.array(CLASSES)
    predicted = np.where(counts[1:].sum(1) > 0, names[counts[1:].argmax(1)], "not predicted")
    out["truth_class"] = out[class_column].astype(str) if class_column in out else "?"
    out["predicted_class"] = predicted
    return out


def default_scene(variant_dir: Path, test_tiles) -> str:
    """The scene 05 predicted whole for the map, else the first scene with scored test tiles."""
    whole = sorted((Path(variant_dir) / layout.WHOLE_SCENE / "refined").glob("*.tif"))
    return whole[0].stem if whole else str(test_tiles["scene_id"].iloc[0])


def prediction_folder(variant_dir: Path, scene_id: str) -> Path:
    """Where the map reads a scene's masks and fields: the whole-scene prediction when 05 made one
    (test tiles as scored, the rest map-only), else the scored test-tile outputs."""
    whole = Path(variant_dir) / layout.WHOLE_SCENE
    return whole if (layout.mask_path(whole, "refined", scene_id)).exists() else Path(variant_dir)


def run_scene_map(
    run01, variant_dir, tiles, scene_id: str = "", iou_threshold: float = 0.5, max_px: int = 2048
):
    """06's map of one scene of a 05 variant: imagery, coarse/refined masks, truth and predicted fields
    with their matches, and the scored test tiles outlined. Returns (map, scene_id, whole_scene)."""
    run01, variant_dir = Path(run01), Path(variant_dir)
    scene_id = scene_id or default_scene(variant_dir, tiles)
    src = prediction_folder(variant_dir, scene_id)  # whole_scene/ when 05 predicted the whole scene
    scene = run01 / "scenes" / scene_id
    gt_inst, gt_prof = read_raster(scene / "instances.tif")
    pred_inst, _ = read_raster(layout.mask_path(src, "instances", scene_id))
    pred_sem, _ = read_raster(layout.mask_path(src, "refined", scene_id))
    tabs = scene_tables(
        gt_inst, pred_inst, pred_sem, iou_threshold, pixel_area_m2=gt_prof["transform"].a ** 2
    )
    gt_gdf = gpd.read_file(scene / "labels.gpkg", layer="labels")
    pred_gdf = gpd.read_file(src / layout.FIELDS_GPKG, layer="fields")
    gt_fields, pred_fields = attach_matches(gt_gdf, pred_gdf[pred_gdf["scene_id"] == scene_id], *tabs)
    gt_fields = add_predicted_class(gt_fields, pred_sem, gt_prof["transform"])
    masks = {
        k: src / k / f"{scene_id}.tif"
        for k in ("coarse", "refined")
        if (src / k / f"{scene_id}.tif").exists()
    }
    scored = tile_outlines(tiles[tiles["scene_id"].astype(str) == scene_id], gt_prof["transform"], gt_gdf.crs)
    title = f"{scene_id} · {variant_dir.name}"
    m = scene_map(
        scene / "image.tif", gt_fields, pred_fields, masks, title=title, max_size=max_px, test_tiles=scored
    )
    return m, scene_id, src != variant_dir
