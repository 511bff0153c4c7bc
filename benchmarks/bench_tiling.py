"""Tiling + rasterizing a large generated scene vs. the raw rasterio read of the same GeoTIFF, and
scenes prepared in parallel processes vs. one after another.

    .venv/bin/python benchmarks/bench_tiling.py                 # 8192 x 8192 px scene (several minutes)
    .venv/bin/python benchmarks/bench_tiling.py --size 4096     # 4 sub-scenes: also the parallel speed-up
    .venv/bin/python benchmarks/bench_tiling.py --size 2048     # quick (one scene, no parallel part)

The scene is a mosaic of generated sub-scenes (at most 2048 px each, written window by window into
one GeoTIFF, so no 8192 px array is ever generated in one piece); each sub-scene is also kept as a
scene of its own. Then, in one run on the same machine:

1. raw read: rasterio reads every tile window of the RGB image (what any tiler has to pay);
2. notebook 01's path: ``geo.prepare_scene`` (read, check, rasterize semantic/boundary/instance masks
   for the whole scene, write them) + ``geo.scan_tiles`` + ``geo.write_tiles`` (every tile's image and
   3-band mask GeoTIFF);
3. the floor of step 2's tile files: the same two GeoTIFFs per tile written from arrays already in
   memory (no reads, no masks), which bounds how close to the raw read any path writing them can get;
4. the rasterizer before and after the speed-up on the same scene and labels, in memory, alternated
   (old, new, old, new, ...; ``--repeats`` pairs, medians): ``rasterize_reference.reference_rasterize``
   (the previous ``geo.rasterize_labels``, kept verbatim) vs ``geo.rasterize_labels``; their masks and
   reports are checked to be identical;
5. with more than one sub-scene: ``geo.prepare_scenes`` + ``geo.make_tiles`` on the sub-scenes with
   ``workers=1`` and ``workers=2``, their tiles per second and the speed-up.

It prints tiles per second and the ratios.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rasterize_reference beside this file

from rasterize_reference import reference_rasterize  # noqa: E402

from magseg_nb import geo, landscape  # noqa: E402


def build_mosaic(
    folder: Path, size: int, res_m: float, seed: int, country: str = "india"
) -> tuple[Path, Path]:
    """A ``size`` x ``size`` px scene as a mosaic of generated sub-scenes; returns (image, labels) paths."""
    sub = min(size, 2048)
    if size % sub:
        raise SystemExit(f"--size {size} must be a multiple of {sub}")
    e0, n0 = landscape.COUNTRIES[country].origin
    style_crs = f"EPSG:{landscape.COUNTRIES[country].epsg}"
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / "image.tif"
    profile = {"driver": "GTiff", "height": size, "width": size, "count": 3, "dtype": "uint8", "nodata": 0,
               "crs": style_crs, "transform": from_origin(e0, n0, res_m, res_m), "compress": "deflate",
               "tiled": True, "blockxsize": 256, "blockysize": 256, "photometric": "RGB"}  # fmt: skip
    parts = []
    with rasterio.open(image_path, "w", **profile) as dst:
        for i in range(size // sub):
            for j in range(size // sub):
                origin = (e0 + j * sub * res_m, n0 - i * sub * res_m)
                s = landscape.generate_scene(f"m{i}_{j}", country, sub, res_m, seed, origin=origin)
                dst.write(s.image.transpose(2, 0, 1), window=Window(j * sub, i * sub, sub, sub))
                labels = s.labels.copy()
                labels.loc[labels.field_id > 0, "field_id"] += (i * (size // sub) + j) * 1_000_000
                parts.append(labels)
                scene_dir = folder / "sub" / f"m{i}_{j}"
                geo.write_geotiff(scene_dir / "image.tif", s.image.transpose(2, 0, 1), style_crs, s.transform,
                                  nodata=0)  # fmt: skip
                geo.write_vector(labels, scene_dir / "labels.gpkg")
                print(f"  generated sub-scene {i},{j}: {int(s.fields.max())} fields", flush=True)
    labels = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), crs=style_crs)
    return image_path, geo.write_vector(labels, folder / "labels.gpkg")


def write_floor(folder: Path, run01: Path, tiles: pd.DataFrame) -> float:
    """Seconds to write each tile's image.tif and masks.tif from arrays already in memory."""
    with rasterio.open(run01 / "tiles" / tiles.tile_id.iloc[0] / "image.tif") as src:
        image, crs, transform = src.read(), src.crs, src.transform
    with rasterio.open(run01 / "tiles" / tiles.tile_id.iloc[0] / "masks.tif") as src:
        masks = src.read()
    image_profile = geo.geotiff_profile(image.shape, image.dtype, crs, transform, 0)
    mask_profile = geo.geotiff_profile(masks.shape, masks.dtype, crs, transform)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for k in range(len(tiles)):
        with rasterio.open(folder / f"{k}_image.tif", "w", **image_profile) as dst:
            dst.write(image)
        with rasterio.open(folder / f"{k}_masks.tif", "w", **mask_profile) as dst:
            dst.write(masks)
    return time.perf_counter() - t0


