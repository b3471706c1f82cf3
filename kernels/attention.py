"""Causal (optionally sliding-window) grouped-query attention over a prefix of cached keys."""

import torch
import torch.nn.functional as F


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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
