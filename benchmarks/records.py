"""Where benchmark results go: one JSON file per run, named by date and what ran."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def save_record(out: Path, parts: list[str], record: dict[str, Any]) -> Path:
    """Write ``record`` to ``out/<today>-<parts joined by '-'>.json`` and return the path.
    A run never replaces an earlier one: when that name is taken, ``-2``, ``-3``, ... is
    appended (repeated runs of one configuration are what medians are taken over)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "-".join([time.strftime("%Y-%m-%d"), *parts])
    path, index = out / f"{stem}.json", 1
    while path.exists():
        index += 1
        path = out / f"{stem}-{index}.json"
    path.write_text(json.dumps(record, indent=2))
    return path
