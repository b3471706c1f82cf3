"""Decode attention ("flash-decoding") over a paged KV pool whose blocks may be ggml-quantized.

Layout read (what a paged cache keeps): per layer a pool of pages (num_pages, Hkv, PAGE, row), a block table
(B, max_pages) of page ids per sequence and the sequences' lengths (B,). A row is head_dim values of the
pool's float dtype, or head_dim // 32 ggml blocks (q8_0 / q4_0) in their own byte layout (see
kernels.attention.KV_BLOCK_LAYOUTS, shared with the prefill kernel).

The Triton kernel splits every sequence's keys over programs (split-K), dequantises each K/V tile in
registers (no float copy of the cache is ever made), keeps an online softmax per split, and writes only the
split's running max, sum and weighted values; a log-sum-exp merge combines the splits. The reference
gathers, dequantises and calls the prefill reference: slow and simple.
"""

from __future__ import annotations

import torch

from kilnlm.kernels.attention import _FMT_ID, QK, paged_attention_ref
from kilnlm.kernels.norm import _TRITON_IMPORT_ERROR, require_triton

if _TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    from kilnlm.kernels.attention import load_kv_rows, locate_keys

def decode_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, k_fmt: str | None = None, v_fmt: str | None = None,
                         window: int | None = None) -> torch.Tensor:
    """Attention of q (B, Hq, D), one query per sequence at its last position, over the paged K/V; (B, Hq, D)."""
    return paged_attention_ref(q[:, :, None], k_pool, v_pool, block_table, seq_lens, k_fmt, v_fmt, window)[:, :, 0]


if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _decode_kernel(
        q_ptr, k_pool, v_pool, table_ptr, lens_ptr, acc_ptr, max_ptr, sum_ptr,
        HKV, WINDOW, PAGE, scale, KEYS_PER_SPLIT,
        sq_b, sq_h, sk_page, sk_head, sk_slot, sv_page, sv_head, sv_slot, st_b,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, K_FMT: tl.constexpr,
        V_FMT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        b, kv_head = bh // HKV, bh % HKV
        length = tl.load(lens_ptr + b)
        lo = split * KEYS_PER_SPLIT
        hi = tl.minimum(length, lo + KEYS_PER_SPLIT)
        if HAS_WINDOW:  # the query (position length - 1) sees keys length - WINDOW .. length - 1
            lo = tl.maximum(lo, length - WINDOW)
        rows = tl.arange(0, GROUP_PAD)
        head = kv_head * GROUP + rows
        row_ok = rows < GROUP
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        m_i = tl.full((GROUP_PAD,), -1.0e30, tl.float32)
        l_i = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, BLOCK_D), tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            key_ok = pos < hi
            page, slot = locate_keys(table_ptr, b, st_b, pos, key_ok, PAGE)
            ok = key_ok[:, None] & d_ok[None, :]
            k = load_kv_rows(k_pool, page, slot, kv_head, sk_page, sk_head, sk_slot, d, ok, K_FMT).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (GROUP_PAD, BLOCK_N)
            s = tl.where(row_ok[:, None] & key_ok[None, :], s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.where(key_ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
            alpha = tl.exp(m_i - m_new)
            v = load_kv_rows(v_pool, page, slot, kv_head, sv_page, sv_head, sv_slot, d, ok, V_FMT).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = (b * HKV * GROUP + head) * NUM_SPLITS + split  # partials laid out (B, Hq, NUM_SPLITS, ...)
        tl.store(acc_ptr + out[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(max_ptr + out, m_i, mask=row_ok)
        tl.store(sum_ptr + out, l_i, mask=row_ok)


def decode_attention_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                            seq_lens: torch.Tensor, k_fmt: str | None = None, v_fmt: str | None = None,
                            window: int | None = None, num_splits: int | None = None,
                            block_n: int = 16) -> torch.Tensor:
    """decode_attention_ref's result, reading the (possibly quantized) pages directly; split-K + LSE merge."""
    require_triton("decode_attention_triton", q, k_pool, v_pool)
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k_pool.shape[1], k_pool.shape[2]
    if num_heads % num_kv_heads or ((k_fmt or v_fmt) and head_dim % QK):
        raise ValueError(f"decode_attention_triton: q {tuple(q.shape)} does not fit the pool {tuple(k_pool.shape)}")
    group = num_heads // num_kv_heads
    longest = int(seq_lens.max())
    if num_splits is None:  # enough programs to fill a GPU, each with at least a few tiles
        num_splits = max(1, min(64, triton.cdiv(longest, 4 * block_n), triton.cdiv(256, batch * num_kv_heads)))
    keys_per_split = triton.cdiv(triton.cdiv(longest, num_splits), block_n) * block_n
    block_d = triton.next_power_of_2(head_dim)
    acc = torch.empty((batch, num_heads, num_splits, block_d), dtype=torch.float32, device=q.device)
    maxes = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxes)
    q = q if q.stride(-1) == 1 else q.contiguous()
    _decode_kernel[(batch * num_kv_heads, num_splits)](
        q, k_pool, v_pool, block_table, seq_lens, acc, maxes, sums,
        num_kv_heads, window or 0, page, head_dim**-0.5, keys_per_split,
        q.stride(0), q.stride(1), *k_pool.stride()[:3], *v_pool.stride()[:3], block_table.stride(0),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, K_FMT=_FMT_ID[k_fmt], V_FMT=_FMT_ID[v_fmt],
        HAS_WINDOW=window is not None,
    )
    # Log-sum-exp merge of the splits (tiny: B x Hq x splits values); a split with no key has sum 0.
    weights = torch.exp(maxes - maxes.amax(-1, keepdim=True))  # (B, Hq, splits)
    total = (weights * sums).sum(-1, keepdim=True)
    out = (weights[..., None] * acc).sum(2) / torch.where(total > 0, total, 1.0)
    return out[..., :head_dim].to(q.dtype)
