"""The Llama family in one file: Llama 1/2/3, Mistral (sliding window) and Qwen2 (qkv bias).

Reads top to bottom like the paper: token embedding, N x [RMSNorm -> GQA attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual], final RMSNorm, LM head. Every op comes from `kilnlm.kernels`.
Parameter names follow Hugging Face's (without the "model." prefix), so readers map names in one place.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kilnlm import kernels
from kilnlm.runtime.cache import Cache, new_kv_cache
from kilnlm.runtime.paged_cache import new_paged_cache
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.models.cpu_decode import compiled_decode
from kilnlm.runtime.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query self-attention (MHA when kv heads == heads, MQA when there is one kv head)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.window = config.window_for_layer(layer)
        self.use_rope = config.use_rope
        # The attention kernels scale scores by 1/sqrt(head_dim); a model with its own scale (Granite's
        # attention_multiplier) has the ratio folded into q, which every cache kind and kernel then honours.
        self.q_scale = 1.0 if config.attention_scale is None else config.attention_scale * math.sqrt(self.head_dim)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, cache: Cache | None
    ) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); cos/sin are the RoPE tables (None for a model without position encoding)."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = kernels.apply_rotary(q, k, cos, sin)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        if cache is None:
            out = kernels.attention(q, k, v, window=self.window)  # (B, Hq, T, D)
        else:  # the cache stores k, v and attends over every position so far, in its own layout
            out = cache.attend(self.layer, q, k, v, self.window)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block."""

    # Linear layers that see the same input share one set of calibration statistics (one Hessian for q, k, v).
    linear_groups = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: Cache | None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); `rope` is the (cos, sin) tables of the positions of x (None: no RoPE)."""
        x = x + self.self_attn(self.input_layernorm(x), *(rope or (None, None)), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """A decoder-only Llama-family language model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.make_block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config) if config.use_rope else None

    @staticmethod
    def make_block(config: ModelConfig, layer: int) -> DecoderLayer:
        """Block `layer` of a model with `config` (calibration builds blocks one at a time)."""
        return DecoderLayer(config, layer)

    @staticmethod
    def block_context(config: ModelConfig, start: int, length: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the blocks take besides hidden states and cache for positions start..start+length-1: RoPE tables
        (None for a model without position encoding)."""
        return RotaryEmbedding(config).to(device)(start, length) if config.use_rope else None

    def prepare(self, device: torch.device) -> None:
        """Move the RoPE frequencies (a buffer built outside the weights) to `device`."""
        if self.rotary is not None:
            self.rotary.to(device)

    def forward(
        self, input_ids: torch.Tensor, cache: Cache | None = None, *, last_logits_only: bool = False
    ) -> torch.Tensor:
        """Logits (B, T, V) in fp32 for input_ids (B, T), placed after the positions already in `cache`."""
        length = input_ids.shape[1]
        start = 0
        if cache is not None:
            cache.check_room(length)
            start = cache.offsets()  # per sequence for a batch of sequences at different lengths
        rope = self.rotary(start, length) if self.rotary is not None else None
        x = self.embed_tokens(input_ids)  # (B, T, H)
        if self.config.embedding_multiplier != 1.0:  # muP-style scaling (Granite)
            x = x * self.config.embedding_multiplier
        if not compiled_decode(self, x, rope, cache):  # one token on the CPU: every block in one C call, if it can
            for layer in self.layers:
                x = layer(x, rope, cache)
        if cache is not None:
            cache.commit_rows(input_ids)
        if last_logits_only:
            x = x[:, -1:]
        x = self.norm(x)
        if self.lm_head is not None:  # its own matrix, or a packed embedding's bytes (runtime.models.build_model)
            logits = self.lm_head(x).float()
        else:
            logits = torch.nn.functional.linear(x, self.embed_tokens.weight).float()
        return logits / self.config.logits_scaling if self.config.logits_scaling != 1.0 else logits

    def new_cache(self, capacity: int, batch: int = 1, *, paged: bool = False, **kv_options) -> Cache:
        """A KV cache for up to `capacity` positions on the model's device: dense per-layer stores (kv_options:
        see new_kv_cache), or with `paged` one sequence's view of a page pool (see new_paged_cache)."""
        weight = self.norm.weight  # the model dtype and device (the embedding may be packed)
        if paged:
            if batch != 1:
                raise ValueError("a paged cache holds one sequence; make one per sequence over a shared pool")
            return new_paged_cache(self.config, capacity, dtype=weight.dtype, device=weight.device, **kv_options)
        return new_kv_cache(self.config, capacity, batch=batch, dtype=weight.dtype, device=weight.device, **kv_options)
