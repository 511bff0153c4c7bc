"""The one mapping between class masks and text: a plain label grid, or row-wise run-length encoding.

Plain (one row per line, cells separated by ``|``)::

    field|field|tree
    others|field|field

Row-wise R-RLE as in Text4Seg (runs separated by ``| ``)::

    field *2| tree *1
    others *1| field *2

Decoding never raises on model text: it recovers what it can, fills what it cannot with class 0
(``others``) and reports every repair, so rewards and metrics can count malformed answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from magseg_nb.labels import CLASS_IDS, CLASSES

ENCODINGS = ("plain", "rle")

# A cell: a label, optionally followed by "*<count>" (count may be garbage; checked later).
_CELL = re.compile(r"^\s*([A-Za-z_][A-Za-z_\-]*)\s*(?:\*\s*(\S*))?\s*$")


@dataclass
class RepairReport:
    """What decoding had to fix. ``valid`` is True iff nothing was repaired."""

    valid: bool = True
    repairs: list[str] = field(default_factory=list)
    repaired_fraction: float = 0.0  # share of the grid's cells affected by a repair, in [0, 1]
    parsed: bool = True  # False when no grid row at all was found in the text

    def as_dict(self) -> dict:
        return {
            "valid": self.valid,
            "repairs": list(self.repairs),
            "repaired_fraction": self.repaired_fraction,
            "parsed": self.parsed,
        }


@dataclass
class Decoded:
    mask: np.ndarray  # (h, w) class ids
    report: RepairReport


def _check_encoding(encoding: str, allow_auto: bool = False) -> None:
    allowed = ENCODINGS + (("auto",) if allow_auto else ())
    if encoding not in allowed:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(allowed)}")


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(value, length) runs of a 1-D array."""
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    lengths = np.diff(np.r_[starts, len(row)])
    return [(int(row[s]), int(n)) for s, n in zip(starts, lengths, strict=True)]


def encode(mask, encoding: str = "plain") -> str:
    """Text for a (h, w) mask of class ids (0..len(CLASSES)-1)."""
    _check_encoding(encoding)
    mask = np.asarray(mask)
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"encode needs a non-empty 2-D mask, got shape {mask.shape}")
    bad = np.setdiff1d(np.unique(mask), np.arange(len(CLASSES)))
    if bad.size:
        raise ValueError(
            f"mask holds ids {bad.tolist()} outside the classes 0..{len(CLASSES) - 1} {CLASSES}; "
            "map NODATA to a class first (prompts.downsample_mask does)"
        )
    if encoding == "plain":
        return "\n".join("|".join(CLASSES[v] for v in row) for row in mask.tolist())
    return "\n".join("| ".join(f"{CLASSES[v]} *{n}" for v, n in _runs(row)) for row in mask)


# A longer count is a runaway digit string: expanding it would exhaust memory (10**20 cells raised OverflowError).
MAX_COUNT_DIGITS = 4


def _parse_cell(text: str):
    """(label, count, problem, is_run) for one cell, or None when it is not a cell at all."""
    m = _CELL.match(text)
    if not m:
        return None
    label, count = m.group(1), m.group(2)
    if count is None:
        return label, 1, None, False
    if len(count) > MAX_COUNT_DIGITS:
        return label, 1, f"bad run count {count[:MAX_COUNT_DIGITS]!r}... ({len(count)} digits)", True
    if count.isdigit() and int(count) > 0:
        return label, int(count), None, True
    return label, 1, f"bad run count {count!r}", True


def _row_cells(line: str):
    """Parsed cells of a line, or None when the line is not a grid row (prose, code fences)."""
    parts = line.split("|")
    cells = [_parse_cell(p) for p in parts if p.strip()]
    if not cells:
        return None
    known = sum(1 for c in cells if c and c[0].lower() in CLASS_IDS)
    matched = sum(1 for c in cells if c)
    if known == 0 and ("|" not in line or matched * 2 < len(cells)):
        return None
    if matched * 2 < len(cells):
        return None
    empty = sum(1 for p in parts[1:-1] if not p.strip()) + (not parts[0].strip() and len(parts) > 1)
    return cells, empty


