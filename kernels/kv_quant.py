"""Quantise keys/values into ggml q8_0 / q4_0 blocks along head_dim, as a KV cache writes them every step.

The result is byte-for-byte quant.formats' Q8_0/Q4_0 packing (the tests pin it), but without the registry's
checks that read values back to the host (non-finite input, fp16 overflow of a scale): a cache write happens
per layer per token, and on a GPU every such read is a synchronisation. Layouts: kernels.attention's
KV_BLOCK_LAYOUTS.
"""

from __future__ import annotations

import torch

from kilnlm.kernels.attention import KV_BLOCK_LAYOUTS, QK
from kilnlm.kernels.norm import _TRITON_IMPORT_ERROR, require_triton

if _TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C roundf (ties away from zero), exact for every float32, as quant.formats computes it."""
    a = x.abs()
    floored = a.floor()
    return (a - floored).mul_(2).floor_().add_(floored).copysign_(x)


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    """1/d as ggml computes it, 0 where d is 0 or 1/d overflows."""
    inv = 1.0 / d
    return torch.where((d == 0) | torch.isinf(inv), torch.zeros_like(inv), inv)


def quantize_kv_ref(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x (..., D) float -> uint8 (..., D // 32 * bytes per block) in ggml's q8_0 or q4_0 layout."""
    blocks = x.float().reshape(-1, QK)
    if fmt == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        codes = _round_half_away(blocks * _reciprocal(d)).to(torch.int8).view(torch.uint8)
    elif fmt == "q4_0":
        # The signed value of largest magnitude (the first of equals) maps to code 0: d = peak / -8.
        peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
        d = torch.where(peak == 0, torch.zeros_like(peak), peak) / -8
        q = (blocks * _reciprocal(d) + 8.5).floor().clamp(max=15).to(torch.uint8)
        codes = q[:, : QK // 2] | (q[:, QK // 2 :] << 4)
    else:
        raise ValueError(f"quantize_kv_ref: unknown KV block format {fmt!r} (q8_0, q4_0)")
    scale = d.to(torch.float16).view(torch.uint8)  # (n, 2), little-endian
    return torch.cat([scale, codes], dim=-1).reshape(*x.shape[:-1], x.shape[-1] // QK * KV_BLOCK_LAYOUTS[fmt][0])


if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _value_at_first_max(x, j):
        """Per row of x (n, 16): (largest |value|, the first value of that magnitude, sign kept)."""
        magnitude = tl.abs(x)
        first = tl.argmax(magnitude, 1, tie_break_left=True)
        return tl.max(magnitude, 1), tl.sum(tl.where(j[None, :] == first[:, None], x, 0.0), 1)

    @triton.jit
    def _round_half_away_tl(y):
        a = tl.abs(y)
        rounded = tl.floor(a) + tl.floor((a - tl.floor(a)) * 2.0)  # exact, as the reference
        return tl.where(y < 0, -rounded, rounded)

    @triton.jit
    def _quantize_kv_kernel(x_ptr, out_ptr, n_blocks, FMT: tl.constexpr, BLOCKS: tl.constexpr):
        # One program packs BLOCKS consecutive 32-value blocks, each read as its two halves (values 0-15 and
        # 16-31): q4_0 puts them in the low and high nibbles of the same 16 bytes.
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        ok = block < n_blocks
        j = tl.arange(0, 16)
        src = x_ptr + block[:, None].to(tl.int64) * 32 + j[None, :]
        lo = tl.load(src, mask=ok[:, None], other=0.0).to(tl.float32)
        hi = tl.load(src + 16, mask=ok[:, None], other=0.0).to(tl.float32)
        max_lo, peak_lo = _value_at_first_max(lo, j)
        max_hi, peak_hi = _value_at_first_max(hi, j)
        if FMT == 1:
            d = tl.maximum(max_lo, max_hi) / 127.0
        else:
            peak = tl.where(max_lo >= max_hi, peak_lo, peak_hi)  # the first of equal magnitudes
            d = tl.where(peak == 0, 0.0, peak) / -8.0
        inv = tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d)
        inv = tl.where((d == 0) | (tl.abs(inv) == float("inf")), 0.0, inv)
        block_bytes: tl.constexpr = 34 if FMT == 1 else 18
        out = out_ptr + block.to(tl.int64) * block_bytes
        scale_bits = d.to(tl.float16).to(tl.uint16, bitcast=True)
        tl.store(out, (scale_bits & 0xFF).to(tl.uint8), mask=ok)
        tl.store(out + 1, (scale_bits >> 8).to(tl.uint8), mask=ok)
        codes = out[:, None] + 2 + j[None, :]
        if FMT == 1:
            tl.store(codes, _round_half_away_tl(lo * inv[:, None]).to(tl.int8).to(tl.uint8, bitcast=True),
                     mask=ok[:, None])
            tl.store(codes + 16, _round_half_away_tl(hi * inv[:, None]).to(tl.int8).to(tl.uint8, bitcast=True),
                     mask=ok[:, None])
        else:
            q_lo = tl.minimum(tl.floor(lo * inv[:, None] + 8.5), 15.0).to(tl.uint8)
            q_hi = tl.minimum(tl.floor(hi * inv[:, None] + 8.5), 15.0).to(tl.uint8)
            tl.store(codes, q_lo | (q_hi << 4), mask=ok[:, None])


def quantize_kv_triton(x: torch.Tensor, fmt: str, blocks_per_program: int = 16) -> torch.Tensor:
    """quantize_kv_ref's bytes from one kernel launch, without host synchronisation."""
    require_triton("quantize_kv_triton", x)
    if fmt not in KV_BLOCK_LAYOUTS or x.shape[-1] % QK:
        raise ValueError(f"quantize_kv_triton: {fmt!r} blocks of 32 do not pack a last dimension of {x.shape[-1]}")
    flat = x.contiguous()
    n_blocks = flat.numel() // QK
    out = torch.empty((*x.shape[:-1], x.shape[-1] // QK * KV_BLOCK_LAYOUTS[fmt][0]), dtype=torch.uint8,
                      device=x.device)
    if n_blocks:
        grid = (triton.cdiv(n_blocks, blocks_per_program),)
        _quantize_kv_kernel[grid](flat, out, n_blocks, FMT=1 if fmt == "q8_0" else 2, BLOCKS=blocks_per_program)
    return out
