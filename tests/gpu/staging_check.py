"""Pinned staging on CUDA: many rounds of mixed arrays, copied while the device is busy,
come back exactly; a set is rewritten only after its copy completed.

Run on a CUDA machine from the repository root: ``python -P tests/gpu/staging_check.py``.
Prints a table last and writes JSON to $OUT (or the working directory).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "gpu")]
from gpu_helpers import report  # noqa: E402

from metroline.engine.worker.host_staging import StepStaging  # noqa: E402


def main() -> None:
    device = torch.device("cuda")
    staging = StepStaging(device)
    rng = np.random.default_rng(0)
    busy = torch.randn(4096, 4096, device=device)
    kept = []
    for round_ in range(200):
        size = int(rng.integers(1, 50_000))
        arrays = [
            (rng.integers(0, 2**40, size=size), torch.int64),
            (rng.integers(0, 2**20, size=(int(rng.integers(1, 64)), 33)), torch.int32),
            (rng.random(int(rng.integers(0, 300))), torch.float32),
            (rng.random(17) > 0.5, torch.bool),
        ]
        for values, dtype in arrays:
            staging.add(values, dtype)
        if round_ % 3 == 0:
            busy = busy @ busy  # keep the stream busy so copies queue behind work
            busy /= busy.norm()
        out = staging.to_device()
        # Copy out at once (stream-ordered) what the check reads later.
        kept.append(([t.clone() for t in out], arrays))
    torch.cuda.synchronize()
    exact = all(
        torch.equal(t.cpu(), torch.as_tensor(np.asarray(v), dtype=d))
        for tensors, arrays in kept
        for t, (v, d) in zip(tensors, arrays)
    )
    results = {"gpu": torch.cuda.get_device_name(), "rounds": len(kept), "exact": exact}
    report(results, "staging_check", "pinned step staging on CUDA")
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
