"""Every GPU check of the kernels issue in one run: the kernels at real sizes against their
references (``check_kernels.py``), then the engine end to end against transformers
(``engine_vs_transformers.py``). ``python -P tests/gpu/check_all.py`` on an H100/H200; exits
non-zero if a kernel check fails or a tiny model's greedy tokens differ from transformers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import check_kernels  # noqa: E402
import engine_vs_transformers  # noqa: E402

if __name__ == "__main__":
    kernel_status = check_kernels.main()
    engine_vs_transformers.main()
    results = json.loads(
        (Path(os.environ.get("OUT", ".")) / "engine_vs_transformers.json").read_text()
    )
    inexact = [k for k, v in results.items() if k.startswith("tiny/") and not v["exact"]]
    if inexact:
        print("greedy tokens differ from transformers:", ", ".join(inexact))
    sys.exit(1 if kernel_status or inexact else 0)
