"""StepStaging hands back every queued array as a device tensor with its values, dtype and
shape, in the order queued (the pinned path is checked on a GPU by
tests/gpu/staging_check.py)."""

from __future__ import annotations

import numpy as np
import torch

from metroline.engine.worker.host_staging import StepStaging


def test_arrays_come_back_in_order_with_their_dtypes_and_shapes():
    staging = StepStaging(torch.device("cpu"))
    rng = np.random.default_rng(0)
    for _ in range(3):
        table = rng.integers(0, 1000, size=(3, 5))
        queued = [
            (table, torch.int32),
            ([1.5, -2.0], torch.float32),
            ([True, False, True], torch.bool),
            ([], torch.int64),
            (rng.integers(0, 2**40, size=7), torch.int64),
        ]
        indices = [staging.add(values, dtype) for values, dtype in queued]
        assert indices == list(range(len(queued)))
        out = staging.to_device()
        for (values, dtype), tensor in zip(queued, out):
            expected = torch.as_tensor(np.asarray(values), dtype=dtype)
            assert tensor.dtype == dtype and tensor.shape == expected.shape
            assert torch.equal(tensor, expected)
