"""The engine's one door to the kernels: each op picks its implementation by device.

On CPU every op is the PyTorch reference from :mod:`metroline.kernels`; on CUDA the Triton
kernel beside it. Layers call only these functions, so the model code is device-agnostic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from metroline.kernels import (
    activation,
    fp8_gemm,
    fp8_quant,
    rmsnorm,
    rotary_kv,
    warmup,
)
from metroline.kernels import paged_attention as attention

#: Whether CUDA fp8 matmuls of at most ``fp8_gemm.SMALL_M_MAX`` rows take the Triton kernel
#: that streams the weight: set per process by :func:`use_small_batch_fp8_gemm` once the
#: kernel passed its start-up check on the model's shapes.
_small_batch_fp8_gemm = False


def use_small_batch_fp8_gemm(enabled: bool) -> None:
    global _small_batch_fp8_gemm
    _small_batch_fp8_gemm = enabled


class Fp8Activation(NamedTuple):
    """A projection's input already quantized per token: ``x ~= data.float() * scale``, in
    the model dtype ``dtype`` before quantization (see :func:`fp8_linear`)."""

    data: torch.Tensor  # [num_tokens, in] float8_e4m3fn
    scale: torch.Tensor  # [num_tokens, 1] fp32
    dtype: torch.dtype


def rms_norm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Fp8Activation:
    """``rms_norm`` then per-token e4m3 quantization of its output, in one kernel on CUDA."""
    quantize = rmsnorm.rms_norm_quant_fp8 if x.is_cuda else rmsnorm.rms_norm_quant_fp8_ref
    return Fp8Activation(*quantize(x, weight, eps), x.dtype)


def fused_add_rms_norm_quant_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> Fp8Activation:
    """``residual += x`` in place; returns ``rms_norm(residual)`` quantized per token."""
    if x.is_cuda:
        quantized = rmsnorm.fused_add_rms_norm_quant_fp8(x, residual, weight, eps)
    else:
        quantized = rmsnorm.fused_add_rms_norm_quant_fp8_ref(x, residual, weight, eps)
    return Fp8Activation(*quantized, x.dtype)


def silu_and_mul_quant_fp8(x: torch.Tensor) -> Fp8Activation:
    """``silu_and_mul`` then per-token e4m3 quantization of its output."""
    quantize = (
        activation.silu_and_mul_quant_fp8 if x.is_cuda else activation.silu_and_mul_quant_fp8_ref
    )
    return Fp8Activation(*quantize(x), x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:
        return rmsnorm.rms_norm(x, weight, eps)
    return rmsnorm.rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += x`` in place; returns ``rms_norm(residual)``."""
    if x.is_cuda:
        return rmsnorm.fused_add_rms_norm(x, residual, weight, eps)
    return rmsnorm.fused_add_rms_norm_ref(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        return activation.silu_and_mul(x)
    return activation.silu_and_mul_ref(x)


def fp8_linear(
    x: torch.Tensor | Fp8Activation,  # [..., in], or [num_tokens, in] already quantized
    weight: torch.Tensor,  # [out, in] float8_e4m3fn
    weight_scale: torch.Tensor,  # [out] fp32
    input_scale: torch.Tensor | None,  # [1] fp32 (static), or None: per token
) -> torch.Tensor:
    """``x W^T`` with ``W = weight * weight_scale[:, None]``, the input quantized to e4m3
    (per token, or with the static scale), accumulated in fp32, returned in ``x``'s dtype. On
    CUDA: the Triton quantizer, then for decode-sized batches the Triton kernel that streams
    the weight (once enabled, :func:`use_small_batch_fp8_gemm`), else cuBLASLt's fp8 matmul
    (``torch._scaled_mm``, row-wise scales; its output is bf16, then cast to ``x``'s dtype);
    elsewhere, and for shapes it does not take (dimensions not multiples of 16), the same
    arithmetic dequantized in fp32. An :class:`Fp8Activation` (dynamic scales only) skips the
    quantization: a fused kernel produced it."""
    if isinstance(x, Fp8Activation):
        x_fp8, x_scale, dtype = x
        shape, rows, on_cuda = x_fp8.shape, x_fp8.shape[0], x_fp8.is_cuda
    else:
        shape, dtype = x.shape, x.dtype
        x_fp8, x_scale = _quantize_input(x.reshape(-1, shape[-1]), input_scale)
        rows, on_cuda = x_fp8.shape[0], x.is_cuda
    out_features = weight.shape[0]
    if rows == 0:
        return torch.empty(*shape[:-1], out_features, dtype=dtype, device=weight.device)
    if on_cuda and _small_batch_fp8_gemm and rows <= fp8_gemm.SMALL_M_MAX:
        y = fp8_gemm.fp8_gemm_small_m(x_fp8, x_scale, weight, weight_scale, dtype)
    elif on_cuda and shape[-1] % 16 == 0 and out_features % 16 == 0:
        y = torch._scaled_mm(
            x_fp8,
            weight.t(),
            scale_a=x_scale,
            scale_b=weight_scale.view(1, -1),
            out_dtype=torch.bfloat16,
        )
    else:
        dequantized = weight.float() * weight_scale[:, None]
        y = (x_fp8.float() * x_scale) @ dequantized.t()
    return y.to(dtype).reshape(*shape[:-1], out_features)


def _quantize_input(
    x2: torch.Tensor, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scale [rows, 1])``: per token, or with the static per-tensor scale."""
    rows = x2.shape[0]
    if x2.is_cuda:
        if input_scale is None:
            x_fp8, x_scale = fp8_quant.per_token_quant_fp8(x2)
        else:
            x_fp8 = fp8_quant.static_quant_fp8(x2, input_scale)
            x_scale = input_scale.view(1, 1).expand(rows, 1).contiguous()
    elif input_scale is None:
        x_fp8, x_scale = fp8_quant.per_token_quant_fp8_ref(x2)
    else:
        x_fp8 = fp8_quant.static_quant_fp8_ref(x2, input_scale)
        x_scale = input_scale.view(1, 1).expand(rows, 1)
    return x_fp8, x_scale


def rotary_and_write_kv(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """RoPE on the query (in place) and the key, and the rotated key with the value scattered
    into the cache: :func:`rotary_embedding` then :func:`write_kv_cache` in one launch, the
    same bytes. The key tensor keeps its unrotated values on CUDA (the reference rotates a
    copy too), so only the cache holds the rotated key."""
    fn = rotary_kv.rotary_and_write_kv if query.is_cuda else rotary_kv.rotary_and_write_kv_ref
    fn(positions, query, key, value, cos_sin_cache, key_cache, value_cache, slot_mapping,
       k_scale, v_scale)  # fmt: skip


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    mixed: bool = False,
    seq_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the step's queries over the paged cache (see kernels.paged_attention).
    ``max_seqlen_q``/``max_seqlen_k`` are host-side upper bounds that shape the GPU launch, as
    do ``mixed`` (one-token requests beside longer ones) and ``seq_order`` (the requests,
    longest context first); an fp8 cache is read with its per-KV-head scales. The reference
    path computes the same rows without the hints."""
    if query.is_cuda:
        return attention.paged_attention(
            query,
            key_cache,
            value_cache,
            block_tables,
            seq_lens,
            cu_seqlens_q,
            scale,
            max_seqlen_q,
            max_seqlen_k,
            out=out,
            mixed=mixed,
            seq_order=seq_order,
            k_scale=k_scale,
            v_scale=v_scale,
        )
    return attention.paged_attention_ref(
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        cu_seqlens_q,
        scale,
        out=out,
        k_scale=k_scale,
        v_scale=v_scale,
    )


def warm_up_kernels(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    num_heads: int,
    max_query_len: int,
    query_dtype: torch.dtype,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Compile every attention and RoPE + KV-write variant serving can meet (CUDA; nothing to
    do on the CPU)."""
    if key_cache.is_cuda:
        warmup.warm_up_rotary_kv(
            key_cache, value_cache, num_heads, query_dtype=query_dtype, k_scale=k_scale,
            v_scale=v_scale,
        )  # fmt: skip
        warmup.warm_up_attention(
            key_cache,
            value_cache,
            num_heads,
            max_query_len,
            query_dtype=query_dtype,
            k_scale=k_scale,
            v_scale=v_scale,
        )


def compiled_kernel_variants() -> int:
    """Kernel variants compiled in this process so far (0 on the CPU)."""
    return warmup.compiled_variants()
