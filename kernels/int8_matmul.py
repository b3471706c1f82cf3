"""INT8 × INT8 -> INT32 GEMM in Triton, and the LLM.int8 linear forward built on it.

`int8_matmul_triton` is the integer core of W8A8: tiles of x_q (M, K) and w (N, K) meet in `tl.dot` with an int32
accumulator (int8 tensor-core MMA on Ampere and later). Its reference is any exact integer matmul, e.g.
`(x_q.long() @ w.long().t())`. `int8_linear_triton` reproduces `kilnlm.quant.llm_int8.int8_linear_forward`
(the oracle: read its docstring for the numerics) with this GEMM for the regular part; the activation
quantization and the fp16 outlier product stay torch ops (two launches besides the GEMM).

The kernels layer may not import `kilnlm.quant` (quant sits above it), so the few lines of activation
quantization and outlier selection are restated here; tests hold them equal to the reference bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kilnlm.kernels.norm import _TRITON_IMPORT_ERROR, require_triton

if _TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

if TYPE_CHECKING:
    from kilnlm.quant.llm_int8 import Int8Weight

# |code| ≤ 128 on either side, so K · 128² must fit in int32 (the same bound as quant.llm_int8.MAX_IN_FEATURES).
MAX_K = (2**31 - 1) // (128 * 128)

if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _int8_matmul_kernel(
        a_ptr, b_ptr, c_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Grouped tile order: GROUP_M row-tiles share each column-tile of b while it is in L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
        pid_n = (pid % (GROUP_M * num_n)) // group_size

        rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        rk = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
        b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn  # (BLOCK_K, BLOCK_N): w tile, transposed
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k_left = K - k0
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0)
            b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # exact: zero padding adds nothing
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        tl.store(c_ptrs, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_matmul_triton(
    x_q: torch.Tensor, w: torch.Tensor, block_m: int = 64, block_n: int = 64, block_k: int = 64, group_m: int = 8
) -> torch.Tensor:
    """int8 x_q (M, K) @ int8 w (N, K)ᵀ -> int32 (M, N), exact (int32 accumulation of int8 products).

    Any strides are accepted. Block sizes must be powers of two ≥ 16 (tl.dot's minimum); K is limited to
    MAX_K so that no sum of products of codes in -128..127 can overflow int32.
    """
    if x_q.dtype != torch.int8 or w.dtype != torch.int8 or x_q.ndim != 2 or w.ndim != 2 or x_q.shape[1] != w.shape[1]:
        raise ValueError(
            f"int8_matmul_triton: expected int8 x_q (M, K) and int8 w (N, K), got {x_q.dtype} {tuple(x_q.shape)} "
            f"and {w.dtype} {tuple(w.shape)}"
        )
    if x_q.device != w.device:
        raise ValueError(f"int8_matmul_triton: x_q is on {x_q.device} but w on {w.device}")
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"int8_matmul_triton: {name} must be a power of two ≥ 16, got {b}")
    m, k = x_q.shape
    n = w.shape[0]
    if k > MAX_K:
        raise ValueError(f"int8_matmul_triton: K = {k} can overflow the int32 accumulator (at most {MAX_K}); split K")
    require_triton("int8_matmul_triton", x_q, w)
    out = torch.empty((m, n), dtype=torch.int32, device=x_q.device)  # (M, N)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _int8_matmul_kernel[grid](
        x_q, w, out, m, n, k,
        x_q.stride(0), x_q.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
    )
    return out


def int8_linear_triton(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None, **blocks: int) -> torch.Tensor:
    """int8_linear_forward(x, w, bias) with the regular int8 × int8 part on int8_matmul_triton; x (..., in) -> (..., out).

    `blocks` (block_m, block_n, block_k, group_m) are passed to int8_matmul_triton.
    """
    in_f, out_f = w.in_features, w.out_features
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim == 0 or x.shape[-1] != in_f:
        kind = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"int8_linear_triton: expected a floating-point input (..., {in_f}), got {kind}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"int8_linear_triton: bias must have shape ({out_f},), got {tuple(bias.shape)}")
    require_triton("int8_linear_triton", x, w.weight_int8)
    x2 = x.reshape(-1, in_f).to(torch.float32)  # (T, in)

    # Outlier features: the stored list ∪ every feature above the threshold anywhere in this batch.
    stored = torch.zeros(in_f, dtype=torch.bool, device=x2.device)  # (in,)
    stored[w.outlier_idx] = True
    crossing = (x2.abs() > w.threshold).any(dim=0)  # (in,)
    extra_idx = torch.nonzero(crossing & ~stored).flatten()  # (n_extra,): weight from the dequantized codes
    outlier = stored | crossing  # (in,)

    # Regular part: per-token absmax int8 (round half to even, codes in -127..127, zero rows scale 0).
    xr = x2.masked_fill(outlier, 0)  # (T, in)
    x_scale = xr.abs().amax(dim=-1) / 127 if in_f else xr.new_zeros(xr.shape[0])  # (T,)
    safe = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))[:, None]  # (T, 1)
    x_q = torch.round(xr / safe).clamp_(-127, 127).to(torch.int8)  # (T, in)
    acc = int8_matmul_triton(x_q, w.weight_int8, **blocks)  # (T, out) int32
    y = acc.to(torch.float32) * torch.outer(x_scale, w.row_scale)  # (T, out)

    # Outlier part in fp32: stored columns from fp16, run-time ones from the int8 codes × row scale.
    idx = torch.cat([w.outlier_idx, extra_idx])  # (n_all,)
    extra_weight = w.weight_int8[:, extra_idx].to(torch.float32) * w.row_scale[:, None]  # (out, n_extra)
    w_out = torch.cat([w.outlier_weight.to(torch.float32), extra_weight], dim=1)  # (out, n_all)
    y += x2[:, idx] @ w_out.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_f)
