"""Mamba-1's selective scan: a per-channel linear recurrence whose decay and input depend on the token.

    delta_t = softplus(dt_t + dt_bias)                              (B, T, D)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * x_t      (B, D, N) state, A (D, N) negative
    y_t     = sum_n h_t[:, n] * C_t[n] + D * x_t, then * silu(z_t)  (B, T, D)

Three implementations of the same arithmetic (all fp32; y cast to x's dtype at the end):
* `selective_scan_sequential`: the oracle, a Python loop over time.
* `selective_scan_ref`: the CPU path. Time is cut into chunks (memory bounded by (B, chunk, D, N)); inside a
  chunk a log-depth Hillis-Steele scan over (decay, value) pairs, across chunks the state is carried. Only decays
  <= 1 are ever multiplied, so nothing overflows (unlike exp(-cumsum) tricks).
* `selective_scan_triton`: the GPU path, one program per (sequence, block of channels) keeping its state in
  registers; see its docstring.
Each takes an initial state and returns the final one, so a sequence split in pieces gives the same result as
processed at once (prefix reuse, and decode as T == 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kilnlm.kernels.norm import _TRITON_IMPORT_ERROR, require_triton

if _TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl


def _delta_and_state(
    x: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor | None, state: torch.Tensor | None, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """softplus(dt + dt_bias) in fp32 (B, T, D), and the initial state as a fresh fp32 (B, D, N) tensor."""
    dt32 = dt.float()
    if dt_bias is not None:
        dt32 = dt32 + dt_bias.float()
    batch, _, dim = x.shape
    if state is None:
        h = torch.zeros(batch, dim, n, dtype=torch.float32, device=x.device)
    else:
        h = state.float().clone()  # the caller's state is never written
    return F.softplus(dt32), h


def _gate_output(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """y + D * x, times silu(z) when given, cast to x's dtype (y, x, z (B, T, D))."""
    y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def selective_scan_sequential(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    z: torch.Tensor | None, dt_bias: torch.Tensor | None, state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, final_state) by a plain loop over time in fp32: the oracle the other two are tested against.

    x, dt, z (B, T, D); A (D, N); B, C (B, T, N); D, dt_bias (D,); state (B, D, N) fp32 or None (zeros).
    """
    delta, h = _delta_and_state(x, dt, dt_bias, state, A.shape[1])
    x32, A32, B32, C32 = x.float(), A.float(), B.float(), C.float()
    ys = []
    for t in range(x.shape[1]):
        d_t = delta[:, t, :, None]  # (B, D, 1)
        h = torch.exp(d_t * A32) * h + d_t * B32[:, t, None, :] * x32[:, t, :, None]  # (B, D, N)
        ys.append((h * C32[:, t, None, :]).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=1) if ys else x32.new_zeros(x.shape)  # (B, T, D)
    return _gate_output(y, x, D, z), h


def _doubling_scan(a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan along dim 1 of h_t = a_t * h_{t-1} + v_t (from h = 0), as (cumulative decay, value).

    Hillis-Steele: after the round with step s, position t holds the composition of steps t-2s+1 .. t. Only
    products of decays <= 1 are formed, so it is as stable as the sequential loop.
    """
    step = 1
    length = a.shape[1]
    a, v = a.clone(), v.clone()  # updated in place below; each right-hand side is computed before it is stored
    while step < length:
        # (a_e, v_e) earlier then (a_l, v_l) later compose to (a_e * a_l, a_l * v_e + v_l); v before a, which
        # it reads
        v[:, step:] = torch.addcmul(v[:, step:], a[:, step:], v[:, :-step])
        a[:, step:] = a[:, step:] * a[:, :-step]
        step *= 2
    return a, v


