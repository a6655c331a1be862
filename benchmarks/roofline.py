"""Simple roofline estimates from the measured ceilings (copy bandwidth, bf16 matmul rate)."""

from __future__ import annotations

from shapes import SHAPES, param_count, weight_bytes


def kv_bytes_per_token(shape: str, bytes_per_value: int = 2) -> int:
    c = SHAPES[shape]
    head_dim = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * bytes_per_value


def prefill_flops(shape: str, prompt_lens: list[int]) -> float:
    """2 * params per token for the matmuls, plus causal attention (QK^T and PV)."""
    c = SHAPES[shape]
    params = param_count(shape)
    head_dim = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    q_width = c["num_attention_heads"] * head_dim
    attention = sum(2 * 2 * c["num_hidden_layers"] * q_width * n * n / 2 for n in prompt_lens)
    return 2 * params * sum(prompt_lens) + attention


def decode_seconds(
    shape: str,
    prompt_lens: list[int],
    output_lens: list[int],
    batch: int,
    bandwidth: float,
    matmul_rate: float,
    fp8_weights: bool = False,
    kv_bytes_per_value: int = 2,
) -> float:
    """Decode at ``batch`` sequences a step: each step reads the weights once plus the KV of
    every sequence in the batch (at its average context), and does ``2 * params`` FLOPs per
    sequence; it takes the longer of the two (a roofline: both bounds hold, perfect overlap).
    At large batches the matmuls, not the reads, bound a step. ``fp8_weights``: the
    projections hold one byte per weight (the matmul rate given is then fp8's); an fp8 KV
    cache has ``kv_bytes_per_value`` 1."""
    total_out = sum(output_lens)
    steps = total_out / batch
    mean_context = sum(p + o / 2 for p, o in zip(prompt_lens, output_lens)) / len(prompt_lens)
    weights = weight_bytes(shape, fp8_projections=fp8_weights)
    kv_per_token = kv_bytes_per_token(shape, kv_bytes_per_value)
    step_bytes = weights + batch * mean_context * kv_per_token
    step_flops = 2 * param_count(shape) * batch
    return steps * max(step_bytes / bandwidth, step_flops / matmul_rate)


def w1_roofline_seconds(
    shape: str,
    prompt_lens: list[int],
    output_lens: list[int],
    kv_tokens: int,
    max_num_seqs: int,
    bandwidth: float,
    matmul_rate: float,
    fp8_weights: bool = False,
    kv_bytes_per_value: int = 2,
) -> dict[str, float]:
    """Prefill FLOPs at the matmul rate plus decode bytes at the copy bandwidth, for the
    largest batch the KV pool allows (fp8 arguments as in :func:`decode_seconds`)."""
    mean_len = sum(p + o for p, o in zip(prompt_lens, output_lens)) / len(prompt_lens)
    batch = max(1, min(max_num_seqs, int(kv_tokens // mean_len), len(prompt_lens)))
    prefill = prefill_flops(shape, prompt_lens) / matmul_rate
    decode = decode_seconds(
        shape,
        prompt_lens,
        output_lens,
        batch,
        bandwidth,
        matmul_rate,
        fp8_weights,
        kv_bytes_per_value,
    )
    return {"batch": batch, "prefill_s": prefill, "decode_s": decode, "total_s": prefill + decode}
