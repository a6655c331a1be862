"""Kubernetes resource quantities as exact fractions, to compare requests with limits."""

from __future__ import annotations

import re
from fractions import Fraction

_SUFFIX = {
    "": Fraction(1), "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000),
    "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
    "P": Fraction(10**15), "E": Fraction(10**18),
    "Ki": Fraction(2**10), "Mi": Fraction(2**20), "Gi": Fraction(2**30), "Ti": Fraction(2**40),
    "Pi": Fraction(2**50), "Ei": Fraction(2**60),
}
_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:([eE][+-]?\d+)|([a-zA-Z]*))$")


def parse_quantity(value: int | str) -> Fraction:
    """Exact value of a quantity such as ``500m``, ``32Gi`` or ``1e3``; ValueError if malformed."""
    if isinstance(value, int):
        return Fraction(value)
    match = _QUANTITY.match(value.strip())
    if match is None or (match.group(3) or "") not in _SUFFIX:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number = Fraction(match.group(1))
    if match.group(2):
        return number * Fraction(10) ** int(match.group(2)[1:])
    return number * _SUFFIX[match.group(3) or ""]
