"""Atomic file writes: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write (file or folder, same suffix, so GDAL and pandas pick
    the same format); renamed over ``path`` when the block succeeds, removed when it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        move(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def move(src: str | Path, dest: str | Path) -> Path:
    """Rename ``src`` to ``dest`` in one step, replacing what is there (a folder via :func:`replace_dir`)."""
    if Path(src).is_dir():
        return replace_dir(src, dest)
    os.replace(src, dest)
    return Path(dest)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary sibling, then rename it over ``path``."""
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, sort_keys: bool = False) -> Path:
    """``obj`` as indented JSON (numpy values allowed), written atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=json_default))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line (numpy values allowed), written atomically."""
    return write_text(path, "".join(json.dumps(r, default=json_default) + "\n" for r in rows))


def replace_dir(src: str | Path, dest: str | Path) -> Path:
    """Move the finished folder ``src`` to ``dest``, replacing an older ``dest``: a reader finds the
    old folder, nothing, or the whole new one, never a half-written one under ``dest``'s name."""
    src, dest = Path(src), Path(dest)
    if dest.exists():
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)
    return dest


# --- hashes ----------------------------------------------------------------------------------------


def sha256_file(path: str | Path, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file (SHA-256 unless ``algo`` says otherwise), read in chunks."""

    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys; unknown types as text)."""

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --- names from outside that become paths ---------------------------------------------------------

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}")


class UnsafeNameError(ValueError):
    """An identifier from a manifest, a dataset or a profile cannot be used as a file or folder name."""


def safe_id(value: Any, what: str = "identifier") -> str:
    """``value`` when it is a plain file-name component, else :class:`UnsafeNameError`.

    Allowed: letters, digits and ``. _ + = -``, starting with a letter or digit, at most 200
    characters. So ``..``, ``a/b``, absolute paths, backslashes, spaces, control characters and
    markup never become a path (or reach a page unescaped through a path).
    """
    text = str(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _SAFE_ID.fullmatch(text) or ".." in text:
        raise UnsafeNameError(
            f"{what} {value!r} cannot be used as a file name: use letters, digits and . _ + = - only "
            "(starting with a letter or digit, no '..')"
        )
    return text


def safe_path(root: str | Path, *parts: Any, what: str = "identifier") -> Path:
    """``root / part / ...`` with every part checked by :func:`safe_id`; the result is inside ``root``."""
    root = Path(root)
    path = root.joinpath(*(safe_id(p, what) for p in parts))
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:  # a symlinked folder pointing elsewhere
        raise UnsafeNameError(f"{what} path {path} resolves to {resolved}, outside {base}")
    return path
