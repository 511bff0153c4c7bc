"""Tiling + rasterizing a large generated scene vs. the raw rasterio read of the same GeoTIFF.

    .venv/bin/python benchmarks/bench_tiling.py                 # 8192 x 8192 px scene (a few minutes)
    .venv/bin/python benchmarks/bench_tiling.py --size 2048     # quick

The scene is a mosaic of generated sub-scenes (at most 2048 px each, written window by window into
one GeoTIFF, so no 8192 px array is ever generated in one piece). Then, on the same file:

1. raw read: rasterio reads every tile window of the RGB image (what any tiler has to pay);
2. notebook 01's path: ``geo.prepare_scene`` (read, check, rasterize semantic/boundary/instance masks
   for the whole scene, write them) + ``geo.scan_tiles`` + ``geo.write_tiles`` (every tile's image and
   3-band mask GeoTIFF).

It prints tiles per second for both and their ratio (how many times slower the full path is than a raw
read). Both are measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from magseg_nb import geo, landscape


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
                print(f"  generated sub-scene {i},{j}: {int(s.fields.max())} fields", flush=True)
    labels = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), crs=style_crs)
    return image_path, geo.write_vector(labels, folder / "labels.gpkg")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=8192, help="scene side in px (default 8192)")
    parser.add_argument("--tile", type=int, default=256, help="tile side in px (default 256)")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap in px (default 32)")
    parser.add_argument("--res", type=float, default=0.8, help="metres per pixel (default 0.8)")
    parser.add_argument("--seed", type=int, default=0)
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
        result = {
            "size_px": args.size, "tile_px": args.tile, "overlap_px": args.overlap, "n_tiles": n,
            "n_fields": out["report"]["n_fields"], "n_polygons": out["report"]["n_polygons"],
            "generate_s": round(t_gen, 1), "raw_read_s": round(t_raw, 2), "rasterize_s": round(t_rasterize, 2),
            "tile_write_s": round(t_tiles, 2), "raw_read_tiles_per_s": round(raw_tps, 1),
            "tiling_rasterizing_tiles_per_s": round(full_tps, 1), "ratio_raw_over_full": round(raw_tps / full_tps, 2),
            "checksum": checksum,
        }  # fmt: skip
        print(f"scene {args.size}x{args.size} px, {n} tiles of {args.tile} px (overlap {args.overlap}), "
              f"{result['n_polygons']} polygons, {result['n_fields']} fields")  # fmt: skip
        print(f"raw rasterio read of the tile windows : {raw_tps:8.1f} tiles/s ({t_raw:.2f} s)")
        print(f"rasterize masks + tile + write (01)   : {full_tps:8.1f} tiles/s "
              f"({t_rasterize:.2f} s rasterize, {t_tiles:.2f} s tiles)")  # fmt: skip
        print(f"ratio raw / full                      : {raw_tps / full_tps:8.2f}x")
        return result
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
