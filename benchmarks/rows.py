"""The rows of a resumable study: a CSV appended as records are measured, so a stopped run keeps what it measured
and resumes from it."""

from __future__ import annotations

import csv
import os
from pathlib import Path


def read_rows(path: Path, types: dict) -> list[dict]:
    """Every row, with the columns named in `types` converted (column -> a function of the text)."""
    if not path.exists():
        return []
    with path.open() as f:
        return [{**r, **{k: t(r[k]) for k, t in types.items()}} for r in csv.DictReader(f)]


def append_rows(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    """Append `rows` (a header first on a new file) and sync them to disk."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
