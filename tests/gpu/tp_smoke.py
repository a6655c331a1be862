"""Smallest tensor-parallel GPU run: TP=2 greedy generation, eager or with CUDA graphs.

``METROLINE_HANG_DUMP_S=40 python -P tests/gpu/tp_smoke.py [--eager]`` prints every
thread's stack (all ranks) if a step hangs.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from shapes import write_shape  # noqa: E402

from metroline.engine import LLM, SamplingParams  # noqa: E402

if __name__ == "__main__":
    if os.environ.get("METROLINE_HANG_DUMP_S"):
        faulthandler.dump_traceback_later(float(os.environ["METROLINE_HANG_DUMP_S"]), repeat=True)
    eager = "--eager" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        path = write_shape("llama3-8b", Path(tmp) / "m")
        llm = LLM(
            model=str(path),
            load_format="dummy",
            tensor_parallel_size=2,
            max_model_len=1024,
            kv_cache_memory_bytes=2 * 2**30,
            enforce_eager=eager,
        )
        started = time.perf_counter()
        out = llm.generate(
            [[100 + i for i in range(50)]] * 3,
            SamplingParams(temperature=0, max_tokens=8),
            use_tqdm=False,
        )
        print(
            "eager" if eager else "graphs",
            "ok",
            out[0].outputs[0].token_ids,
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        started = time.perf_counter()
        llm.shutdown()
        # Before the fix, NCCL teardown after CUDA graphs hung for the full 30 s bound.
        print(f"shutdown {time.perf_counter() - started:.1f} s", flush=True)
