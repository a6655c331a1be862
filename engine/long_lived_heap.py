"""Keep Python's cyclic garbage collector off the objects an engine holds for its lifetime.

A full collection walks every tracked object: after start-up that is the model's modules
and parameters, torch's, Triton's and transformers' module state, the tokenizer, the CUDA
graphs and the block pool, and a pass over them stalls the step loop long enough to leave
the GPU idle (``benchmarks/throughput.py`` reports the collections of its measured run).
:func:`freeze_long_lived_heap` runs once an engine is ready to serve: one collection, then
:func:`gc.freeze` moves every survivor into the permanent generation, which later
collections skip, and young collections (each of which counts towards a full one) come at
most every :data:`YOUNG_THRESHOLD` net allocations of tracked objects. Objects made after
it (requests, their token lists) are collected as before, less often.

Invariants: every engine alive in the process holds the freeze once (``freeze`` adds a
holder, ``release`` takes one away); while any holds it, everything alive at the last
freeze stays out of the collector's reach, except between a :func:`thaw_long_lived_heap`
(before an engine loads, or while one shuts down, so that a collection then reaches engines
dropped in reference cycles) and the :func:`settle_long_lived_heap` or freeze after it.
With no holder left the thresholds are what they were before the first freeze. A
``gc.freeze()`` of the application's own is undone by the first thaw.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)

#: Net allocations of tracked objects between young collections while an engine serves,
#: instead of Python's 700: a step allocates thousands of short-lived objects that
#: reference counting already frees, and fewer young collections mean fewer full ones.
YOUNG_THRESHOLD = 20_000

#: Engines of this process that hold the freeze.
_holders = 0
#: The process's thresholds before the first freeze, restored when the last holder leaves.
_threshold_before: tuple[int, int, int] | None = None
#: A thaw happened that no freeze or settle has followed yet.
_thawed = False


def freeze_long_lived_heap() -> None:
    """An engine is ready: collect once, exempt every survivor from later collections, and
    collect the young generation every :data:`YOUNG_THRESHOLD` allocations. Adds a holder."""
    global _holders, _threshold_before, _thawed
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    _holders, _thawed = _holders + 1, False
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
    """Give every frozen object back to the collector for now (the holders stay): a
    collection that follows reaches engines dropped in reference cycles."""
    global _thawed
    gc.unfreeze()
    _thawed = True


def settle_long_lived_heap() -> None:
    """After a thaw that no freeze followed: if engines still hold the freeze, collect once
    and freeze the survivors again (nothing to do without such a thaw)."""
    global _thawed
    if _thawed and _holders > 0:
        gc.collect()
        gc.freeze()
        _thawed = False


def release_long_lived_heap() -> None:
    """An engine has shut down: take its hold away. The last holder's release leaves
    everything to the collector and restores the thresholds; otherwise the others' objects
    are frozen again once this engine's are collected."""
    global _holders, _threshold_before
    _holders = max(0, _holders - 1)
    thaw_long_lived_heap()
    if _holders > 0:
        settle_long_lived_heap()
    elif _threshold_before is not None:
        gc.set_threshold(*_threshold_before)
        _threshold_before = None
