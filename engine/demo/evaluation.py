"""Scoring the demo model: held-out loss in nats per token, and a greedy completion."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    stream: torch.Tensor,
    seq_len: int,
    batch: int,
    max_windows: int | None = None,
    autocast: bool = False,
) -> float:
    """Mean loss in nats/token over consecutive windows of ``stream`` (each token scored once)."""
    was_training = model.training
    model.eval()
    n_windows = (stream.numel() - 1) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    total, count = 0.0, 0
    for first in range(0, n_windows, batch):
        idx = range(first, min(first + batch, n_windows))
        windows = torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), windows[:, 1:].flatten(), reduction="sum"
        )
        total += loss.item()
        count += windows[:, 1:].numel()
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def complete(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, max_new: int
) -> str:
    """Greedy completion of ``prompt`` (the prompt included), as the server would produce it."""
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)