def old_vs_new_rasterizer(image: Path, labels_path: Path, repeats: int) -> dict:
    """Seconds of the previous and the current ``rasterize_labels`` on the same scene, alternated."""
    with rasterio.open(image) as src:
        data, crs, transform, shape = src.read(), src.crs, src.transform, src.shape
    valid = ~(data == 0).all(axis=0)  # as prepare_scene: the mosaic's nodata is 0
    del data
    labels, _ = geo.read_labels(labels_path, crs)
    times = {"old": [], "new": []}
    for _ in range(repeats):
        for name, fn in (("old", reference_rasterize), ("new", geo.rasterize_labels)):
            t0 = time.perf_counter()
            masks = fn(labels, shape, transform, valid)
            times[name].append(time.perf_counter() - t0)
            if name == "old":
                old = masks
    for key in ("semantic", "boundary", "instances"):
        if not np.array_equal(getattr(old, key), getattr(masks, key)):
            raise SystemExit(f"old and new rasterizer disagree on {key}")
    if old.report != masks.report:
        raise SystemExit(f"old and new rasterizer reports differ: {old.report} vs {masks.report}")
    old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
    return {"rasterize_repeats": repeats, "rasterize_old_s": round(old_s, 2), "rasterize_new_s": round(new_s, 2),
            "rasterize_old_over_new": round(old_s / new_s, 2)}  # fmt: skip


