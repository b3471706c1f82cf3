"""Rotary position embedding applied to q and k (HF's half-split layout, not the interleaved one).

The Triton kernel rotates q and k in place in one launch; the reference below defines its semantics.
"""

from __future__ import annotations

import torch

from kilnlm.kernels.norm import _TRITON_IMPORT_ERROR, require_triton

if _TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    from kilnlm.kernels.norm import round_to


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, T, D) and k (B, Hkv, T, D) by cos/sin (T, D), or (B, T, D) for per-sequence positions,
    which already carry any attention factor."""
    cos = cos.to(q.dtype)
    sin = sin.to(q.dtype)
    if cos.ndim == 3:  # one table per sequence: broadcast over the heads
        cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr,
        HQ, HKV,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sc_b, sc_t, ss_b, ss_t,
        HALF: tl.constexpr, BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        h = tl.program_id(2).to(tl.int64)  # 0..HQ-1 rotate q's heads, HQ..HQ+HKV-1 k's
        if h < HQ:
            base = q_ptr + b * sq_b + h * sq_h + t * sq_t
        else:
            base = k_ptr + b * sk_b + (h - HQ) * sk_h + t * sk_t
        dtype: tl.constexpr = q_ptr.dtype.element_ty
        cos_ptr += b * sc_b  # sc_b = ss_b = 0 when every sequence shares one table
        sin_ptr += b * ss_b
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        # The reference casts the tables to q's dtype and rounds after every op; so do we.
        c1 = round_to(tl.load(cos_ptr + t * sc_t + offs, mask=mask, other=0.0).to(tl.float32), dtype)
        c2 = round_to(tl.load(cos_ptr + t * sc_t + HALF + offs, mask=mask, other=0.0).to(tl.float32), dtype)
        s1 = round_to(tl.load(sin_ptr + t * ss_t + offs, mask=mask, other=0.0).to(tl.float32), dtype)
        s2 = round_to(tl.load(sin_ptr + t * ss_t + HALF + offs, mask=mask, other=0.0).to(tl.float32), dtype)
        x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)  # both halves are read before either is written
        x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        o1 = round_to(round_to(x1 * c1, dtype) + round_to(-x2 * s1, dtype), dtype)
        o2 = round_to(round_to(x2 * c2, dtype) + round_to(x1 * s2, dtype), dtype)
        tl.store(base + offs, o1.to(dtype), mask=mask)
        tl.store(base + HALF + offs, o2.to(dtype), mask=mask)


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_ref, IN PLACE: rotates q (B, Hq, T, D) and k (B, Hkv, T, D) by cos/sin (T, D) or (B, T, D);
    returns (q, k).

    q and k must share a dtype (fp16/bf16/fp32) and device, and each must be a non-overlapping view with unit
    stride along D (a contiguous tensor, or a transposed view such as (B, T, H, D).transpose(1, 2)); the
    rotation is written through that view. cos/sin may be any float dtype; like the reference, they are
    rounded to q's dtype first.
    """
    require_triton("apply_rotary_triton", q, k, cos, sin)
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"apply_rotary_triton: q and k must be (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    bsz, hq, seq, dim = q.shape
    hkv = k.shape[1]
    if k.shape[0] != bsz or k.shape[2:] != (seq, dim) or dim % 2:
        raise ValueError(f"apply_rotary_triton: k {tuple(k.shape)} must be (B, Hkv, T, D) with q's B, T, even D: q is {tuple(q.shape)}")
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"apply_rotary_triton: q and k must share a dtype among fp16/bf16/fp32, got {q.dtype} and {k.dtype}")
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) not in ((seq, dim), (bsz, seq, dim)) or not table.is_floating_point() or table.device != q.device:
            raise ValueError(f"apply_rotary_triton: {name} must be float ({seq}, {dim}) or ({bsz}, {seq}, {dim}) on "
                             f"{q.device}, got {table.dtype} {tuple(table.shape)} on {table.device}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1 or _overlaps(t):
            raise ValueError(
                f"apply_rotary_triton: {name} with strides {t.stride()} cannot be rotated in place; it needs unit "
                f"stride along D and no overlapping elements (pass {name}.contiguous() and use the returned tensor)"
            )
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if q.numel() or k.numel():
        half = dim // 2
        _rotary_kernel[(seq, bsz, hq + hkv)](
            q, k, cos, sin, hq, hkv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            *_table_strides(cos), *_table_strides(sin),
            HALF=half, BLOCK=triton.next_power_of_2(half), num_warps=1 if half <= 128 else 4,
        )
    return q, k


def _table_strides(table: torch.Tensor) -> tuple[int, int]:
    """(sequence stride, position stride) of a (T, D) or (B, T, D) cos/sin table; 0 when shared by the batch."""
    return (table.stride(0), table.stride(1)) if table.ndim == 3 else (0, table.stride(0))


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two indices of t (unit stride along its last dim) can address one element (e.g. an expand())."""
    span = t.shape[-1]  # elements covered by the innermost dim
    for size, stride in sorted(((s, st) for s, st in zip(t.shape[:-1], t.stride()[:-1]) if s > 1), key=lambda p: p[1]):
        if stride < span:
            return True
        span = stride * (size - 1) + span
    return False
