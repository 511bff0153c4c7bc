"""Atomic file writes: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


def json_default(o: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays as Python values, anything else as text."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary sibling, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj: Any, sort_keys: bool = False) -> Path:
    """``obj`` as indented JSON (numpy values allowed), written atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=json_default))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line (numpy values allowed), written atomically."""
    return write_text(path, "".join(json.dumps(r, default=json_default) + "\n" for r in rows))
