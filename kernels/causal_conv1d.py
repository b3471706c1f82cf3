"""Mamba's short causal depthwise convolution, for prefill (T tokens) and decode (T == 1) alike.

Each channel c is convolved with its own K taps over the time axis. The K - 1 inputs before x[:, 0] come from a
rolling `state` (zeros at the start of a sequence), and the last K - 1 inputs are handed back as the new state,
so a sequence can be fed in pieces (prefix reuse, then one token at a time) with the same result as at once.
The Triton kernel beside the reference that defines the semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kilnlm.kernels.norm import _TRITON_IMPORT_ERROR, require_triton

if _TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl


def causal_conv1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None,
    activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, new_state): y[b, t, c] = sum_k weight[c, k] * xpad[b, t + k, c] + bias[c] (then SiLU), xpad = [state; x].

    x (B, T, C) any float dtype; weight (C, K); bias (C,) or None; state (B, C, K-1) fp32, None meaning zeros.
    Computed in fp32; y (B, T, C) in x's dtype; new_state (B, C, K-1) fp32, the last K-1 steps of xpad.
    """
    batch, seq, channels = x.shape
    width = weight.shape[1]
    if state is None:
        state = torch.zeros(batch, channels, width - 1, dtype=torch.float32, device=x.device)
    xpad = torch.cat([state.float(), x.float().transpose(1, 2)], dim=2)  # (B, C, K-1+T)
    w = weight.float()
    # Tap by tap rather than F.conv1d: the summation order is the kernel's, and the last tap meets x[:, t].
    y = w[None, :, 0, None] * xpad[:, :, :seq]  # (B, C, T)
    for k in range(1, width):
        y = y + w[None, :, k, None] * xpad[:, :, k : k + seq]
    if bias is not None:
        y = y + bias.float()[None, :, None]
    if activation:
        y = F.silu(y)
    new_state = xpad[:, :, xpad.shape[2] - (width - 1) :].clone()  # (B, C, K-1), also when T < K-1
    return y.transpose(1, 2).to(x.dtype), new_state


if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _causal_conv1d_kernel(
        x_ptr, w_ptr, bias_ptr, state_ptr, y_ptr, new_state_ptr,
        T, C,
        sx_b, sx_t, sx_c, sw_c, sw_k, ss_b, ss_c, ss_k, sy_b, sy_t, sy_c, sn_b, sn_c, sn_k,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, ACTIVATION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        # One program: BLOCK_T steps x BLOCK_C channels of one sequence. Position i of xpad is state[i] for
        # i < K-1 and x[i - (K-1)] after, so the K taps of output t read xpad[t .. t+K-1].
        b = tl.program_id(0).to(tl.int64)
        pid_t = tl.program_id(1)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # t * stride may pass 2**31
        t_ok = t < T
        acc = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
        for k in tl.static_range(K):
            src = t + k - (K - 1)  # index into x; negative indices fall in the state
            from_x = (src >= 0) & t_ok
            v = tl.load(x_ptr + b * sx_b + src[:, None] * sx_t + c[None, :] * sx_c,
                        mask=from_x[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            if HAS_STATE:
                from_state = (src < 0) & t_ok
                s = tl.load(state_ptr + b * ss_b + c[None, :] * ss_c + (src + K - 1)[:, None] * ss_k,
                            mask=from_state[:, None] & c_ok[None, :], other=0.0)
                v += s
            w = tl.load(w_ptr + c * sw_c + k * sw_k, mask=c_ok, other=0.0).to(tl.float32)
            acc += w[None, :] * v
        if HAS_BIAS:
            acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION:
            acc = acc / (1.0 + tl.exp(-acc))
        tl.store(y_ptr + b * sy_b + t[:, None] * sy_t + c[None, :] * sy_c, acc.to(y_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & c_ok[None, :])
        if pid_t == 0:
            # new_state[j] = xpad[T + j]: from x when T + j >= K-1, else still from the old state (T < K-1).
            j = tl.arange(0, BLOCK_S).to(tl.int64)
            j_ok = j < K - 1
            src = T + j - (K - 1)
            ns = tl.load(x_ptr + b * sx_b + src[:, None] * sx_t + c[None, :] * sx_c,
                         mask=((src >= 0) & j_ok)[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            if HAS_STATE:
                ns += tl.load(state_ptr + b * ss_b + c[None, :] * ss_c + (T + j)[:, None] * ss_k,
                              mask=((src < 0) & j_ok)[:, None] & c_ok[None, :], other=0.0)
            tl.store(new_state_ptr + b * sn_b + c[None, :] * sn_c + j[:, None] * sn_k, ns,
                     mask=j_ok[:, None] & c_ok[None, :])


def causal_conv1d_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None,
    activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d_ref's (y, new_state) from one Triton launch; x, weight, bias and state are read by stride."""
    require_triton("causal_conv1d_triton", x, weight)
    batch, seq, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels or weight.shape[1] < 1:
        raise ValueError(f"causal_conv1d_triton: weight must be ({channels}, K), got {tuple(weight.shape)}")
    width = weight.shape[1]
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"causal_conv1d_triton: bias must be ({channels},), got {tuple(bias.shape)}")
    if state is not None and (tuple(state.shape) != (batch, channels, width - 1) or state.dtype != torch.float32):
        raise ValueError(f"causal_conv1d_triton: state must be fp32 ({batch}, {channels}, {width - 1}), "
                         f"got {state.dtype} {tuple(state.shape)}")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)  # (B, T, C)
    new_state = torch.empty(batch, channels, width - 1, dtype=torch.float32, device=x.device)  # (B, C, K-1)
    if batch == 0 or channels == 0:
        return y, new_state
    st = state if state is not None else new_state  # unused by the kernel when HAS_STATE is False
    b_ = bias if bias is not None else weight
    block_t = max(1, min(64, triton.next_power_of_2(seq)))
    block_c = 128 if block_t > 1 else 256
    # At least one time block, so the new state is written even for T == 0.
    grid = (batch, max(1, triton.cdiv(seq, block_t)), triton.cdiv(channels, block_c))
    _causal_conv1d_kernel[grid](
        x, weight, b_, st, y, new_state, seq, channels,
        *x.stride(), *weight.stride(), *st.stride(), *y.stride(), *new_state.stride(),
        K=width, HAS_BIAS=bias is not None, HAS_STATE=state is not None, ACTIVATION=activation,
        BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_S=max(1, triton.next_power_of_2(width - 1)), num_warps=4,
    )
    return y, new_state
