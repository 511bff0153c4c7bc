"""The README's pictures are copied from the run folder that the results section comes from."""

from __future__ import annotations

import pytest

from magseg_nb.readme_figures import copy_readme_figures


def _png(path, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 4), colour).save(path)
    return path


def test_copies_headline_and_map(tmp_path):
    figs = tmp_path / "runs" / "demo" / "06_metrics" / "figures"
    head = _png(figs / "headline.png", "red")
    _png(figs / "per_class_iou.png", "blue")
    shot = _png(figs / "map.png", "green")
    dest = tmp_path / "docs" / "figures"
    written = copy_readme_figures(tmp_path / "runs" / "demo", dest)
    assert written == [dest / "headline.png", dest / "map.png"]
    assert (dest / "headline.png").read_bytes() == head.read_bytes()
    assert (dest / "map.png").read_bytes() == shot.read_bytes()
    # unchanged pictures are not rewritten; a new run's picture replaces the old one
    mtime = (dest / "map.png").stat().st_mtime_ns
    _png(figs / "headline.png", "white")
    copy_readme_figures(tmp_path / "runs" / "demo", dest)
    assert (dest / "map.png").stat().st_mtime_ns == mtime
    assert (dest / "headline.png").read_bytes() == (figs / "headline.png").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["headline.png", "map.png"]


def test_falls_back_to_per_class_iou_and_skips_a_missing_map(tmp_path):
    figs = tmp_path / "run" / "06_metrics" / "figures"
    per_class = _png(figs / "per_class_iou.png", "blue")
    written = copy_readme_figures(tmp_path / "run", tmp_path / "out")
    assert written == [tmp_path / "out" / "headline.png"]
    assert written[0].read_bytes() == per_class.read_bytes()


def test_a_run_without_figures_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebook 06"):
        copy_readme_figures(tmp_path / "empty", tmp_path / "out")
