"""The engine's long-lived objects leave the cyclic collector's walks once it is ready (a
full collection over them would stall the step loop), and return to it at shutdown."""

from __future__ import annotations

import gc

from metroline.engine import LLM, SamplingParams

from .conftest import make_prompts


def _collected_generations() -> set[int]:
    return {id(obj) for obj in gc.get_objects()}  # the permanent generation is not listed


def test_an_offline_engine_freezes_its_model_and_thaws_at_shutdown(tiny_checkpoint):
    gc.unfreeze()
    llm = LLM(model=str(tiny_checkpoint("llama")), kv_cache_memory_bytes=2**20)
    try:
        model = llm.engine_core.executor.worker.model_runner.model
        assert gc.get_freeze_count() > 0
        assert id(model) not in _collected_generations()
        outputs = llm.generate(make_prompts((5, 9)), SamplingParams(max_tokens=4), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 4 for o in outputs)
        cycle: list = []
        cycle.append(cycle)  # made after the freeze: collected as before
        del cycle
        assert gc.collect() > 0
    finally:
        llm.shutdown()
    assert gc.get_freeze_count() == 0
    assert id(model) in _collected_generations()


def test_an_engine_dropped_in_a_cycle_is_freed_by_the_next_one(tiny_checkpoint):
    import weakref

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
