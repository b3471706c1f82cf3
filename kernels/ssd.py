"""Mamba-2's state-space duality (SSD) scan: one scalar decay per head, a (P, N) state per head.

    delta_t = clamp(softplus(dt_t + dt_bias), *dt_limit)                 (B, T, H)
    h_t     = exp(delta_t * A_h) * h_{t-1} + delta_t * x_t ⊗ B_t          (B, H, P, N) state
    y_t     = h_t @ C_t + D_h * x_t                                      (B, T, H, P)

x (B, T, H, P); B and C (B, T, G, N) are shared by groups of heads: head h reads group h // (H // G).
Because the decay is a scalar per head and step, a chunk of L steps is a masked (L, L) "attention" product
plus the state carried in from the previous chunk, so the work is matrix products (the Mamba-2 paper, sec. 6).

* `ssd_scan_sequential`: the oracle, a Python loop over time in fp32.
* `ssd_scan_ref`: the chunked algorithm in torch, as mamba_ssm's ssd_minimal, with an initial and final state.
* `ssd_scan_triton`: the same chunked algorithm in one Triton kernel (and a small kernel for T == 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kilnlm.kernels.norm import _TRITON_IMPORT_ERROR, require_triton

if _TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    from kilnlm.kernels.selective_scan import softplus_fp32


def _ssd_inputs(
    x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt_bias: torch.Tensor | None,
    state: torch.Tensor | None, dt_limit: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 delta (B, T, H), B and C repeated to one row per head (B, T, H, N), and a fresh initial state."""
    batch, _, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    if heads % groups:
        raise ValueError(f"ssd scan: {heads} heads cannot share {groups} groups of B/C")
    dt32 = dt.float()
    if dt_bias is not None:
        dt32 = dt32 + dt_bias.float()
    delta = F.softplus(dt32).clamp(dt_limit[0], dt_limit[1])
    rep = heads // groups
    Bh = B.float().repeat_interleave(rep, dim=2)  # (B, T, H, N): head h gets group h // rep
    Ch = C.float().repeat_interleave(rep, dim=2)
    if state is None:
        h = torch.zeros(batch, heads, head_dim, n, dtype=torch.float32, device=x.device)
    else:
        h = state.float().clone()  # the caller's state is never written
    return delta, Bh, Ch, h


def ssd_scan_sequential(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    dt_bias: torch.Tensor | None, state: torch.Tensor | None, dt_limit: tuple[float, float] = (0.0, math.inf),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, final_state) by a plain loop over time in fp32: the oracle the chunked versions are tested against.

    x (B, T, H, P); dt (B, T, H); A, D, dt_bias (H,); B, C (B, T, G, N); state (B, H, P, N) fp32 or None (zeros).
    """
    delta, Bh, Ch, h = _ssd_inputs(x, dt, B, C, dt_bias, state, dt_limit)
    x32, A32 = x.float(), A.float()
    ys = []
    for t in range(x.shape[1]):
        d_t = delta[:, t]  # (B, H)
        inp = (d_t[..., None] * x32[:, t])[..., None] * Bh[:, t, :, None, :]  # (B, H, P, N)
        h = torch.exp(d_t * A32)[..., None, None] * h + inp
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))  # (B, H, P)
    y = torch.stack(ys, dim=1) if ys else x32.new_zeros(x.shape)  # (B, T, H, P)
    return (y + D.float()[:, None] * x32).to(x.dtype), h


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., L, L) with [i, j] = a[j+1] + ... + a[i] for j <= i and -inf above the diagonal.

    Summed per segment (a masked cumsum), not as cumsum[i] - cumsum[j], which cancels catastrophically once
    the running sum is large.
    """
    length = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, length)  # [i, j] = a[i]
    below = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(rows.masked_fill(~below, 0.0), dim=-2)  # [i, j] = sum of a[j+1 .. i]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~causal, -math.inf)


