"""Pieces the GPU check scripts share."""

from __future__ import annotations

import gc
import json
import math
import os
import time
import traceback
from collections.abc import Callable
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


def report(
    results: dict[str, Any], name: str, title: str, table: dict[str, Any] | None = None
) -> None:
    """Write ``$OUT/<name>.json`` (or ./) and print the results as a table, last (``table``:
    print that summary instead of the whole of ``results``)."""
    out = Path(os.environ.get("OUT", "."))
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    print(f"\n==== {title} ====")
    rows = results if table is None else table
    width = max(len(key) for key in rows) + 2
    for key, value in rows.items():
        print(f"{key:{width}s} {value}")


class Verdicts:
    """The checks of one GPU script: each printed as it is made and kept (``details``, for the
    JSON), summary rows (``table``, printed last), and the names of those that failed."""

    def __init__(self) -> None:
        self.details: list[dict[str, Any]] = []
        self.table: dict[str, Any] = {}
        self.failed: list[str] = []

    def check(self, name: str, ok: bool, **values: Any) -> None:
        self.details.append({"check": name, "ok": bool(ok), **values})
        if not ok:
            self.failed.append(name)
        shown = " ".join(
            f"{key}={value:.3e}" if isinstance(value, float) else f"{key}={value}"
            for key, value in values.items()
        )
        print(f"{'ok  ' if ok else 'FAIL'} {name} {shown}", flush=True)

    def summarize(self, label: str, prefix: str, metric: str | None = None) -> None:
        """One table row for the checks whose names start with ``prefix``: how many passed
        and, with ``metric``, its worst (largest; NaN counts as infinite) value."""
        rows = [d for d in self.details if d["check"].startswith(prefix) and "ok" in d]
        passed = sum(d["ok"] for d in rows)
        text = f"{'ok' if rows and passed == len(rows) else 'FAIL'} {passed}/{len(rows)}"
        if metric and rows:
            worst = max(d[metric] if math.isfinite(d[metric]) else math.inf for d in rows)
            text += f", worst {metric} {worst:.2e}"
        self.table[label] = text

    def failure(self, label: str, error: Exception) -> None:
        """A part that raised: traceback now, a FAILED row in the table."""
        traceback.print_exc()
        self.failed.append(label)
        self.table[f"{label} FAILED"] = repr(error)[:300]

    def section(self, label: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or None when it raised: one broken part must not hide the rest.
        Device memory is given back afterwards; the seconds it took go to ``details``."""
        started = time.perf_counter()
        try:
            return fn(*args)
        except Exception as error:
            self.failure(label, error)
            return None
        finally:
            release()
            seconds = time.perf_counter() - started
            self.details.append({"check": f"{label} time", "seconds": seconds})
