"""Engine test helpers: prompts of chosen lengths and a cached Hugging Face greedy reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

#: Prompt lengths from one token to more than four 16-token blocks, with block edges.
PROMPT_LENGTHS = (1, 5, 16, 17, 31, 48, 65, 90)
MAX_NEW_TOKENS = 32


def make_prompts(lengths=PROMPT_LENGTHS, seed: int = 0, vocab: int = 512) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=generator).tolist() for n in lengths]


def shared_prefix_prompts(seed: int = 1) -> list[list[int]]:
    """Prompts that share a 40-token prefix (2.5 blocks), plus an exact duplicate."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, 512, (40,), generator=generator).tolist()
    suffixes = [torch.randint(2, 512, (n,), generator=generator).tolist() for n in (1, 8, 24, 30)]
    prompts = [prefix + s for s in suffixes]
    return [*prompts, list(prompts[2]), prefix[:33]]


@pytest.fixture(scope="session")
def hf_greedy() -> Callable[[Path, list[list[int]], int], list[list[int]]]:
    """``hf_greedy(path, prompts, max_new_tokens)``: transformers ``generate()`` greedy
    continuations (one prompt at a time, so no padding is involved), cached per input."""
    from transformers import AutoModelForCausalLM

    models: dict[Path, torch.nn.Module] = {}
    cache: dict[tuple, list[int]] = {}

    def generate(path: Path, prompts: list[list[int]], max_new_tokens: int = MAX_NEW_TOKENS):
        if path not in models:
            models[path] = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        model = models[path]
        results = []
        for prompt in prompts:
            key = (path, tuple(prompt), max_new_tokens)
            if key not in cache:
                ids = torch.tensor([prompt])
                with torch.no_grad():
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                    )
                cache[key] = out[0, len(prompt) :].tolist()
            results.append(cache[key])
        return results

    return generate
