"""Where benchmark results go: one JSON file per run, named by date and what ran."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def save_record(out: Path, parts: list[str], record: dict[str, Any]) -> Path:
    """Write ``record`` to ``out/<today>-<parts joined by '-'>.json``; returns the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("-".join([time.strftime("%Y-%m-%d"), *parts]) + ".json")
    path.write_text(json.dumps(record, indent=2))
    return path
