"""Causal (optionally sliding-window) grouped-query attention over a prefix of cached keys.

The reference uses torch SDPA with an explicit bottom-right mask (SDPA's is_causal is top-left aligned, wrong
when the T queries follow S - T cached positions). The Triton kernel is FlashAttention: an online softmax
over K/V tiles, the query heads of a GQA group sharing each tile, tiles outside the causal window skipped.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kilnlm.kernels.norm import _TRITON_IMPORT_ERROR, require_triton

if _TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl


def attention_mask(
    num_queries: int, num_keys: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean (T, S) mask for queries at positions S-T .. S-1 over keys 0 .. S-1; None when nothing is masked."""
    start = num_keys - num_queries
    if window is None and num_queries == 1:
        return None
    q_pos = torch.arange(start, num_keys, device=device)[:, None]
    k_pos = torch.arange(num_keys, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v for q (B, Hq, T, D) and k, v (B, Hkv, S, D); the T queries are the last T positions."""
    batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    if group > 1:
        # Query head h reads kv head h // group, as HF's repeat_kv lays them out.
        k = k[:, :, None].expand(batch, num_kv_heads, group, num_keys, head_dim).reshape(batch, num_heads, num_keys, head_dim)
        v = v[:, :, None].expand(batch, num_kv_heads, group, num_keys, head_dim).reshape(batch, num_heads, num_keys, head_dim)
    if window is None and num_queries == num_keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = attention_mask(num_queries, num_keys, window, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if mask is not None:  # a query that may see no key (window 0, padding) gets zeros, not SDPA's NaN
        out = out.masked_fill(~mask.any(-1)[:, None], 0.0)
    return out


# --------------------------------------------------------------------------------------------- Triton: prefill

if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _flash_prefill_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr,
        T, S, HKV, WINDOW, scale,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_t,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        # One program: BLOCK_M queries of every query head of one kv head's group, as one tile of
        # GROUP_PAD * BLOCK_M rows (row r is head r // BLOCK_M, query r % BLOCK_M), so each K/V tile is
        # loaded once for the whole group.
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        b, kv_head = bh // HKV, bh % HKV
        rows = tl.arange(0, GROUP_PAD * BLOCK_M)
        head = kv_head * GROUP + rows // BLOCK_M
        t = start_m + rows % BLOCK_M
        row_ok = (rows // BLOCK_M < GROUP) & (t < T)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        offset = S - T  # the queries are the last T of the S positions
        q_pos = offset + t
        q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        m_i = tl.full((GROUP_PAD * BLOCK_M,), -1.0e30, tl.float32)
        l_i = tl.zeros((GROUP_PAD * BLOCK_M,), tl.float32)
        acc = tl.zeros((GROUP_PAD * BLOCK_M, BLOCK_D), tl.float32)
        # Key tiles wholly after the last query, or wholly before the first query's window, are skipped.
        hi = tl.minimum(S, offset + start_m + BLOCK_M)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(0, offset + start_m - WINDOW + 1) // BLOCK_N * BLOCK_N
        k_base = k_ptr + b * sk_b + kv_head * sk_h
        v_base = v_ptr + b * sv_b + kv_head * sv_h
        for start_n in range(lo, hi, BLOCK_N):
            k_pos = start_n + tl.arange(0, BLOCK_N)
            k_ok = k_pos < S
            k = tl.load(k_base + k_pos[None, :] * sk_s + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, k, input_precision=PRECISION) * scale  # (rows, BLOCK_N) fp32
            allowed = row_ok[:, None] & k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                allowed &= q_pos[:, None] - k_pos[None, :] < WINDOW
            s = tl.where(allowed, s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.where(allowed, tl.exp(s - m_new[:, None]), 0.0)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + k_pos[:, None] * sv_s + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            p = p.to(v_ptr.dtype.element_ty)  # P is rounded to the K/V dtype for the tensor-core product
            if DOT_F32:
                p, v = p.to(tl.float32), v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new
        # A row no key may be seen by (a window smaller than the gap) has l = 0: it gives zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + b * so_b + head[:, None] * so_h + t[:, None] * so_t + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                     block_m: int | None = None, block_n: int = 32) -> torch.Tensor:
    """FlashAttention over q (B, Hq, T, D) and k, v (B, Hkv, S, D); the same result as attention_ref.

    GQA reads each K/V tile once per group of query heads; a sliding window skips the tiles outside it.
    """
    require_triton("attention_triton", q, k, v)
    batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"attention_triton: q {tuple(q.shape)} does not fit k {tuple(k.shape)} / v {tuple(v.shape)}")
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    if block_m is None:  # keep the group's tile near 64 rows
        block_m = max(16, min(64, 64 // group_pad, triton.next_power_of_2(num_queries)))
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    grid = (triton.cdiv(num_queries, block_m), batch * num_kv_heads)
    # The interpreter's tl.dot mishandles bf16; products of bf16 values are exact in fp32 and both paths
    # accumulate in fp32, so multiplying upcast tiles there is the same arithmetic.
    dot_f32 = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    _flash_prefill_kernel[grid](
        q, k, v, out, num_queries, num_keys, num_kv_heads, window or 0, head_dim**-0.5,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_WINDOW=window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 or dot_f32 else "tf32", DOT_F32=dot_f32,
    )
    return out
