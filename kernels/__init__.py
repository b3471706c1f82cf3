"""Compute kernels, each beside its pure-torch reference, and the one place that picks between them.

On a CUDA tensor the Triton kernel runs; on the CPU the compiled C kernels (kernels.cpu) run where they take the
tensors (float32 RMSNorm and RoPE, decode attention, packed weights), else the reference. Nothing else in the
codebase chooses a kernel. There is no silent fallback: a CUDA tensor without triton installed raises.
"""

from __future__ import annotations

import math

import torch

from kilnlm.kernels.activation import silu_mul_ref
from kilnlm.kernels.attention import attention_ref, attention_triton, paged_attention_ref, paged_attention_triton
from kilnlm.kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_triton
from kilnlm.kernels.decode_attention import decode_attention_ref, decode_attention_triton
from kilnlm.kernels.hadamard import hadamard_rotate_ref as hadamard_rotate
from kilnlm.kernels.kv_quant import quantize_kv_ref, quantize_kv_triton
from kilnlm.kernels.norm import gated_rms_norm_ref, gated_rms_norm_triton, rms_norm_ref
from kilnlm.kernels.rope import apply_rotary_ref
from kilnlm.kernels.selective_scan import selective_scan_ref, selective_scan_triton
from kilnlm.kernels.ssd import ssd_scan_ref, ssd_scan_triton

__all__ = ["apply_rotary", "attention", "decode_attention", "hadamard_rotate", "paged_attention", "quantize_kv", "int8_linear", "packed_matmul", "rms_norm", "silu_mul",
           "causal_conv1d", "selective_scan", "ssd_scan", "gated_rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (fp32 statistics, HF's rounding order)."""
    if x.is_cuda:
        from kilnlm.kernels.norm import rms_norm_triton

        return rms_norm_triton(x.contiguous(), weight, eps)
    from kilnlm.kernels import cpu

    out = cpu.rms_norm(x, weight, eps, torch.get_num_threads())
    return out if out is not None else rms_norm_ref(x, weight, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) GQA attention; the T queries are the last T of the S key positions.
    k and v may be stored in another float dtype than q (a float16 cache of a float32 model): they count as q's."""
    if q.shape[2] == 1 and not q.is_cuda:  # a CPU decode step: the compiled kernel reads k, v as stored
        from kilnlm.kernels import cpu

        out = cpu.decode_attention(q, k, v, window, torch.get_num_threads())
        if out is not None:
            return out
    k, v = k.to(q.dtype), v.to(q.dtype)
    return attention_triton(q, k, v, window) if q.is_cuda else attention_ref(q, k, v, window)


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, k_fmt: str | None, v_fmt: str | None, window: int | None) -> torch.Tensor:
    """One query per sequence over a paged (optionally q8_0 / q4_0) KV pool; see kernels.decode_attention."""
    if q.is_cuda:
        return decode_attention_triton(q, k_pool, v_pool, block_table, seq_lens, k_fmt, v_fmt, window)
    return decode_attention_ref(q, k_pool, v_pool, block_table, seq_lens, k_fmt, v_fmt, window)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, k_fmt: str | None, v_fmt: str | None, window: int | None) -> torch.Tensor:
    """q (B, Hq, T, D) at the end of each sequence, over paged (optionally q8_0 / q4_0) K/V: the split-K decode
    kernel for one query, FlashAttention over the pages for more."""
    if q.shape[2] == 1:
        args = (k_pool, v_pool, block_table, seq_lens, k_fmt, v_fmt, window)
        return decode_attention(q[:, :, 0], *args)[:, :, None]
    kernel = paged_attention_triton if q.is_cuda else paged_attention_ref
    return kernel(q, k_pool, v_pool, block_table, seq_lens, k_fmt, v_fmt, window)


def quantize_kv(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Keys or values (..., D) packed into ggml q8_0 / q4_0 blocks along D (uint8), without host syncs."""
    return quantize_kv_triton(x, fmt) if x.is_cuda else quantize_kv_ref(x, fmt)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on q (B, Hq, T, D) and k (B, Hkv, T, D) with (T, D) tables."""
    if q.is_cuda:
        from kilnlm.kernels.rope import apply_rotary_triton

        # The Triton kernel rotates in place, so give it fresh contiguous copies of the projection views.
        return apply_rotary_triton(q.contiguous(), k.contiguous(), cos, sin)
    from kilnlm.kernels import cpu

    return cpu.apply_rotary(q, k, cos, sin) or apply_rotary_ref(q, k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up."""
    if gate.is_cuda:
        from kilnlm.kernels.activation import silu_mul_triton

        return silu_mul_triton(gate.contiguous(), up.contiguous())
    return silu_mul_ref(gate, up)


def packed_matmul(x: torch.Tensor, weight, cpu_options=None) -> torch.Tensor:
    """x · dequant(W)ᵀ for a packed ggml weight: Triton planes (kernels.dequant_matmul.PackedWeight) on CUDA, or the
    file's blocks on the CPU (kernels.cpu.GGMLMatrix, as `cpu_options` (cpu.CpuOptions) say; the C kernels
    when this machine could build them, else the pure-torch reference: see cpu.kernel_status)."""
    from kilnlm.kernels import dequant_matmul as dm
    from kilnlm.kernels.cpu import CpuOptions, GGMLMatrix, ggml_matmul

    if isinstance(weight, GGMLMatrix):
        return ggml_matmul(x, weight, cpu_options or CpuOptions())
    return dm.dequant_matmul(x, weight) if x.is_cuda else dm.dequant_matmul_ref(x, weight)


def int8_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """LLM.int8's W8A8 + fp16-outlier product for a quant.llm_int8.Int8Weight."""
    if x.is_cuda:
        from kilnlm.kernels.int8_matmul import int8_linear_triton

        return int8_linear_triton(x, weight, bias)
    # The reference lives with the Int8Weight format it defines; imported here only when it runs.
    from kilnlm.quant.llm_int8 import int8_linear_forward

    return int8_linear_forward(x, weight, bias)


# --------------------------------------------------------------------------------------------- Mamba


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None,
                  activation: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's depthwise causal conv of x (B, T, C) after the rolling state (B, C, K-1): (y, new_state)."""
    kernel = causal_conv1d_triton if x.is_cuda else causal_conv1d_ref
    return kernel(x, weight, bias, state, activation)


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
                   state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1's selective scan over x (B, T, D) from state (B, D, N): (y, final_state); see kernels.selective_scan."""
    kernel = selective_scan_triton if x.is_cuda else selective_scan_ref
    return kernel(x, dt, A, B, C, D, z, dt_bias, state)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
             dt_bias: torch.Tensor | None, state: torch.Tensor | None,
             dt_limit: tuple[float, float] = (0.0, math.inf)) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's chunked SSD scan over x (B, T, H, P) from state (B, H, P, N): (y, final_state); see kernels.ssd."""
    kernel = ssd_scan_triton if x.is_cuda else ssd_scan_ref
    return kernel(x, dt, A, B, C, D, dt_bias, state, dt_limit)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int) -> torch.Tensor:
    """Mamba-2's RMSNorm of x * silu(z), per group of group_size channels."""
    kernel = gated_rms_norm_triton if x.is_cuda else gated_rms_norm_ref
    return kernel(x, z, weight, eps, group_size)
