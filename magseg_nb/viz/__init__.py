"""Figures (matplotlib) and maps (leafmap), one module per stage: dataset, formats, training, inference, metrics, maps."""

from pathlib import Path


def save(fig, folder, name: str) -> Path:
    """Save a figure as PNG into ``folder`` (created) and return the path; the figure stays open to show."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
