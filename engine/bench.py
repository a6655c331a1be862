"""``metroline bench NAME [ARGS]``: run one of the benchmark scripts that ship with the
package (``metroline.benchmarks``), exactly as ``python -P benchmarks/NAME.py ARGS`` would."""

from __future__ import annotations

import importlib.util
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

#: The runnable benchmarks; the other modules there (common, shapes, ...) are their parts.
BENCHMARKS = {
    "throughput": "W1, W2, W4 offline throughput, with a same-run transformers baseline",
    "decode": "W3 decode steps against the weight-read floor and copy bandwidth",
    "serve": "W5 online serving under Poisson arrivals (TTFT, TPOT, ITL)",
    "kernels": "the Triton kernels against the card's ceilings and PyTorch",
    "load_memory": "host memory while loading a checkpoint at TP=1 and TP=2 (CPU)",
    "plot": "redraw the W3 and W5 result files as PNGs (needs matplotlib)",
}


#: Commands whose script has another name (``kernels.py`` would pass, on ``sys.path``, for
#: Hugging Face's ``kernels`` package, which transformers imports when it finds one).
SCRIPTS = {"kernels": "kernel_bench"}


def script_path(name: str) -> Path:
    """The script that ``metroline bench NAME`` runs."""
    return benchmarks_dir() / f"{SCRIPTS.get(name, name)}.py"


def benchmarks_dir() -> Path:
    spec = importlib.util.find_spec("metroline.benchmarks")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("metroline.benchmarks is not installed with this copy of metroline")
    return Path(next(iter(spec.submodule_search_locations)))


def run_benchmark(name: str, args: Sequence[str]) -> int:
    """Run ``name`` as ``__main__`` with ``args`` as its command line; its exit status."""
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    script = script_path(name)
    saved = sys.argv[:]
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        code = stop.code
        if code is None or isinstance(code, int):
            return code or 0
        sys.stderr.write(f"{code}\n")  # a message, as the interpreter would show it
        return 1
    finally:
        sys.argv = saved
    return 0
