"""Orthonormal Walsh-Hadamard rotation along the last dimension, block-diagonal when it is not a power of two.

A quantized KV cache rotates keys and values before packing them (ExLlamaV2's Q4 cache, llama.cpp's rotated
KV): the rotation spreads an outlier channel over the whole block, so one large value no longer sets the
scale that every small value of its block is rounded to. The normalised Sylvester matrix H is symmetric and
orthonormal (H @ H = I), so the same call undoes it; q·k is unchanged when both sides are rotated.
"""

from __future__ import annotations

import torch


def hadamard_size(dim: int) -> int:
    """The rotation's block: the largest power of two dividing `dim` (128 -> 128, 80 -> 16, 96 -> 32)."""
    return dim & -dim


def hadamard_rotate_ref(x: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """x (..., D) times the block-diagonal orthonormal Hadamard matrix with blocks of `size` (default: the largest)."""
    dim = x.shape[-1]
    size = hadamard_size(dim) if size is None else size
    if size & (size - 1) or dim % size:
        raise ValueError(f"Hadamard blocks of {size} do not tile a last dimension of {dim}")
    out = x.to(torch.float32).reshape(-1, dim // size, size)
    half = 1
    while half < size:  # fast Walsh-Hadamard transform: log2(size) butterfly stages
        pairs = out.view(out.shape[0], out.shape[1], size // (2 * half), 2, half)
        low, high = pairs[..., 0, :], pairs[..., 1, :]
        out = torch.stack([low + high, low - high], dim=-2).view(out.shape)
        half *= 2
    return (out * size**-0.5).reshape(x.shape).to(x.dtype)