def selective_scan_ref(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    z: torch.Tensor | None, dt_bias: torch.Tensor | None, state: torch.Tensor | None, chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """selective_scan_sequential's (y, final_state), chunked: a log-depth scan inside each chunk of time.

    The doubling scan does log2(chunk) passes over (B, chunk, D, N), so short chunks are cheapest on the CPU:
    at 16 it is as fast as the loop for D = 1536 and twice as fast for small D (one thread, T = 512).
    """
    delta, h = _delta_and_state(x, dt, dt_bias, state, A.shape[1])
    x32, A32, B32, C32 = x.float(), A.float(), B.float(), C.float()
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # (B, T, D)
    for start in range(0, x.shape[1], chunk_size):
        part = slice(start, start + chunk_size)
        d_c = delta[:, part, :, None]  # (B, L, D, 1)
        decay = torch.exp(d_c * A32)  # (B, L, D, N)
        inp = d_c * B32[:, part, None, :] * x32[:, part, :, None]  # (B, L, D, N)
        decay, inp = _doubling_scan(decay, inp)
        hs = torch.addcmul(inp, decay, h[:, None])  # (B, L, D, N): the state after each step of the chunk
        y[:, part] = torch.einsum("bldn,bln->bld", hs, C32[:, part])
        h = hs[:, -1]
    return _gate_output(y, x, D, z), h.clone(memory_format=torch.contiguous_format)  # not a view of hs


# --------------------------------------------------------------------------------------------- Triton

if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def softplus_fp32(v):
        """torch's softplus (threshold 20) in fp32; log1p(u) as log(1 + u) * u / ((1 + u) - 1), exact to a few ulp."""
        u = tl.exp(tl.minimum(v, 20.0))
        w = 1.0 + u
        # (w - 1) is the u that w actually holds, so the ratio cancels the rounding of 1 + u (Goldberg's log1p)
        log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
        return tl.where(v > 20.0, v, log1p)

    @triton.jit
    def _compose(a_early, v_early, a_late, v_late):
        # the recurrence over two consecutive spans: h -> a_late * (a_early * h + v_early) + v_late
        return a_early * a_late, a_late * v_early + v_late

    @triton.jit
    def _selective_scan_kernel(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, y_ptr, hT_ptr,
        T, DIM, N,
        sx_b, sx_t, sx_d, sdt_b, sdt_t, sdt_d, sA_d, sA_n, sB_b, sB_t, sB_n, sC_b, sC_t, sC_n,
        sz_b, sz_t, sz_d, sh0_b, sh0_d, sh0_n, sy_b, sy_t, sy_d, shT_b, shT_d, shT_n,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One program: one sequence, BLOCK_D channels, all N state entries; the (BLOCK_D, BLOCK_N) state stays in
        # registers while time is walked BLOCK_T steps at a time.
        b = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        d_ok = d < DIM
        n_ok = n < N
        dn_ok = d_ok[:, None] & n_ok[None, :]
        # Padded channels / state entries get A = 0 (decay 1) and zero input, so they stay 0 and are not stored.
        A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=dn_ok, other=0.0).to(tl.float32)
        Dv = tl.load(D_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_STATE:
            h = tl.load(h0_ptr + b * sh0_b + d[:, None] * sh0_d + n[None, :] * sh0_n, mask=dn_ok, other=0.0)
        else:
            h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None, None]
        for t0 in range(0, T, BLOCK_T):
            t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # t * stride may pass 2**31 in long prompts
            td_ok = (t < T)[:, None] & d_ok[None, :]  # (BLOCK_T, BLOCK_D)
            tn_ok = (t < T)[:, None] & n_ok[None, :]  # (BLOCK_T, BLOCK_N)
            x = tl.load(x_ptr + b * sx_b + t[:, None] * sx_t + d[None, :] * sx_d, mask=td_ok, other=0.0)
            x = x.to(tl.float32)
            dt = tl.load(dt_ptr + b * sdt_b + t[:, None] * sdt_t + d[None, :] * sdt_d, mask=td_ok, other=0.0)
            dt = dt.to(tl.float32)
            if HAS_BIAS:
                dt += bias[None, :]
            # Steps past T get delta = 0: decay 1 and no input, so the state after the chunk's last row is
            # the state after step T - 1.
            delta = tl.where(td_ok, softplus_fp32(dt), 0.0)  # (BLOCK_T, BLOCK_D)
            Bt = tl.load(B_ptr + b * sB_b + t[:, None] * sB_t + n[None, :] * sB_n, mask=tn_ok, other=0.0)
            Ct = tl.load(C_ptr + b * sC_b + t[:, None] * sC_t + n[None, :] * sC_n, mask=tn_ok, other=0.0)
            decay = tl.exp(delta[:, :, None] * A[None, :, :])  # (BLOCK_T, BLOCK_D, BLOCK_N)
            inp = (delta * x)[:, :, None] * Bt.to(tl.float32)[:, None, :]  # (BLOCK_T, BLOCK_D, BLOCK_N)
            if BLOCK_T > 1:
                decay, inp = tl.associative_scan((decay, inp), 0, _compose)
            hs = decay * h[None, :, :] + inp  # the state after each step
            y = tl.sum(hs * Ct.to(tl.float32)[:, None, :], axis=2) + Dv[None, :] * x  # (BLOCK_T, BLOCK_D)
            if HAS_Z:
                zt = tl.load(z_ptr + b * sz_b + t[:, None] * sz_t + d[None, :] * sz_d, mask=td_ok, other=0.0)
                zt = zt.to(tl.float32)
                y = y * (zt / (1.0 + tl.exp(-zt)))
            tl.store(y_ptr + b * sy_b + t[:, None] * sy_t + d[None, :] * sy_d, y.to(y_ptr.dtype.element_ty),
                     mask=td_ok)
            h = tl.sum(tl.where(last, hs, 0.0), axis=0)
        tl.store(hT_ptr + b * shT_b + d[:, None] * shT_d + n[None, :] * shT_n, h, mask=dn_ok)


def selective_scan_triton(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    z: torch.Tensor | None, dt_bias: torch.Tensor | None, state: torch.Tensor | None,
    block_t: int | None = None, block_d: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """selective_scan_ref's (y, final_state) in one Triton launch, grid (batch, D / block_d).

    Each program keeps its (block_d, N) fp32 state in registers and walks time in chunks of block_t steps:
    the chunk's inputs are loaded as tiles, the recurrence inside the chunk is a `tl.associative_scan` along
    time over (decay, value) pairs, and the state after the chunk's last step is carried to the next. T == 1
    (the decode step) is the same kernel with block_t = 1 and no scan. Every tensor is read by stride.
    """
    require_triton("selective_scan_triton", x, dt, A, B, C, D)
    batch, seq, dim = x.shape
    n = A.shape[1]
    for name, t, shape in (("dt", dt, (batch, seq, dim)), ("A", A, (dim, n)), ("B", B, (batch, seq, n)),
                           ("C", C, (batch, seq, n)), ("D", D, (dim,)), ("z", z, (batch, seq, dim)),
                           ("dt_bias", dt_bias, (dim,)), ("state", state, (batch, dim, n))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan_triton: {name} must be {shape}, got {tuple(t.shape)}")
    if state is not None and state.dtype != torch.float32:
        raise ValueError(f"selective_scan_triton: state must be fp32, got {state.dtype}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (B, T, D)
    h_final = torch.empty(batch, dim, n, dtype=torch.float32, device=x.device)  # (B, D, N)
    if batch == 0 or dim == 0:
        return y, h_final
    block_n = triton.next_power_of_2(n)
    if block_t is None:  # about 4096 fp32 values per (T, D, N) tile keeps the scan in registers
        block_t = max(1, min(triton.next_power_of_2(seq), 4096 // (block_d * block_n)))
    z_ = z if z is not None else x  # placeholders for absent tensors: never read (HAS_* is False)
    bias_ = dt_bias if dt_bias is not None else D
    h0 = state if state is not None else h_final
    _selective_scan_kernel[(batch, triton.cdiv(dim, block_d))](
        x, dt, A, B, C, D, z_, bias_, h0, y, h_final, seq, dim, n,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *z_.stride(),
        *h0.stride(), *y.stride(), *h_final.stride(),
        HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, HAS_STATE=state is not None,
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4,
    )
    return y, h_final
