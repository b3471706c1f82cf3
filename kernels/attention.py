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
    if num_queries <= _FEW_QUERIES:
        return _attention_few_queries(q, k, v, window)
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


_FEW_QUERIES = 16  # decode steps: plain matmuls beat SDPA's CPU flash kernel (3x at 512 keys, 10x with GQA)


def _attention_few_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """attention_ref for a few queries: the query heads of one kv head attend as one matrix, so GQA reads each
    key once instead of expanding k and v per query head."""
    batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    grouped = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads * num_queries, head_dim)
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * head_dim**-0.5  # (B, Hkv, group*T, S)
    mask = attention_mask(num_queries, num_keys, window, q.device)
    if mask is not None:  # (T, S): the same for every head of a group
        scores = scores.view(batch, num_kv_heads, -1, num_queries, num_keys).masked_fill(~mask, float("-inf"))
        scores = scores.view(batch, num_kv_heads, -1, num_keys)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs, v).view(batch, num_heads, num_queries, head_dim)
    if mask is not None:  # a query that may see no key (window 0, padding) gets zeros, not NaN
        out = out.masked_fill(~mask.any(-1)[:, None], 0.0)
    return out


# --------------------------------------------------------------------------------------------- paged pools

QK = 32
# ggml block layouts a KV pool row may hold: format -> (bytes per 32-value block, offset of the codes); the fp16
# scale is at offset 0. q8_0 codes are int8; q4_0 keeps value i in the low nibble of byte i for i < 16 and in the
# high nibble of byte i - 16 otherwise, value = (nibble - 8) * scale. Restated here because kernels may not
# import `quant` (they sit below it); the tests pin them to quant.formats bit for bit.
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


