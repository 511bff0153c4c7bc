"""Helper package for the MAgSeg notebooks: data, text grids, training, inference, metrics, maps."""

__version__ = "0.1.0"
