"""Kubernetes resource quantities, parsed as the API server parses them, within fixed bounds.

The grammar is ``resource.Quantity``'s (k8s.io/apimachinery/pkg/api/resource/quantity.go):
a number, then a binary suffix (``Ki`` .. ``Ei``), a decimal suffix (``n u m k M G T P E``) or
a decimal exponent (``e3``, ``E-6``; the API server reads the exponent as an integer). The
API server itself puts no bound on the exponent: it reads ``1e10000000`` and then computes
10^10000000 to round it to nano units, which takes it (and any Python port) seconds to
minutes. So quantities here, in the CRD's schema (``spec.QUANTITY``) and in this parser alike,
stay within bounds that every quantity a real cluster uses fits:

- no sign but an optional ``+`` (container requests and limits are never negative: the API
  server refuses them);
- at most 9 digits after the point (the API server keeps a value only to the nano, 10^-9, and
  rounds finer ones up) and 28 before it (the most the API server itself writes for a value
  within these bounds: it stores 1.5 as ``1500m`` and 2^63-1 to the nano as 28 digits and
  ``n``, and the operator reads stored values back with this parser);
- an exponent of at most two digits (``e-99`` .. ``e99``);
- at most ``MAX_LENGTH`` (43) characters, the longest string the pattern admits;
- a value of at most 2^63-1 (``MAX_VALUE``, the API server's ``maxAllowed``: the int64 that
  ``Quantity.Value()`` returns and the cap it applies to binary-suffix quantities).

``parse_quantity`` checks the length and the pattern before any arithmetic, so its cost is
bounded whatever the input: the largest power it ever computes is 10^99 or 2^60.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_LENGTH = 43
MAX_VALUE = 2**63 - 1
MAX_EXPONENT_DIGITS = 2
NANO = Fraction(1, 10**9)

_NUMBER = r"\+?([0-9]{1,28}(\.[0-9]{0,9})?|\.[0-9]{1,9})"
_SUFFIX = rf"(([KMGTPE]i)|[numkMGTPE]|[eE][-+]?[0-9]{{1,{MAX_EXPONENT_DIGITS}}})?"
PATTERN = f"^{_NUMBER}{_SUFFIX}$"
"""The quantity pattern of the CRD (RE2, as the API server evaluates it)."""

UNSAFE_EXPONENT = r"[eE][-+]?[0-9]{3}"
"""Matches every string whose exponent has more digits than ``PATTERN`` admits. CEL rules
call Kubernetes' ``quantity()`` only on strings this does not match: a pattern violation
does not stop the API server from evaluating CEL rules, and ``quantity()`` parses with the
API server's unbounded parser."""

_QUANTITY = re.compile(
    r"(?P<number>\+?(?:[0-9]{1,28}(?:\.[0-9]{0,9})?|\.[0-9]{1,9}))"
    r"(?:(?P<binary>[KMGTPE]i)|(?P<decimal>[numkMGTPE])"
    rf"|[eE](?P<exponent>[-+]?[0-9]{{1,{MAX_EXPONENT_DIGITS}}}))?"
)
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 40 else f"{value[:20]!r}... ({len(value)} characters)"


def _exact(number: str, binary: str | None, decimal: str | None, exponent: int) -> Fraction:
    """The value, once the bounds are checked: ``exponent`` is within +-99."""
    value = Fraction(number)
    if binary:
        # Kubernetes caps a binary-suffix quantity at 2^63-1, silently ("8Ei" is 2^63-1).
        return min(value * 2 ** _BINARY[binary], Fraction(MAX_VALUE))
    power = _DECIMAL[decimal] if decimal else exponent
    return value * Fraction(10) ** power


def parse_quantity(value: int | str) -> Fraction:
    """Exact value of a quantity such as ``500m``, ``32Gi`` or ``1e3``, as Kubernetes reads it
    (finer than a nano rounded up); ValueError outside the bounds above or if malformed."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    if isinstance(value, int):
        if not 0 <= value <= MAX_VALUE:
            raise ValueError(f"quantity {value} is outside 0..{MAX_VALUE}")
        return Fraction(value)
    if len(value) > MAX_LENGTH:
        raise ValueError(f"quantity {_shown(value)} is longer than {MAX_LENGTH} characters")
    match = _QUANTITY.fullmatch(value)
    if match is None:
        raise ValueError(
            f"{_shown(value)} is not a Kubernetes quantity within this operator's bounds "
            "(e.g. 8, 500m, 32Gi, 1.5, 1e3; at most 28 digits before the point and 9 after "
            "it, a two-digit exponent, no sign)"
        )
    exponent = int(match["exponent"] or 0)
    exact = _exact(match["number"], match["binary"], match["decimal"], exponent)
    rounded = Fraction(math.ceil(exact / NANO)) * NANO
    if rounded > MAX_VALUE:
        raise ValueError(f"quantity {_shown(value)} is above {MAX_VALUE} (2^63-1)")
    return rounded
