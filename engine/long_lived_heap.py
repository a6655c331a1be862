"""Keep Python's cyclic garbage collector off the objects an engine holds for its lifetime.

A full collection walks every tracked object: after start-up that is the model's modules
and parameters, torch's, Triton's and transformers' module state, the tokenizer, the CUDA
graphs and the block pool, and a pass over them stalls the step loop long enough to leave
the GPU idle (``benchmarks/throughput.py`` reports the collections of its measured run).
:func:`freeze_long_lived_heap` runs once a process is ready to serve: one collection, then
:func:`gc.freeze` moves every survivor into the permanent generation, which later
collections skip, and young collections (each of which counts towards a full one) come
at most every :data:`YOUNG_THRESHOLD` allocations. Objects made after it (requests, their
token lists) are collected as before, less often.

Invariant: what is alive at the freeze is not freed by the cyclic collector until
:func:`thaw_long_lived_heap` (reference counting still frees what is not in a cycle), so
the freeze runs only once the long-lived state is built, never per request, and an
engine's shutdown thaws (another engine of the process then walks its objects again until
the next freeze).
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)

#: Allocations (net of frees) between young collections while an engine serves, instead of
#: Python's 700: a step allocates thousands of short-lived objects that reference counting
#: already frees, and fewer young collections also mean fewer full ones.
YOUNG_THRESHOLD = 20_000

#: The process's thresholds before the first freeze, restored by the thaw.
_threshold_before: tuple[int, int, int] | None = None


def freeze_long_lived_heap() -> None:
    """Collect once, exempt every surviving object from later collections, and collect the
    young generation every :data:`YOUNG_THRESHOLD` allocations."""
    global _threshold_before
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    young, older, oldest = gc.get_threshold()
    if _threshold_before is None:
        _threshold_before = (young, older, oldest)
    gc.set_threshold(max(YOUNG_THRESHOLD, young), older, oldest)
    logger.debug(
        "froze %d long-lived objects in %.0f ms",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1e3,
    )


def thaw_long_lived_heap() -> None:
    """Return the frozen objects to the collector (an engine shut down: its state may now
    be garbage in cycles) and its thresholds to what they were before the first freeze."""
    global _threshold_before
    gc.unfreeze()
    if _threshold_before is not None:
        gc.set_threshold(*_threshold_before)
        _threshold_before = None
