"""IBM Granite-4.0-H in one file: a hybrid stack of Mamba-2 and attention layers (transformers'
GraniteMoeHybridForCausalLM, dense variant; llama.cpp's `granitehybrid`).

Reads top to bottom like the model card: token embedding x embedding_multiplier, N x [RMSNorm -> mixer (a
Mamba-2 SSD mixer, or GQA attention usually without position encoding) -> residual add of x
residual_multiplier, RMSNorm -> SwiGLU MLP -> residual add of x residual_multiplier], final RMSNorm, LM head,
logits / logits_scaling. The pieces are the Llama file's attention and MLP and the Mamba file's Mamba-2 mixer;
the cache holds keys and values for the attention layers and a float32 recurrent state for the Mamba layers.
HF's fused shared_mlp.input_linear is read as the MLP's gate_proj and up_proj halves (export/hf.py), as
llama.cpp also splits it.
"""

from __future__ import annotations

import torch
from torch import nn

from kilnlm.runtime.cache import Cache, LayerCache, new_kv_cache
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.models.llama import MLP, Attention, LlamaModel, RMSNorm
from kilnlm.runtime.models.mamba import Mamba2Mixer

_MLP_GROUPS = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
LINEAR_GROUPS = {
    "attention": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), *_MLP_GROUPS),
    "mamba": (("mamba.in_proj",), ("mamba.out_proj",), *_MLP_GROUPS),
}


class HybridBlock(nn.Module):
    """Pre-norm block whose token mixer is Mamba-2 or attention, with scaled residual adds."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.kind = config.layer_kind(layer)
        self.linear_groups = LINEAR_GROUPS[self.kind]
        self.residual_multiplier = config.residual_multiplier
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.kind == "mamba":
            self.mamba = Mamba2Mixer(config.ssm, config.hidden_size, config.rms_norm_eps)
        else:
            self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: Cache | None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); `rope` is the (cos, sin) tables, or None without position encoding."""
        h = self.input_layernorm(x)
        if self.kind == "mamba":
            h = self.mamba(h, None if cache is None else cache.state(self.layer))
        else:
            h = self.self_attn(h, *(rope or (None, None)), cache)
        x = x + h * self.residual_multiplier
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier


class GraniteHybridModel(LlamaModel):
    """A Granite-4.0-H language model (dense: one MLP per layer, no experts): the Llama model's embedding, loop,
    multipliers and head around hybrid blocks."""

    @staticmethod
    def make_block(config: ModelConfig, layer: int) -> HybridBlock:
        """Block `layer` of a model with `config` (calibration builds blocks one at a time)."""
        return HybridBlock(config, layer)

    def new_cache(self, capacity: int, batch: int = 1, *, paged: bool = False, **kv_options) -> LayerCache:
        """Keys and values for the attention layers (kv_options: see new_kv_cache) and a recurrent state for the
        Mamba layers, for `batch` sequences of up to `capacity` tokens."""
        if paged:
            from kilnlm.runtime.kv_stores import CacheTypeError

            raise CacheTypeError("the paged KV cache does not hold recurrent state yet; load this hybrid model "
                                 "without paged_kv")
        weight = self.norm.weight  # the model dtype and device (the embedding may be packed)
        return new_kv_cache(self.config, capacity, batch=batch, dtype=weight.dtype, device=weight.device, **kv_options)
