"""The engine's long-lived objects leave the cyclic collector's walks once it is ready (a
full collection over them would stall the step loop), every live engine keeps them there,
and shutdown gives them back and frees the weights at once."""

from __future__ import annotations

import gc
import weakref

from metroline.engine import LLM, SamplingParams
from metroline.engine.long_lived_heap import YOUNG_THRESHOLD

from .conftest import make_prompts


def _collected_generations() -> set[int]:
    return {id(obj) for obj in gc.get_objects()}  # the permanent generation is not listed


def _model(llm: LLM):
    return llm.engine_core.executor.worker.model_runner.model


def test_an_offline_engine_freezes_its_model_and_frees_it_at_shutdown(tiny_checkpoint):
    gc.unfreeze()
    threshold = gc.get_threshold()
    llm = LLM(model=str(tiny_checkpoint("llama")), kv_cache_memory_bytes=2**20)
    try:
        model = _model(llm)
        assert gc.get_freeze_count() > 0
        assert id(model) not in _collected_generations()
        assert gc.get_threshold()[0] == max(YOUNG_THRESHOLD, threshold[0])
        outputs = llm.generate(make_prompts((5, 9)), SamplingParams(max_tokens=4), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 4 for o in outputs)
        cycle: list = []
        cycle.append(cycle)  # made after the freeze: collected as before
        del cycle
        assert gc.collect() > 0
        weights = [weakref.ref(p) for p in model.parameters()]
        del model
    finally:
        llm.shutdown()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold
    assert all(w() is None for w in weights)  # freed by shutdown, cycles and all


def test_one_engines_shutdown_or_drop_leaves_the_others_frozen(tiny_checkpoint):
    checkpoint = str(tiny_checkpoint("llama"))
    first = LLM(model=checkpoint, kv_cache_memory_bytes=2**20)
    second = LLM(model=checkpoint, kv_cache_memory_bytes=2**20)
    try:
        kept = id(_model(second))
        first.shutdown()
        assert gc.get_freeze_count() > 0 and kept not in _collected_generations()
        del first  # shutdown again (from __del__): no second release
        gc.collect()
        assert gc.get_freeze_count() > 0 and kept not in _collected_generations()
    finally:
        second.shutdown()
    assert gc.get_freeze_count() == 0


def test_an_engine_dropped_in_a_cycle_is_freed_by_the_next_one(tiny_checkpoint):
    checkpoint = str(tiny_checkpoint("llama"))
    first = LLM(model=checkpoint, kv_cache_memory_bytes=2**20)
    first.itself = first  # a reference cycle: only the collector can free it
    dropped = weakref.ref(first.engine_core)
    del first
    assert dropped() is not None  # frozen: no collection reaches it
    second = LLM(model=checkpoint, kv_cache_memory_bytes=2**20)
    try:
        assert dropped() is None
    finally:
        second.shutdown()


def test_a_failed_start_refreezes_the_engines_still_alive(tiny_checkpoint, tmp_path):
    live = LLM(model=str(tiny_checkpoint("llama")), kv_cache_memory_bytes=2**20)
    try:
        try:
            LLM(model=str(tmp_path / "missing"))
        except Exception:
            pass
        else:
            raise AssertionError("a missing model must not load")
        assert gc.get_freeze_count() > 0 and id(_model(live)) not in _collected_generations()
    finally:
        live.shutdown()