def parallel_scenes(folder: Path, tile: int, overlap: int) -> dict:
    """Notebook 01's path on the sub-scenes with 1 and 2 worker processes; identical tiles.csv checked."""
    from magseg_nb.manifest import SceneSource

    sources = [SceneSource(d.name, "india", d / "image.tif", d / "labels.gpkg", None, "class", {})
               for d in sorted((folder / "sub").iterdir())]  # fmt: skip
    out, tables = {"n_scenes": len(sources)}, {}
    for workers in (1, 2):
        run01 = folder / f"parallel_w{workers}"
        t0 = time.perf_counter()
        scenes = geo.prepare_scenes(sources, run01 / "scenes", log=lambda *_: None, workers=workers)
        tiles, _ = geo.make_tiles(run01, scenes, tile, overlap, tile * 4, workers=workers)
        seconds = time.perf_counter() - t0
        tables[workers] = (run01 / "tiles.csv").read_bytes()
        out.update({"n_scene_tiles": len(tiles), f"workers{workers}_s": round(seconds, 2),
                    f"workers{workers}_tiles_per_s": round(len(tiles) / seconds, 1)})  # fmt: skip
    if tables[1] != tables[2]:
        raise SystemExit("workers=1 and workers=2 gave different tiles.csv")
    out["speedup_2_workers"] = round(out["workers1_s"] / out["workers2_s"], 2)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=8192, help="scene side in px (default 8192)")
    parser.add_argument("--tile", type=int, default=256, help="tile side in px (default 256)")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap in px (default 32)")
    parser.add_argument("--res", type=float, default=0.8, help="metres per pixel (default 0.8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="old/new rasterizer pairs (default 2)")
    parser.add_argument("--keep", help="keep the files in this folder instead of a temporary one")
    args = parser.parse_args(argv)

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_tiling_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        image, labels = build_mosaic(folder / "src", args.size, args.res, args.seed)
        t_gen = time.perf_counter() - t0
        starts = geo.tile_starts(args.size, args.tile, args.overlap)
        windows = [Window(c, r, args.tile, args.tile) for r in starts for c in starts]

        t0 = time.perf_counter()
        with rasterio.open(image) as src:
            checksum = sum(int(src.read(window=w)[0, 0, 0]) for w in windows)
        t_raw = time.perf_counter() - t0

        run01 = folder / "run01"
        t0 = time.perf_counter()
        out = geo.prepare_scene(image, labels, run01 / "scenes" / "s0")
        t_rasterize = time.perf_counter() - t0
        t0 = time.perf_counter()
        tiles, rep = geo.scan_tiles(run01 / "scenes" / "s0", "s0", "india", args.tile, args.overlap)
        tiles["block_id"], tiles["split"] = "s0", "train"
        geo.write_tiles(run01, tiles)
        t_tiles = time.perf_counter() - t0
        n = len(windows)
        raw_tps = n / t_raw
        full_tps = len(tiles) / (t_rasterize + t_tiles)
        t_floor = write_floor(folder / "floor", run01, tiles)
        floor_tps = len(tiles) / t_floor
        old_new = old_vs_new_rasterizer(image, labels, args.repeats)
        parallel = (
            parallel_scenes(folder / "src", args.tile, args.overlap)
            if (folder / "src" / "sub" / "m0_1").exists()
            else {}
        )
        result = {
            "size_px": args.size, "tile_px": args.tile, "overlap_px": args.overlap, "n_tiles": n,
            "n_fields": out["report"]["n_fields"], "n_polygons": out["report"]["n_polygons"],
            "generate_s": round(t_gen, 1), "raw_read_s": round(t_raw, 2), "rasterize_s": round(t_rasterize, 2),
            "tile_write_s": round(t_tiles, 2), "raw_read_tiles_per_s": round(raw_tps, 1),
            "tiling_rasterizing_tiles_per_s": round(full_tps, 1), "ratio_raw_over_full": round(raw_tps / full_tps, 2),
            "write_floor_tiles_per_s": round(floor_tps, 1), "ratio_raw_over_write_floor": round(raw_tps / floor_tps, 2),
            "checksum": checksum, **old_new, **parallel,
        }  # fmt: skip
        print(f"scene {args.size}x{args.size} px, {n} tiles of {args.tile} px (overlap {args.overlap}), "
              f"{result['n_polygons']} polygons, {result['n_fields']} fields")  # fmt: skip
        print(f"raw rasterio read of the tile windows : {raw_tps:8.1f} tiles/s ({t_raw:.2f} s)")
        print(f"rasterize masks + tile + write (01)   : {full_tps:8.1f} tiles/s "
              f"({t_rasterize:.2f} s rasterize, {t_tiles:.2f} s tiles)")  # fmt: skip
        print(f"ratio raw / full                      : {raw_tps / full_tps:8.2f}x")
        print(f"only writing the tile files (floor)   : {floor_tps:8.1f} tiles/s, raw / floor "
              f"{raw_tps / floor_tps:.2f}x")  # fmt: skip
        print(f"rasterizer old / new (same scene)     : {old_new['rasterize_old_over_new']:8.2f}x "
              f"({old_new['rasterize_old_s']} s vs {old_new['rasterize_new_s']} s, median of {args.repeats})")  # fmt: skip
        if parallel:
            print(f"{parallel['n_scenes']} scenes, {parallel['n_scene_tiles']} tiles, workers=1: "
                  f"{parallel['workers1_tiles_per_s']} tiles/s ({parallel['workers1_s']} s); workers=2: "
                  f"{parallel['workers2_tiles_per_s']} tiles/s ({parallel['workers2_s']} s); speed-up "
                  f"{parallel['speedup_2_workers']}x")  # fmt: skip
        return result
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
