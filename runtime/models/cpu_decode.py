"""A Llama-family decode step on the CPU in one call into the C kernels (kernels.cpu.decode_blocks).

At one new token of one sequence, a block's modules issue about 40 torch ops (norms, views, RoPE, the cache
write, residual adds), and on a small model their dispatch costs as much as the block's matmuls. When every
block is the plain Llama DecoderLayer over CPU-packed weights (runtime.models.quantized_linear) and the cache
keeps every position in float buffers, the whole stack of blocks runs as one C function over the same weights,
cache buffers and kernels instead. Anything else (a batch, a prompt, a quantized or sliding-window cache, float
weights, autograd) runs the modules, which stay the reference: tests/test_cpu_decode.py holds the two to the
same logits and greedy tokens.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from kilnlm.kernels.cpu import CpuOptions, DecodeBlock, DecodeBlocks, GGMLMatrix, Part, decode_blocks
from kilnlm.runtime.cache import Cache, LayerCache
from kilnlm.runtime.kv_stores import FloatCodec, FullStore
from kilnlm.runtime.models.quantized_linear import QuantizedLinear

_PLANS = "_cpu_decode_plans"  # per model: the prepared step of each cache (None: this cache cannot take it)


def compiled_decode(model: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                    cache: Cache | None) -> bool:
    """Run every block of `model` on x (1, 1, hidden) in place through the compiled step; False (x untouched)
    when this step is not one it takes, and the caller runs the blocks' modules."""
    if cache is None or rope is None or x.is_cuda or x.shape[:2] != (1, 1) or x.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() or not x.is_contiguous():
        return False
    cos, sin = rope
    if cos.ndim != 2 or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        return False
    plans = model.__dict__.setdefault(_PLANS, weakref.WeakKeyDictionary())
    if cache not in plans:
        plans[cache] = _prepare(model, cache)
    step: DecodeBlocks | None = plans[cache]
    if step is None:
        return False
    step(x.view(-1), cache.length, cos[0].contiguous(), sin[0].contiguous())
    return True


def _prepare(model: nn.Module, cache: Cache) -> DecodeBlocks | None:
    from kilnlm.runtime.models.llama import MLP, Attention, DecoderLayer

    if not isinstance(cache, LayerCache) or len(cache.stores) != len(model.layers):
        return None
    blocks, options, eps = [], set(), set()
    for layer, store in zip(model.layers, cache.stores, strict=True):
        if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention or type(layer.mlp) is not MLP:
            return None
        attention, mlp = layer.self_attn, layer.mlp
        if attention.q_scale != 1.0 or not attention.use_rope or not _float_store(store):
            return None
        linears = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj,
                   mlp.up_proj, mlp.down_proj)
        if not all(isinstance(m, QuantizedLinear) and isinstance(m._weight, GGMLMatrix) for m in linears):
            return None
        options |= {m.cpu for m in linears}
        eps |= {layer.input_layernorm.eps, layer.post_attention_layernorm.eps}
        blocks.append(DecodeBlock(
            attn_norm=layer.input_layernorm.weight.detach(), mlp_norm=layer.post_attention_layernorm.weight.detach(),
            qkv=_parts(linears[:3]), o=_parts(linears[3:4])[0], gate_up=_parts(linears[4:6]),
            down=_parts(linears[6:])[0], keys=store.keys[0], values=store.values[0], window=attention.window))
    if len(options) != 1 or len(eps) != 1:
        return None
    option: CpuOptions = options.pop()
    return decode_blocks(blocks, model.config.num_heads, eps.pop(), option)


def _float_store(store) -> bool:
    """A store the C step writes as the modules would: every position, float keys and values, one sequence."""
    return (type(store) is FullStore and isinstance(store.k_codec, FloatCodec) and isinstance(store.v_codec, FloatCodec)
            and store.keys.shape[0] == 1)


def _parts(linears: tuple[QuantizedLinear, ...]) -> tuple[Part, ...]:
    """The matrices whose outputs concatenate to these linears' outputs: one stacked matrix where the linears were
    fused in this order (runtime.models.quantized_linear.FusedLinears), else each linear's own, with its bias."""
    group = linears[0]._group
    if group is not None and len(group.sizes) == len(linears) and \
            all(m._group is group and m._index == i for i, m in enumerate(linears)):
        return ((group.matrix, None),)
    return tuple((m._weight, None if m.bias is None else m.bias.detach().float().contiguous()) for m in linears)
