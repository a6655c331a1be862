"""Training the demo model: a fresh ``LlamaForCausalLM``, its schedule and the training loop.

Batches are random windows of the training stream drawn from a generator seeded with
``--seed``; the model's initial weights come from torch's global generator, which the caller
seeds. AdamW (weight decay on matrices only), linear warmup then cosine decay, bf16 autocast on
CPU unless ``--no-autocast``, gradient clipping.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .evaluation import evaluate

log = logging.getLogger(__name__)


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by the command line."""
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to ``--lr``, then cosine decay to ``--lr * --min-lr-ratio``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_at(stream: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` tokens from ``stream``."""
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


def train(
    model: LlamaForCausalLM,
    train_stream: torch.Tensor,
    held_stream: torch.Tensor,
    args: argparse.Namespace,
) -> float:
    """Train ``model`` in place for ``--steps`` steps; return the minutes the loop took.

    Logs the loss every 25 steps and a held-out estimate (first 128 windows) every
    ``--eval-every`` steps but the last.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,
    )
    forward = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(args.seed)
    autocast = not args.no_autocast
    tokens_per_step = args.batch * args.seq_len
    log.info(
        "training: %d steps x %d tokens = %.1fM tokens (%.2f epochs)",
        args.steps,
        tokens_per_step,
        args.steps * tokens_per_step / 1e6,
        args.steps * tokens_per_step / train_stream.numel(),
    )

    model.train()
    train_started = time.monotonic()
    smooth = None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        windows = batch_at(train_stream, args.seq_len, args.batch, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = forward(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        done = step + 1
        if done % 25 == 0 or done == 1:
            elapsed = time.monotonic() - train_started
            log.info(
                "step %d/%d loss %.3f (smoothed %.3f) lr %.2e %.0f tok/s elapsed %.1f min",
                done,
                args.steps,
                loss.item(),
                smooth,
                lr_at(step, args),
                done * tokens_per_step / elapsed,
                elapsed / 60,
            )
        if done % args.eval_every == 0 and done != args.steps:
            held = evaluate(
                model, held_stream, args.seq_len, 32, max_windows=128, autocast=autocast
            )
            log.info("step %d held-out loss (first 128 windows) %.3f nats/token", done, held)
    return (time.monotonic() - train_started) / 60
