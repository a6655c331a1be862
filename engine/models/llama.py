"""The Llama family: Llama 2/3 (llama3 RoPE scaling), Mistral, Qwen2 (QKV bias), Qwen3 (q/k
RMSNorm). One implementation; the differences are flags of :class:`ModelArchConfig`.

With an :class:`~metroline.engine.quantization.Fp8Config` the four projections of each layer
hold fp8 weights unless the config ignores their checkpoint modules; embeddings, norms and the
LM head stay in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import ModelArchConfig
from ..layers.activation import SiluAndMul
from ..layers.attention import Attention, AttentionMetadata
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ..layers.fp8_linear import takes_fp8_input
from ..layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..quantization import Fp8Config


def _fp8_for(fp8: Fp8Config | None, prefix: str, modules: tuple[str, ...]) -> Fp8Config | None:
    """``fp8`` unless the config leaves the checkpoint modules ``prefix.<module>`` unquantized."""
    if fp8 is None or not fp8.quantizes([f"{prefix}.{module}" for module in modules]):
        return None
    return fp8


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelArchConfig,
        max_positions: int,
        prefix: str,
        fp8: Fp8Config | None,
        kv_fp8: bool,
    ) -> None:
        super().__init__()
        head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.qkv_bias,
            fp8=_fp8_for(fp8, prefix, ("q_proj", "k_proj", "v_proj")),
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim,
            config.hidden_size,
            bias=config.o_proj_bias,
            fp8=_fp8_for(fp8, prefix, ("o_proj",)),
        )
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = RotaryEmbedding(
            head_dim, max_positions, config.rope_theta, config.rope_scaling
        )
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            head_dim,
            head_dim**-0.5,
            kv_fp8=kv_fp8,
            kv_head_start=self.qkv_proj.kv_head_start,
            total_kv_heads=config.num_key_value_heads,
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        attn_metadata: AttentionMetadata | None,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        num_tokens = qkv.shape[0]
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        out = self.attn(q, k, v, attn_metadata, positions, self.rotary_emb.cos_sin_cache)
        return self.o_proj(out.reshape(num_tokens, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelArchConfig, prefix: str, fp8: Fp8Config | None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=config.mlp_bias,
            fp8=_fp8_for(fp8, prefix, ("gate_proj", "up_proj")),
        )
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=config.mlp_bias,
            fp8=_fp8_for(fp8, prefix, ("down_proj",)),
        )
        self.act_fn.quantize_fp8 = takes_fp8_input(self.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelArchConfig,
        max_positions: int,
        prefix: str,
        fp8: Fp8Config | None,
        kv_fp8: bool,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, max_positions, f"{prefix}.self_attn", fp8, kv_fp8)
        self.mlp = LlamaMLP(config, f"{prefix}.mlp", fp8)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The norms' outputs feed one projection each: quantize them in the norm's kernel.
        self.input_layernorm.quantize_fp8 = takes_fp8_input(self.self_attn.qkv_proj)
        self.post_attention_layernorm.quantize_fp8 = takes_fp8_input(self.mlp.gate_up_proj)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        attn_metadata: AttentionMetadata | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(
        self, config: ModelArchConfig, max_positions: int, fp8: Fp8Config | None, kv_fp8: bool
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, max_positions, f"model.layers.{i}", fp8, kv_fp8)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata | None,
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Checkpoint names map onto packed parameters: q/k/v -> ``qkv_proj``, gate/up ->
    ``gate_up_proj`` (see :attr:`packed_modules_mapping`)."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        config: ModelArchConfig,
        max_positions: int,
        fp8: Fp8Config | None = None,
        kv_fp8: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions, fp8, kv_fp8)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata | None,
    ) -> torch.Tensor:
        """Hidden states of every input token, ``[num_tokens, hidden]``."""
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
