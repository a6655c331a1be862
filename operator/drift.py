"""Has a child drifted from what the operator applied? (pure)

``covers(desired, current)`` is true when every field the operator renders is present in the
live object with the same meaning. The comparison is by meaning, not by text, because the API
server re-encodes what it stores:

* Fields the API server adds (defaults, clusterIP, status) are ignored.
* Quantities (under ``requests``, ``limits``, ``overhead``, and ``sizeLimit``) compare by value
  (``quantity.parse_quantity``, which reads them as the server does, within bounded cost): the
  server stores ``0.5`` as ``500m`` and ``1024Mi`` as ``1Gi``. Text that does not parse
  compares as text.
* An empty string, list or map that the live object lacks is the same as absent: Go's
  ``omitempty`` drops it (``env: [{name: X, value: ""}]`` is stored as ``[{name: X}]``).
* Other numbers and strings compare by text, so ``"4"`` matches ``4``; booleans must be booleans.

Anything the operator owns that was changed or removed counts as drift and is re-applied. A
field the operator stopped rendering is not visible here; the ``config-hash`` annotation that
``render.stamp`` puts on every child changes with it, so such a child does not cover its new
render either.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from .quantity import parse_quantity

QUANTITY_MAPS = frozenset({"requests", "limits", "overhead"})
"""Maps whose values are quantities (container resources, pod overhead)."""
QUANTITY_FIELDS = frozenset({"sizeLimit"})
"""Fields that are quantities (an emptyDir's size)."""

Path = tuple[str, ...]


def _empty(value: Any) -> bool:
    return value == "" or value == [] or value == {}


def _is_quantity(path: Path) -> bool:
    return bool(path) and (
        path[-1] in QUANTITY_FIELDS or (len(path) >= 2 and path[-2] in QUANTITY_MAPS)
    )


def _quantity(value: Any) -> Fraction | None:
    """The value of a quantity as the API server reads it, or None when ``value`` is none."""
    try:
        return parse_quantity(value)
    except ValueError:
        return None


def _same_scalar(desired: Any, current: Any, path: Path) -> bool:
    if isinstance(desired, bool) or isinstance(current, bool):
        return desired is current
    if not (isinstance(desired, int | float | str) and isinstance(current, int | float | str)):
        return bool(desired == current)
    if str(desired) == str(current):
        return True
    if _is_quantity(path):
        want, have = _quantity(desired), _quantity(current)
        return want is not None and want == have
    return False


def covers(desired: Any, current: Any, path: Path = ()) -> bool:
    """Whether ``current`` holds everything of ``desired`` with the same meaning; ``path`` is
    where the two sit in their objects (it tells quantities apart from other strings)."""
    if isinstance(desired, dict):
        return isinstance(current, dict) and all(
            covers(value, current[key], (*path, key)) if key in current else _empty(value)
            for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(current, list)
            and len(desired) == len(current)
            and all(covers(d, c, path) for d, c in zip(desired, current))
        )
    return _same_scalar(desired, current, path)
