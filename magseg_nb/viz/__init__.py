"""Figures (matplotlib) and maps (leafmap), one module per stage: dataset, formats, training, inference, metrics, maps."""
