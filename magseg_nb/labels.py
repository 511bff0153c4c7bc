"""The class vocabulary shared by masks, text grids, metrics and maps."""

CLASSES: tuple[str, ...] = ("others", "field", "tree", "water")
CLASS_IDS: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
NODATA = 255

# Map colours (RGB) used by every figure and map, so a class looks the same everywhere.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "others": (190, 190, 190),
    "field": (230, 200, 60),
    "tree": (30, 120, 40),
    "water": (40, 110, 220),
}
