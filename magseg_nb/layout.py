"""The run folder's file names: the one place they are spelled (CONTRIBUTING.md lists what each holds).

``runs/<profile>/<stage>/`` per stage; the names below are what stages write and later stages read.
"""

from __future__ import annotations

from pathlib import Path

from magseg_nb import files

# 01_dataset_prep
TILES_CSV = "tiles.csv"  # every tile: id, scene, window, block, split
SCENES_CSV = "scenes.csv"
SPLIT_CSV = "split.csv"
SCENE_FILES = {
    "image": "image.tif",
    "labels": "labels.gpkg",
    "semantic": "semantic.tif",
    "boundary": "boundary.tif",
    "instances": "instances.tif",
}
TILE_IMAGE, TILE_MASKS = "image.tif", "masks.tif"  # tiles/<tile_id>/: RGB; semantic, boundary, instance
BASELINE_DIR = "baseline"  # the watershed baseline: <scene_id>_instances.tif, also 05's image segments
BASELINE_TUNING = "baseline_tuning.csv"  # its sigma x h_rel grid scored on the validation tiles
# 03_sft / 04_grpo (one folder per format) and 05_inference (one folder per trained model)
ANSWERS = "answers.jsonl"
EVAL_JSON = "eval.json"
MASK_KINDS = ("coarse", "confidence", "refined", "instances")  # 05: <model>/<kind>/<scene>.tif
FIELDS_GPKG = "fields.gpkg"
FIELDS_PARQUET = "fields.parquet"
WHOLE_SCENE = "whole_scene"  # 05: <model>/whole_scene/: map-only predictions, never scored


def scene_dir(run01, scene_id: str) -> Path:
    """``01_dataset_prep/scenes/<scene_id>/`` (the id checked: it becomes a folder)."""
    return files.safe_path(run01, "scenes", scene_id, what="scene id")


def scene_file(run01, scene_id: str, kind: str) -> Path:
    """One of a scene's files (``SCENE_FILES``: image, labels, semantic, boundary, instances)."""
    return scene_dir(run01, scene_id) / SCENE_FILES[kind]


def baseline_instances(run01, scene_id: str) -> Path:
    """``01_dataset_prep/baseline/<scene_id>_instances.tif``: the watershed baseline's segments."""
    return Path(run01) / BASELINE_DIR / f"{files.safe_id(scene_id, 'scene id')}_instances.tif"


def mask_path(model_dir, kind: str, scene_id: str) -> Path:
    """``05_inference/<model>/<kind>/<scene_id>.tif`` for a kind in ``MASK_KINDS``."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; kinds: {MASK_KINDS}")
    return Path(model_dir) / kind / f"{files.safe_id(scene_id, 'scene id')}.tif"
