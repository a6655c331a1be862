"""Per-request logits constraints (engine/worker/token_constraints.py): built once as device
tensors, gathered per step without staging anything id-list-sized and without host tensors
built from Python data in the sampler; the result equals a PyTorch reference."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from metroline.engine.layers.sampler import Sampler
from metroline.engine.sampling_params import SamplingParams
from metroline.engine.worker.host_staging import StepStaging
from metroline.engine.worker.step_inputs import WorkerRequestState, build_sampling_metadata
from metroline.engine.worker.token_constraints import request_constraints

VOCAB = 512
CPU = torch.device("cpu")
EOS = (2,)


class RecordingStaging(StepStaging):
    """A real staging that also records the size of every array queued."""

    def __init__(self) -> None:
        super().__init__(CPU)
        self.sizes: list[int] = []

    def add(self, values, dtype) -> int:
        self.sizes.append(int(np.asarray(values).size))
        return super().add(values, dtype)


class HostTensorsFromData(TorchDispatchMode):
    """Records tensors made from host data (``torch.tensor(list)``) of more than a scalar: on
    a GPU, moved by ``.to(device)``, each would be a pageable, synchronising copy."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default and args[0].dim() > 0:
            self.made.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def _state(row: int, params: SamplingParams, outputs=(), bad_words=()) -> WorkerRequestState:
    prompt = [5 + row, 6 + row]
    return WorkerRequestState(
        request_id=f"r{row}",
        token_ids=[*prompt, *outputs],
        num_prompt_tokens=len(prompt),
        block_ids=[0],
        num_computed_tokens=len(prompt) + len(outputs),
        sampling_params=params,
        eos_token_ids=EOS,
        constraints=request_constraints(params, EOS, bad_words, VOCAB, CPU),
    )


def _reference(logits, allowed, banned, bias):
    out = logits.clone()
    for row in range(out.shape[0]):
        if allowed[row] is not None:
            keep = torch.zeros(VOCAB, dtype=torch.bool)
            keep[list(allowed[row])] = True
            out[row] = out[row].masked_fill(~keep, float("-inf"))
        out[row, list(banned[row])] = float("-inf")
        for token, value in (bias[row] or {}).items():
            out[row, token] += value
    return out.argmax(dim=-1)


def test_constraints_are_gathered_on_the_device_and_match_a_reference():
    everything = list(range(VOCAB))
    big_bias = {t: (t % 7) - 3.0 for t in range(300)}
    params = [
        SamplingParams(temperature=0, allowed_token_ids=everything[1:], logit_bias=big_bias),
        SamplingParams(temperature=0),  # unconstrained, between constrained rows
        SamplingParams(temperature=0, allowed_token_ids=[2, 7, 9, 11]),
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[9]),
        SamplingParams(temperature=0, logit_bias={4: 50.0}),
    ]
    single_bans = tuple((t,) for t in range(100, 356))  # two variants of 128 words
    states = [
        _state(0, params[0], bad_words=single_bans),
        _state(1, params[1]),
        _state(2, params[2], outputs=[3]),
        _state(3, params[3], outputs=[1]),
        _state(4, params[4], bad_words=((4,),)),
    ]
    logits = torch.randn(len(states), VOCAB, generator=torch.Generator().manual_seed(0))
    staging = RecordingStaging()
    meta = build_sampling_metadata(states, VOCAB, staging)
    with HostTensorsFromData() as made:
        tokens = Sampler()(logits, meta).sampled
    assert made.made == []  # the sampler builds no host tensor from the bans' lists
    # Per step only row-sized index columns are staged, whatever the id lists' lengths.
    assert max(staging.sizes) <= len(states), staging.sizes
    allowed = [p.allowed_token_ids for p in params]
    banned = [set(range(100, 356)), set(), set(), {2, 9}, {4}]
    bias = [big_bias, None, None, None, {4: 50.0}]
    assert tokens.tolist() == _reference(logits, allowed, banned, bias).tolist()
    assert tokens[4] != 4  # the ban wins over the bias
    assert tokens[2] in (2, 7, 9, 11)


def test_min_tokens_bans_end_and_only_bad_words_of_several_tokens_are_staged():
    words = ((40, 41), (50,))
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[9])
    logits = torch.zeros(1, VOCAB)
    logits[0, 9] = 5.0
    logits[0, 41] = 4.0
    logits[0, 50] = 3.0
    early = _state(0, params, outputs=[40], bad_words=words)
    late = _state(0, params, outputs=[7, 40], bad_words=words)
    staging = RecordingStaging()
    assert Sampler()(logits, build_sampling_metadata([early], VOCAB, staging)).sampled == 0
    assert staging.sizes == [1, 1, 1, 1, 1, 1]  # rows, counts, one dynamic ban, temp, greedy
    after = Sampler()(logits, build_sampling_metadata([late], VOCAB, staging)).sampled
    assert after == 9  # min_tokens reached: the stop id is free; 41 stays banned after 40


def test_unconstrained_requests_hold_no_constraints():
    plain = SamplingParams(temperature=0.7, top_p=0.9)
    assert request_constraints(plain, EOS, (), VOCAB, CPU) is None
    ignoring = SamplingParams(temperature=0, min_tokens=4, ignore_eos=True)
    assert request_constraints(ignoring, EOS, (), VOCAB, CPU) is None
    staging = RecordingStaging()
    build_sampling_metadata([_state(0, plain)], VOCAB, staging)
    assert len(staging.sizes) == 3  # top_p, temperature, greedy: as before
