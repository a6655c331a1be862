"""Pieces the GPU check scripts share."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

import torch


class LogitsRecorder:
    """Wraps a model runner's sampler and keeps (on the CPU, fp32) the logits of the first
    step it sees. Only steps that reach the full sampler are seen: use a non-greedy field
    such as ``top_k=1`` (still greedy) so the plain-argmax fast path is not taken."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.first: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, meta: Any) -> Any:
        if self.first is None:
            self.first = logits.detach().float().cpu()
        return self.sampler(logits, meta)


def record_first_logits(llm: Any) -> LogitsRecorder:
    """Install a recorder on the driver rank's model runner of ``llm``."""
    runner = llm.engine_core.executor.worker.model_runner
    recorder = LogitsRecorder(runner.sampler)
    runner.sampler = recorder
    return recorder


def release(*objects: Any) -> None:
    """Shut engines down and give their GPU memory back before the next one starts."""
    for obj in objects:
        if hasattr(obj, "shutdown"):
            obj.shutdown()
    del objects
    gc.collect()
    torch.cuda.empty_cache()


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> list[dict[str, int]]:
    """Per sequence pair: tokens before the first difference, and positions that agree."""
    rows = []
    for a_seq, b_seq in zip(ours, theirs):
        first = next((i for i, (a, b) in enumerate(zip(a_seq, b_seq)) if a != b), len(a_seq))
        rows.append(
            {"before_divergence": first, "equal": sum(a == b for a, b in zip(a_seq, b_seq))}
        )
    return rows


def report(results: dict[str, Any], name: str, title: str) -> None:
    """Write ``$OUT/<name>.json`` (or ./) and print the results as a table, last."""
    out = Path(os.environ.get("OUT", "."))
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    print(f"\n==== {title} ====")
    width = max(len(key) for key in results) + 2
    for key, value in results.items():
        print(f"{key:{width}s} {value}")