def ssd_scan_ref(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    dt_bias: torch.Tensor | None, state: torch.Tensor | None, dt_limit: tuple[float, float] = (0.0, math.inf),
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ssd_scan_sequential's (y, final_state) by the chunked SSD algorithm: quadratic inside a chunk, a state
    passed between chunks."""
    delta, Bh, Ch, h = _ssd_inputs(x, dt, B, C, dt_bias, state, dt_limit)
    batch, seq, heads, head_dim = x.shape
    n = B.shape[-1]
    L = max(1, min(chunk_size, seq))  # a decode step (T == 1) is one chunk of one, not a padded chunk of 64
    chunks = -(-seq // L)
    pad = chunks * L - seq  # padded steps have delta = 0: decay 1 and no input
    x32 = x.float()
    xd = F.pad(x32 * delta[..., None], (0, 0, 0, 0, 0, pad)).reshape(batch, chunks, L, heads, head_dim)
    Bc = F.pad(Bh, (0, 0, 0, 0, 0, pad)).reshape(batch, chunks, L, heads, n)  # (B, c, L, H, N)
    Cc = F.pad(Ch, (0, 0, 0, 0, 0, pad)).reshape(batch, chunks, L, heads, n)
    dA = F.pad(delta * A.float(), (0, 0, 0, pad)).reshape(batch, chunks, L, heads).permute(0, 3, 1, 2)  # (B, H, c, L)

    # 1. inside each chunk: y[l] = sum_{s <= l} (C_l . B_s) exp(dA_{s+1} + .. + dA_l) delta_s x_s
    decay = torch.exp(segsum(dA))  # (B, H, c, L, L), zero above the diagonal
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xd)  # (B, c, L, H, P)
    # 2. each chunk's own contribution to the state at its end (the last row of the decay matrix)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay[..., -1, :], xd)  # (B, c, H, P, N)
    # 3. the state entering each chunk, passed along the chunks
    chunk_decay = torch.exp(dA.sum(-1))  # (B, H, c)
    entering = []
    for c in range(chunks):
        entering.append(h)
        h = chunk_decay[:, :, c, None, None] * h + chunk_states[:, c]
    # 4. the entering state seen from each step: C_l . (exp(dA_0 + .. + dA_l) h)
    if chunks:
        states = torch.stack(entering, dim=1)  # (B, c, H, P, N)
        y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, torch.exp(torch.cumsum(dA, dim=-1)))
    y = y.reshape(batch, chunks * L, heads, head_dim)[:, :seq]
    return (y + D.float()[:, None] * x32).to(x.dtype), h


# --------------------------------------------------------------------------------------------- Triton

if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _delta(dt, bias_ptr, h, dt_min, dt_max, HAS_BIAS: tl.constexpr):
        """clamp(softplus(dt + bias[h]), dt_min, dt_max) in fp32 for raw dt of head h."""
        dt = dt.to(tl.float32)
        if HAS_BIAS:
            dt += tl.load(bias_ptr + h).to(tl.float32)
        return tl.minimum(tl.maximum(softplus_fp32(dt), dt_min), dt_max)

    @triton.jit
    def _ssd_chunk_kernel(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, h0_ptr, y_ptr, hT_ptr,
        T, P, N, HEADS_PER_GROUP, dt_min, dt_max,
        sx_b, sx_t, sx_h, sx_p, sdt_b, sdt_t, sdt_h, sB_b, sB_t, sB_g, sB_n, sC_b, sC_t, sC_g, sC_n,
        sh0_b, sh0_h, sh0_p, sh0_n, sy_b, sy_t, sy_h, sy_p, shT_b, shT_h, shT_p, shT_n,
        HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, PRECISION: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One program: one sequence, one head, BLOCK_P of its P channels. The (BLOCK_P, BLOCK_N) state stays in
        # registers while the chunks of time are walked in order; inside a chunk everything is matrix products.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        g = h // HEADS_PER_GROUP
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        pos = tl.arange(0, CHUNK)  # step within the chunk
        p_ok = p < P
        n_ok = n < N
        A = tl.load(A_ptr + h).to(tl.float32)
        Dh = tl.load(D_ptr + h).to(tl.float32)
        if HAS_STATE:
            state = tl.load(h0_ptr + b * sh0_b + h * sh0_h + p[:, None] * sh0_p + n[None, :] * sh0_n,
                            mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            state = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
        causal = pos[:, None] >= pos[None, :]  # (CHUNK, CHUNK): step s feeds step l when s <= l
        for t0 in range(0, T, CHUNK):
            t = (t0 + pos).to(tl.int64)  # t * stride may pass 2**31 in long prompts
            t_ok = t < T
            dt = tl.load(dt_ptr + b * sdt_b + t * sdt_t + h * sdt_h, mask=t_ok, other=0.0)
            # padded steps get delta = 0: decay 1 and no input, so they leave the state alone
            delta = tl.where(t_ok, _delta(dt, bias_ptr, h, dt_min, dt_max, HAS_BIAS), 0.0)  # (CHUNK,)
            cum = tl.cumsum(delta * A, 0)  # (CHUNK,) log-decay from the chunk start through step l
            cum_last = tl.sum(tl.where(pos == CHUNK - 1, cum, 0.0), 0)  # padded steps add 0: the last real step
            Cc = tl.load(C_ptr + b * sC_b + t[:, None] * sC_t + g * sC_g + n[None, :] * sC_n,
                         mask=t_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)  # (CHUNK, BLOCK_N)
            Bc = tl.load(B_ptr + b * sB_b + t[:, None] * sB_t + g * sB_g + n[None, :] * sB_n,
                         mask=t_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)  # (CHUNK, BLOCK_N)
            X = tl.load(x_ptr + b * sx_b + t[:, None] * sx_t + h * sx_h + p[None, :] * sx_p,
                        mask=t_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)  # (CHUNK, BLOCK_P)
            # intra-chunk: scores[l, s] = (C_l . B_s) exp(cum_l - cum_s) delta_s for s <= l
            seg = tl.where(causal, cum[:, None] - cum[None, :], 0.0)  # masked before exp: no overflow above
            scores = tl.dot(Cc, tl.trans(Bc), input_precision=PRECISION) * tl.exp(seg) * delta[None, :]
            scores = tl.where(causal, scores, 0.0)
            y = tl.dot(scores, X, input_precision=PRECISION)  # (CHUNK, BLOCK_P)
            # the state entering the chunk, decayed to each step
            y += tl.exp(cum)[:, None] * tl.dot(Cc, tl.trans(state), input_precision=PRECISION)
            y += Dh * X
            tl.store(y_ptr + b * sy_b + t[:, None] * sy_t + h * sy_h + p[None, :] * sy_p,
                     y.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & p_ok[None, :])
            # carry: decay the state over the whole chunk, add each step's input decayed to the chunk end
            w = Bc * (tl.exp(cum_last - cum) * delta)[:, None]  # (CHUNK, BLOCK_N)
            state = tl.exp(cum_last) * state + tl.dot(tl.trans(X), w, input_precision=PRECISION)
        tl.store(hT_ptr + b * shT_b + h * shT_h + p[:, None] * shT_p + n[None, :] * shT_n, state,
                 mask=p_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _ssd_step_kernel(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, h0_ptr, y_ptr, hT_ptr,
        P, N, HEADS_PER_GROUP, dt_min, dt_max,
        sx_b, sx_h, sx_p, sdt_b, sdt_h, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n,
        sh0_b, sh0_h, sh0_p, sh0_n, sy_b, sy_h, sy_p, shT_b, shT_h, shT_p, shT_n,
        HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # The decode step (T == 1): h = exp(delta A) h + delta x ⊗ B; y = h C + D x. Elementwise, no tl.dot.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        g = h // HEADS_PER_GROUP
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        p_ok = p < P
        n_ok = n < N
        pn_ok = p_ok[:, None] & n_ok[None, :]
        delta = _delta(tl.load(dt_ptr + b * sdt_b + h * sdt_h), bias_ptr, h, dt_min, dt_max, HAS_BIAS)
        decay = tl.exp(delta * tl.load(A_ptr + h).to(tl.float32))
        x = tl.load(x_ptr + b * sx_b + h * sx_h + p * sx_p, mask=p_ok, other=0.0).to(tl.float32)  # (BLOCK_P,)
        Bv = tl.load(B_ptr + b * sB_b + g * sB_g + n * sB_n, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
        Cv = tl.load(C_ptr + b * sC_b + g * sC_g + n * sC_n, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_STATE:
            state = tl.load(h0_ptr + b * sh0_b + h * sh0_h + p[:, None] * sh0_p + n[None, :] * sh0_n,
                            mask=pn_ok, other=0.0)
            state = decay * state + (delta * x)[:, None] * Bv[None, :]
        else:
            state = (delta * x)[:, None] * Bv[None, :]
        y = tl.sum(state * Cv[None, :], axis=1) + tl.load(D_ptr + h).to(tl.float32) * x
        tl.store(y_ptr + b * sy_b + h * sy_h + p * sy_p, y.to(y_ptr.dtype.element_ty), mask=p_ok)
        tl.store(hT_ptr + b * shT_b + h * shT_h + p[:, None] * shT_p + n[None, :] * shT_n, state, mask=pn_ok)


def ssd_scan_triton(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    dt_bias: torch.Tensor | None, state: torch.Tensor | None, dt_limit: tuple[float, float] = (0.0, math.inf),
    chunk_size: int = 64, block_p: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ssd_scan_ref's (y, final_state) in one Triton launch, grid (batch, heads, P / block_p).

    Each program walks the chunks of time in order carrying its (block_p, N) fp32 state: tl.cumsum of delta*A
    inside the chunk, then tl.dot for C Bᵀ, the masked scores times X, the entering state's contribution and the
    state update. T == 1 (decode) runs a small elementwise kernel instead. chunk_size is a power of two >= 16
    (tl.dot's minimum tile), lowered for short prompts. fp32 x multiplies in IEEE fp32; fp16/bf16 x in TF32
    (the tensor cores), exact for the 16-bit inputs, rounding the scores and the state operand to 10 bits.
    """
    require_triton("ssd_scan_triton", x, dt, A, B, C, D)
    batch, seq, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    if groups == 0 or heads % groups:
        raise ValueError(f"ssd_scan_triton: {heads} heads cannot share {groups} groups of B/C")
    for name, t, shape in (("dt", dt, (batch, seq, heads)), ("A", A, (heads,)), ("B", B, (batch, seq, groups, n)),
                           ("C", C, (batch, seq, groups, n)), ("D", D, (heads,)), ("dt_bias", dt_bias, (heads,)),
                           ("state", state, (batch, heads, head_dim, n))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"ssd_scan_triton: {name} must be {shape}, got {tuple(t.shape)}")
    if state is not None and state.dtype != torch.float32:
        raise ValueError(f"ssd_scan_triton: state must be fp32, got {state.dtype}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"ssd_scan_triton: chunk_size must be a power of two >= 16, got {chunk_size}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (B, T, H, P)
    h_final = torch.empty(batch, heads, head_dim, n, dtype=torch.float32, device=x.device)  # (B, H, P, N)
    if batch == 0 or heads == 0:
        return y, h_final
    bias_ = dt_bias if dt_bias is not None else D  # placeholder, never read when HAS_BIAS is False
    h0 = state if state is not None else h_final
    lo, hi = (float(v) for v in dt_limit)
    if seq == 1:
        block_n = triton.next_power_of_2(n)
        bp = min(triton.next_power_of_2(head_dim), 64)
        _ssd_step_kernel[(batch, heads, triton.cdiv(head_dim, bp))](
            x, dt, A, B, C, D, bias_, h0, y, h_final, head_dim, n, heads // groups, lo, hi,
            x.stride(0), x.stride(2), x.stride(3), dt.stride(0), dt.stride(2),
            B.stride(0), B.stride(2), B.stride(3), C.stride(0), C.stride(2), C.stride(3),
            *h0.stride(), y.stride(0), y.stride(2), y.stride(3), *h_final.stride(),
            HAS_BIAS=dt_bias is not None, HAS_STATE=state is not None, BLOCK_P=bp, BLOCK_N=block_n, num_warps=4,
        )
        return y, h_final
    block_n = max(16, triton.next_power_of_2(n))
    bp = max(16, min(block_p, triton.next_power_of_2(head_dim)))
    chunk = max(16, min(chunk_size, triton.next_power_of_2(seq)))
    _ssd_chunk_kernel[(batch, heads, triton.cdiv(head_dim, bp))](
        x, dt, A, B, C, D, bias_, h0, y, h_final, seq, head_dim, n, heads // groups, lo, hi,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *h0.stride(), *y.stride(), *h_final.stride(),
        HAS_BIAS=dt_bias is not None, HAS_STATE=state is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        CHUNK=chunk, BLOCK_P=bp, BLOCK_N=block_n, num_warps=4 if block_n * max(bp, chunk) <= 4096 else 8,
    )
    return y, h_final
