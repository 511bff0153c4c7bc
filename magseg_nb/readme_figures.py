"""The README's two pictures: the demo's headline figure and the map screenshot, copied from a run.

``magseg_nb.report`` calls :func:`copy_readme_figures` when it rewrites the README's results section,
so the pictures always come from the same run as the numbers. The map screenshot is the one notebook
06 takes with headless Chromium (``viz.browser.browser_check``) as ``06_metrics/figures/map.png``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from magseg_nb import files

FIGURES = "06_metrics/figures"
HEADLINE = ("headline.png", "per_class_iou.png")  # the first that exists
MAP = "map.png"
DEST_NAMES = {"headline": "headline.png", "map": "map.png"}


def find_readme_figures(run_dir: Path) -> dict[str, Path]:
    """{"headline": path, "map": path} for the pictures that exist in a run folder."""
    figures = Path(run_dir) / FIGURES
    found = {}
    for name in HEADLINE:
        if (figures / name).is_file():
            found["headline"] = figures / name
            break
    if (figures / MAP).is_file():
        found["map"] = figures / MAP
    return found


def copy_readme_figures(run_dir: Path, dest_dir: Path) -> list[Path]:
    """Copy the headline figure and the map screenshot of ``run_dir`` into ``dest_dir`` (e.g.
    ``docs/figures/``) as ``headline.png`` and ``map.png``; returns the paths written.

    Raises FileNotFoundError naming what is missing when the run has neither picture (run notebook 06;
    the screenshot needs Chromium: ``bash scripts/setup.sh --browser``). A copy is atomic, and a
    picture that is unchanged is not rewritten (the README's diff stays quiet)."""
    found = find_readme_figures(run_dir)
    if not found:
        raise FileNotFoundError(
            f"no {' or '.join(HEADLINE)} and no {MAP} in {Path(run_dir) / FIGURES}: run notebook 06 "
            "(the map screenshot needs chromium: bash scripts/setup.sh --browser)"
        )
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, src in found.items():
        dst = dest_dir / DEST_NAMES[key]
        if not (dst.is_file() and dst.read_bytes() == src.read_bytes()):
            with files.atomic(dst) as tmp:
                shutil.copyfile(src, tmp)
        written.append(dst)
    return written
