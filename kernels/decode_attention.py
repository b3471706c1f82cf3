"""Decode attention ("flash-decoding") over a paged KV pool whose blocks may be ggml-quantized.

Layout read (what a paged cache keeps): per layer a pool of pages (num_pages, Hkv, PAGE, row), a block table
(B, max_pages) of page ids per sequence and the sequences' lengths (B,). A row is head_dim values of the
pool's float dtype, or head_dim // 32 ggml blocks in their own byte layout (uint8): q8_0 = fp16 scale + 32
int8 codes (34 bytes), q4_0 = fp16 scale + 16 bytes of nibbles (18 bytes; value i in the low nibble of
byte i for i < 16, in the high nibble of byte i - 16 otherwise, value = (nibble - 8) * scale). The layouts
are restated here because kernels may not import `quant` (they sit below it); the tests pin them to
quant.formats bit for bit.

The Triton kernel splits every sequence's keys over programs (split-K), dequantises each K/V tile in
registers (no float copy of the cache is ever made), keeps an online softmax per split, and writes only the
split's running max, sum and weighted values; a log-sum-exp merge combines the splits. The reference
gathers, dequantises and calls the prefill reference: slow and simple.
"""

from __future__ import annotations

import math

import torch

from kilnlm.kernels.attention import attention_ref
from kilnlm.kernels.norm import _TRITON_IMPORT_ERROR, require_triton

if _TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

QK = 32
# format -> (bytes per 32-value block, offset of the codes); the fp16 scale is at offset 0.
KV_BLOCK_LAYOUTS = {"q8_0": (34, 2), "q4_0": (18, 2)}
_FMT_ID = {None: 0, "q8_0": 1, "q4_0": 2}


def dequantize_kv_ref(rows: torch.Tensor, fmt: str | None, head_dim: int) -> torch.Tensor:
    """Rows (..., row) of a pool as float32 (..., head_dim); float pools are only converted."""
    if fmt is None:
        return rows.float()
    block_bytes, codes_at = KV_BLOCK_LAYOUTS[fmt]
    blocks = rows.reshape(*rows.shape[:-1], head_dim // QK, block_bytes)
    scale = blocks[..., :2].contiguous().view(torch.float16).float()  # (..., n_blocks, 1)
    codes = blocks[..., codes_at:]
    if fmt == "q8_0":
        values = codes.contiguous().view(torch.int8).float()
    else:
        values = torch.cat([codes & 0x0F, codes >> 4], dim=-1).float() - 8
    return (values * scale).reshape(*rows.shape[:-1], head_dim)


def _gather(pool: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """(Hkv, length, row) of one sequence from its pages (a view when one page holds it all)."""
    page = pool.shape[2]
    parts = [pool[int(p), :, : min(page, length - i * page)] for i, p in enumerate(pages.tolist())]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def decode_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, k_fmt: str | None = None, v_fmt: str | None = None,
                         window: int | None = None) -> torch.Tensor:
    """Attention of q (B, Hq, D), one query per sequence at its last position, over the paged K/V; (B, Hq, D)."""
    head_dim, page = q.shape[-1], k_pool.shape[2]
    out = torch.empty_like(q)
    for b, length in enumerate(seq_lens.tolist()):
        pages = block_table[b, : math.ceil(length / page)]
        k = dequantize_kv_ref(_gather(k_pool, pages, length), k_fmt, head_dim).to(q.dtype)
        v = dequantize_kv_ref(_gather(v_pool, pages, length), v_fmt, head_dim).to(q.dtype)
        out[b] = attention_ref(q[b, :, None][None], k[None], v[None], window)[0, :, 0]
    return out


if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _load_rows(pool, page, slot, kv_head, s_page, s_head, s_slot, d, ok, FMT: tl.constexpr):
        """Rows (BLOCK_N, BLOCK_D) as float32, dequantised in registers for q8_0 / q4_0."""
        base = pool + page[:, None] * s_page + kv_head * s_head + slot[:, None] * s_slot
        if FMT == 0:
            return tl.load(base + d[None, :], mask=ok, other=0.0).to(tl.float32)
        block_bytes: tl.constexpr = 34 if FMT == 1 else 18
        block = base + (d[None, :] // 32) * block_bytes
        lo = tl.load(block, mask=ok, other=0).to(tl.uint16)
        hi = tl.load(block + 1, mask=ok, other=0).to(tl.uint16)
        scale = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        within = d[None, :] % 32
        if FMT == 1:
            code = tl.load(block + 2 + within, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        else:
            byte = tl.load(block + 2 + within % 16, mask=ok, other=0)
            code = tl.where(within < 16, byte & 0x0F, byte >> 4).to(tl.float32) - 8.0
        return code * scale

    @triton.jit
    def _decode_kernel(
        q_ptr, k_pool, v_pool, table_ptr, lens_ptr, acc_ptr, max_ptr, sum_ptr,
        HKV, WINDOW, scale, KEYS_PER_SPLIT,
        sq_b, sq_h, sk_page, sk_head, sk_slot, sv_page, sv_head, sv_slot, st_b,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, K_FMT: tl.constexpr,
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
            page = tl.load(table_ptr + b * st_b + pos // PAGE, mask=key_ok, other=0).to(tl.int64)
            slot = pos % PAGE
            ok = key_ok[:, None] & d_ok[None, :]
            k = _load_rows(k_pool, page, slot, kv_head, sk_page, sk_head, sk_slot, d, ok, K_FMT)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (GROUP_PAD, BLOCK_N)
            s = tl.where(row_ok[:, None] & key_ok[None, :], s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.where(key_ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
            alpha = tl.exp(m_i - m_new)
            v = _load_rows(v_pool, page, slot, kv_head, sv_page, sv_head, sv_slot, d, ok, V_FMT)
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
        num_kv_heads, window or 0, head_dim**-0.5, keys_per_split,
        q.stride(0), q.stride(1), *k_pool.stride()[:3], *v_pool.stride()[:3], block_table.stride(0),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE=page, BLOCK_N=block_n, NUM_SPLITS=num_splits, K_FMT=_FMT_ID[k_fmt], V_FMT=_FMT_ID[v_fmt],
        HAS_WINDOW=window is not None,
    )
    # Log-sum-exp merge of the splits (tiny: B x Hq x splits values); a split with no key has sum 0.
    weights = torch.exp(maxes - maxes.amax(-1, keepdim=True))  # (B, Hq, splits)
    total = (weights * sums).sum(-1, keepdim=True)
    out = (weights[..., None] * acc).sum(2) / torch.where(total > 0, total, 1.0)
    return out[..., :head_dim].to(q.dtype)
