"""Host time by phase (METROLINE_HOST_TIMING=1): every rank reports its phases; off by
default, where nothing is recorded."""

from __future__ import annotations

import pytest

from metroline.engine import LLM, SamplingParams
from metroline.engine.host_timing import HostTimer, merge_reports

from .conftest import make_prompts

PARAMS = SamplingParams(temperature=0, max_tokens=6)


def test_off_by_default_records_nothing(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("METROLINE_HOST_TIMING", raising=False)
    llm = LLM(model=str(tiny_checkpoint("llama")), kv_cache_memory_bytes=2**20)
    llm.generate(make_prompts((5, 9)), PARAMS, use_tqdm=False)
    assert llm.engine_core.host_timings() == [{}]


def test_every_rank_reports_its_phases(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("METROLINE_HOST_TIMING", "1")
    llm = LLM(
        model=str(tiny_checkpoint("llama")),
        kv_cache_memory_bytes=2**20,
        tensor_parallel_size=2,
        async_scheduling=True,
    )
    try:
        llm.generate(make_prompts((5, 9, 30)), PARAMS, use_tqdm=False)
        rank0, rank1 = llm.engine_core.host_timings()
    finally:
        llm.shutdown()
    steps = rank0["core.schedule"]["calls"]
    assert steps >= 6
    launched = rank0["core.launch"]["calls"]  # the last plans may be empty, never launched
    assert steps - 2 <= launched <= steps
    for phase in ("core.wait_for_device", "core.update", "runner.build_inputs",
                  "runner.forward_eager", "runner.logits_and_sampling"):  # fmt: skip
        assert rank0[phase]["calls"] == launched, phase  # totals may round to 0 on the CPU
    assert rank0["llm.process_outputs"]["calls"] >= launched
    assert rank0["runner.forward_eager"]["total_s"] > 0
    assert rank1["worker.wait_for_plan"]["calls"] >= steps
    assert rank1["runner.build_inputs"]["calls"] == rank0["runner.build_inputs"]["calls"]
    assert "core.schedule" not in rank1


def test_reports_merge_by_phase():
    a, b = HostTimer(enabled=True), HostTimer(enabled=True)
    for timer, name in ((a, "x"), (b, "x"), (b, "y")):
        with timer.phase(name):
            pass
    merged = merge_reports(a.report(), b.report())
    assert merged["x"]["calls"] == 2 and merged["y"]["calls"] == 1


def test_a_phase_counts_when_its_block_raises_and_nothing_when_disabled():
    timer, off = HostTimer(enabled=True), HostTimer(enabled=False)
    with pytest.raises(ValueError), timer.phase("failing"):
        raise ValueError
    with off.phase("ignored"):
        pass
    assert timer.report()["failing"]["calls"] == 1
    assert off.report() == {}
