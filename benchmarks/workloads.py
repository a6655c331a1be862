"""The workloads of benchmarks/README.md as (prompt token ids, output length) lists, seeded."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    temperature: float

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def _random_prompts(rng: random.Random, lengths: list[int], vocab: int) -> list[list[int]]:
    # Stay clear of the low and high ids where tokenizers keep special tokens.
    low, high = (100, vocab - 1000) if vocab > 2000 else (2, vocab)
    return [[rng.randrange(low, high) for _ in range(n)] for n in lengths]


def make_workload(
    name: str, vocab: int, num_requests: int | None = None, seed: int = 0
) -> Workload:
    """W1 (mixed offline), W2 (nano-vllm's shape) or W4 (prefill)."""
    rng = random.Random(seed)
    if name == "W1":
        count = num_requests or 1000
        prompt_lens = [rng.randint(64, 1024) for _ in range(count)]
        output_lens = [rng.randint(64, 512) for _ in range(count)]
        temperature = 0.0
    elif name == "W2":
        count = num_requests or 256
        prompt_lens = [rng.randint(100, 1024) for _ in range(count)]
        output_lens = [rng.randint(100, 1024) for _ in range(count)]
        temperature = 0.6
    elif name == "W4":
        count = num_requests or 64
        prompt_lens = [2048] * count
        output_lens = [1] * count
        temperature = 0.0
    else:
        raise ValueError(f"unknown workload {name!r}; known: W1, W2, W4")
    return Workload(name, _random_prompts(rng, prompt_lens, vocab), output_lens, temperature)