def decode(text, shape, encoding: str = "auto") -> Decoded:
    """Recover a mask of ``shape`` from (possibly malformed) model text; never raises on the text."""
    _check_encoding(encoding, allow_auto=True)
    h, w = (int(s) for s in shape)
    if h <= 0 or w <= 0:
        raise ValueError(f"shape must be positive, got {shape}")
    text = text if isinstance(text, str) else ""
    repairs: list[str] = []
    rows, dropped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        parsed = _row_cells(line)
        if parsed is None:
            dropped += 1
        else:
            rows.append(parsed)
    mask = np.zeros((h, w), dtype=np.uint8)
    if not rows:
        what = "empty text" if not text.strip() else f"{dropped} line(s) of text"
        return Decoded(mask, RepairReport(False, [f"no grid found ({what})"], 1.0, False))
    if dropped:
        repairs.append(f"dropped {dropped} line(s) of text around the grid")

    # Expand each row into labels, counting what had to be fixed.
    bad_cells = 0  # cells in the output whose value is a guess
    unknown, bad_counts, empty_cells, used_rle, case = set(), [], 0, False, False
    bare = 0  # cells without a run count
    labels_rows = []
    for cells, empty in rows:
        empty_cells += empty
        labels = []
        for cell in cells:
            if cell is None:
                labels.append(None)
                unknown.add("<garbled>")
                continue
            label, count, problem, is_run = cell
            if problem:
                bad_counts.append(problem)
            used_rle = used_rle or is_run
            bare += not is_run
            labels.extend([label] * count)
        labels_rows.append(labels)

    if len(labels_rows) == 1 and h > 1 and len(labels_rows[0]) == h * w:
        repairs.append("rows were not separated by newlines; split one line into rows")
        flat = labels_rows[0]
        labels_rows = [flat[i * w : (i + 1) * w] for i in range(h)]

    if len(labels_rows) != h:
        repairs.append(f"found {len(labels_rows)} rows, expected {h}")
    for i, labels in enumerate(labels_rows[:h]):
        if len(labels) != w:
            repairs.append(f"row {i}: {len(labels)} cells, expected {w}")
            bad_cells += min(abs(len(labels) - w), w)
        for j, label in enumerate(labels[:w]):
            if label is None:
                bad_cells += 1
                continue
            cid = CLASS_IDS.get(label)
            if cid is None and label.lower() in CLASS_IDS:
                cid, case = CLASS_IDS[label.lower()], True
            if cid is None:
                unknown.add(label)
                bad_cells += 1
                continue
            mask[i, j] = cid
    missing_rows = max(0, h - len(labels_rows))
    extra_rows = max(0, len(labels_rows) - h)
    bad_cells += (missing_rows + min(extra_rows, h)) * w
    if unknown:
        repairs.append(f"unknown labels {sorted(unknown)} set to {CLASSES[0]!r}")
    if case:
        repairs.append("labels in the wrong case")
    if bad_counts:
        bad_cells += len(bad_counts)
        repairs.append(f"{len(bad_counts)} bad run count(s), e.g. {bad_counts[0]}; read as 1")
    if empty_cells:
        repairs.append(f"{empty_cells} empty cell(s) between separators")
    if used_rle and bare:
        # the encoder never mixes the two; a bare label among runs is usually a run cut short
        bad_cells += bare
        repairs.append(f"{bare} bare label(s) among 'label *count' runs; read as 1")
    if encoding == "plain" and used_rle:
        repairs.append("expected a plain grid, found run counts")
    if encoding == "rle" and not used_rle:
        repairs.append("expected run-length encoding, found a plain grid")
    fraction = min(1.0, bad_cells / (h * w))
    return Decoded(mask, RepairReport(not repairs, repairs, float(fraction), True))
