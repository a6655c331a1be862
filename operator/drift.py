"""Has a child drifted from what the operator applied? (pure)

``covers(desired, current)`` is true when every field the operator renders is present in the
live object with the same value. Fields the API server adds (defaults, clusterIP, status) are
ignored; anything the operator owns that was changed or removed counts as drift and is
re-applied. Numbers and strings compare by text, so ``"4"`` matches ``4``. A field the operator
stopped rendering is not visible here; the ``config-hash`` annotation that ``render.stamp`` puts
on every child changes with it, so such a child does not cover its new render either.
"""

from __future__ import annotations

from typing import Any


def covers(desired: Any, current: Any) -> bool:
    if isinstance(desired, dict):
        return isinstance(current, dict) and all(
            key in current and covers(value, current[key]) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(current, list)
            and len(desired) == len(current)
            and all(covers(d, c) for d, c in zip(desired, current))
        )
    if isinstance(desired, bool) or isinstance(current, bool):
        return desired is current
    if isinstance(desired, int | float | str) and isinstance(current, int | float | str):
        return str(desired) == str(current)
    return bool(desired == current)