def gather_pages(pool: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """(Hkv, length, row) of one sequence from its pages of a pool (num_pages, Hkv, PAGE, row)."""
    page = pool.shape[2]
    parts = [pool[int(p), :, : min(page, length - i * page)] for i, p in enumerate(pages.tolist())]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def paged_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, k_fmt: str | None = None, v_fmt: str | None = None,
                        window: int | None = None) -> torch.Tensor:
    """attention_ref for q (B, Hq, T, D), each sequence's T queries at the end of its seq_lens[b] positions,
    over K/V held in pages (num_pages, Hkv, PAGE, row) listed by block_table (B, max_pages)."""
    head_dim, page = q.shape[-1], k_pool.shape[2]
    out = torch.empty_like(q)
    for b, length in enumerate(seq_lens.tolist()):
        pages = block_table[b, : -(-length // page)]
        k = dequantize_kv_ref(gather_pages(k_pool, pages, length), k_fmt, head_dim).to(q.dtype)
        v = dequantize_kv_ref(gather_pages(v_pool, pages, length), v_fmt, head_dim).to(q.dtype)
        out[b] = attention_ref(q[b][None], k[None], v[None], window)[0]
    return out


# --------------------------------------------------------------------------------------------- Triton: prefill

if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def locate_keys(table_ptr, b, st_b, pos, ok, PAGE):
        """(page id, slot in the page) of key positions `pos` of sequence b, through its block table."""
        page = tl.load(table_ptr + b * st_b + pos // PAGE, mask=ok, other=0).to(tl.int64)
        return page, pos % PAGE

    @triton.jit
    def load_kv_rows(pool, page, slot, kv_head, s_page, s_head, s_slot, d, ok, FMT: tl.constexpr):
        """Rows (BLOCK_N, BLOCK_D) of a pool: in its dtype when float, dequantised to float32 when packed."""
        base = pool + page[:, None] * s_page + kv_head * s_head + slot[:, None] * s_slot
        if FMT == 0:
            return tl.load(base + d[None, :], mask=ok, other=0.0)
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
    def _flash_prefill_kernel(
        q_ptr, k_pool, v_pool, table_ptr, lens_ptr, o_ptr,
        T, HKV, WINDOW, PAGE, scale,
        sq_b, sq_h, sq_t, sk_page, sk_head, sk_slot, sv_page, sv_head, sv_slot, st_b, so_b, so_h, so_t,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr, K_FMT: tl.constexpr, V_FMT: tl.constexpr,
    ):
        # One program: BLOCK_M queries of every query head of one kv head's group, as one tile of
        # GROUP_PAD * BLOCK_M rows (row r is head r // BLOCK_M, query r % BLOCK_M), so each K/V tile is
        # loaded once for the whole group. Keys are found through the block table (a dense K/V is a pool of
        # one page per sequence) and dequantised in registers when the pool is packed.
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        b, kv_head = bh // HKV, bh % HKV
        dtype: tl.constexpr = tl.float32 if DOT_F32 else q_ptr.dtype.element_ty
        rows = tl.arange(0, GROUP_PAD * BLOCK_M)
        head = kv_head * GROUP + rows // BLOCK_M
        t = start_m + rows % BLOCK_M
        row_ok = (rows // BLOCK_M < GROUP) & (t < T)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        S = tl.load(lens_ptr + b)
        offset = S - T  # the queries are the last T of the sequence's S positions
        q_pos = offset + t
        q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(dtype)

        m_i = tl.full((GROUP_PAD * BLOCK_M,), -1.0e30, tl.float32)
        l_i = tl.zeros((GROUP_PAD * BLOCK_M,), tl.float32)
        acc = tl.zeros((GROUP_PAD * BLOCK_M, BLOCK_D), tl.float32)
        # Key tiles wholly after the last query, or wholly before the first query's window, are skipped.
        hi = tl.minimum(S, offset + start_m + BLOCK_M)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(0, offset + start_m - WINDOW + 1) // BLOCK_N * BLOCK_N
        for start_n in range(lo, hi, BLOCK_N):
            k_pos = start_n + tl.arange(0, BLOCK_N)
            k_ok = k_pos < S
            page, slot = locate_keys(table_ptr, b, st_b, k_pos, k_ok, PAGE)
            ok = k_ok[:, None] & d_ok[None, :]
            k = load_kv_rows(k_pool, page, slot, kv_head, sk_page, sk_head, sk_slot, d, ok, K_FMT).to(dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (rows, BLOCK_N) fp32
            allowed = row_ok[:, None] & k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                allowed &= q_pos[:, None] - k_pos[None, :] < WINDOW
            s = tl.where(allowed, s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.where(allowed, tl.exp(s - m_new[:, None]), 0.0)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = load_kv_rows(v_pool, page, slot, kv_head, sv_page, sv_head, sv_slot, d, ok, V_FMT)
            # P is rounded to the query dtype for the tensor-core product (fp32 under DOT_F32)
            p = p.to(q_ptr.dtype.element_ty).to(dtype)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(dtype), input_precision=PRECISION)
            m_i = m_new
        # A row no key may be seen by (a window smaller than the gap) has l = 0: it gives zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + b * so_b + head[:, None] * so_h + t[:, None] * so_t + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_attention_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, k_fmt: str | None = None, v_fmt: str | None = None,
                           window: int | None = None, block_m: int | None = None, block_n: int = 32) -> torch.Tensor:
    """paged_attention_ref's result from the FlashAttention kernel, reading (packed) pages directly."""
    require_triton("paged_attention_triton", q, k_pool, v_pool)
    batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    if num_heads % num_kv_heads or ((k_fmt or v_fmt) and head_dim % QK):
        raise ValueError(f"paged_attention_triton: q {tuple(q.shape)} does not fit the pool {tuple(k_pool.shape)}")
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    if block_m is None:  # keep the group's tile near 64 rows
        block_m = max(16, min(64, 64 // group_pad, triton.next_power_of_2(num_queries)))
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q)
    grid = (triton.cdiv(num_queries, block_m), batch * num_kv_heads)
    # The interpreter's tl.dot mishandles bf16; products of bf16 values are exact in fp32 and both paths
    # accumulate in fp32, so multiplying upcast tiles there is the same arithmetic.
    dot_f32 = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    _flash_prefill_kernel[grid](
        q, k_pool, v_pool, block_table, seq_lens, out, num_queries, num_kv_heads, window or 0, k_pool.shape[2],
        head_dim**-0.5, *q.stride()[:3], *k_pool.stride()[:3], *v_pool.stride()[:3], block_table.stride(0),
        *out.stride()[:3],
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_WINDOW=window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 or dot_f32 else "tf32", DOT_F32=dot_f32,
        K_FMT=_FMT_ID[k_fmt], V_FMT=_FMT_ID[v_fmt],
    )
    return out


def one_page_per_sequence(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block table and lengths that let the paged kernels read a dense (B, Hkv, S, row) tensor as B pages."""
    batch, length = k.shape[0], k.shape[2]
    table = torch.arange(batch, dtype=torch.int32, device=k.device)[:, None]
    return table, torch.full((batch,), length, dtype=torch.int32, device=k.device)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                     block_m: int | None = None, block_n: int = 32) -> torch.Tensor:
    """FlashAttention over q (B, Hq, T, D) and k, v (B, Hkv, S, D); the same result as attention_ref.

    GQA reads each K/V tile once per group of query heads; a sliding window skips the tiles outside it.
    """
    batch, num_heads, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"attention_triton: q {tuple(q.shape)} does not fit k {tuple(k.shape)} / v {tuple(v.shape)}")
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    table, lengths = one_page_per_sequence(k)
    return paged_attention_triton(q, k, v, table, lengths, None, None, window, block_m, block_n)
