"""RMSNorm: the Triton kernel (optionally fused with the residual add) beside the reference that defines its semantics.
At the end, Mamba-2's gated, grouped RMSNorm in the same two forms.

This file also holds the two helpers the other elementwise kernels share (`require_triton`, `round_to`).
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: the references below must import without it
    import triton
    import triton.language as tl
except ImportError as exc:  # raised again, with a message, only when a Triton wrapper is called
    _TRITON_IMPORT_ERROR: ImportError | None = exc
else:
    _TRITON_IMPORT_ERROR = None


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back before the weight, as HF Llama does."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def require_triton(what: str, *tensors: torch.Tensor) -> None:
    """Fail loudly when triton is missing, or when a tensor is on the CPU without the Triton interpreter."""
    if _TRITON_IMPORT_ERROR is not None:
        raise ImportError(
            f"{what} needs the `triton` package, which failed to import ({_TRITON_IMPORT_ERROR}); "
            "install triton or call the pure-torch reference instead"
        ) from _TRITON_IMPORT_ERROR
    for t in tensors:
        if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"{what}: got a tensor on {t.device}; Triton kernels run on CUDA tensors "
                "(or on the CPU under TRITON_INTERPRET=1, for tests)"
            )


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """fp32 x rounded to `dtype`, round-half-to-even, then widened back to fp32 (torch's per-op rounding).

        bf16 is rounded by hand: the Triton interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest
        even), so the explicit rounding makes both backends give the same bits. The value after it is exactly
        representable in bf16, so the final cast cannot round again.
        """
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            r = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
            r = tl.where(x != x, x, r)  # NaN stays NaN (the carry could turn a NaN payload into Inf)
            return r.to(tl.bfloat16).to(tl.float32)
        elif dtype == tl.float32:
            return x
        else:
            return x.to(dtype).to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, h_ptr,
        N, stride_x, stride_res, stride_out, stride_h, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x_dtype: tl.constexpr = x_ptr.dtype.element_ty
        h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
            h = round_to(h + r, x_dtype)  # torch's x + residual rounds to x's dtype
            tl.store(h_ptr + row * stride_h + cols, h.to(x_dtype), mask=mask)
        ms = tl.sum(h * h, axis=0) / N  # fp32 statistics
        inv = 1.0 / tl.sqrt_rn(ms + eps)  # IEEE sqrt: GPU rsqrt.approx would add ~2 ulp of fp32
        normed = round_to(h * inv, x_dtype)  # the reference casts to x's dtype before the weight
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out_dtype: tl.constexpr = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * stride_out + cols, round_to(normed * w, out_dtype).to(out_dtype), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_ref(x, weight, eps) by one Triton program per row; with residual, (rms_norm(x + residual), x + residual).

    x (..., N) fp16/bf16/fp32; weight (N,); residual like x. The output dtype is torch's promotion of x's and
    weight's dtypes, as in the reference; the new residual h = x + residual has x's dtype.
    """
    require_triton("rms_norm_triton", x, weight)
    n = x.shape[-1]
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rms_norm_triton: x and weight must be fp16, bf16 or fp32, got {x.dtype} and {weight.dtype}")
    if tuple(weight.shape) != (n,) or weight.device != x.device:
        raise ValueError(f"rms_norm_triton: weight must be ({n},) on {x.device}, got {tuple(weight.shape)} on {weight.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(
            f"rms_norm_triton: residual must match x {tuple(x.shape)} {x.dtype} on {x.device}, "
            f"got {tuple(residual.shape)} {residual.dtype} on {residual.device}"
        )
    x2 = x.reshape(-1, n)  # (M, N); a copy only when x's rows cannot be viewed with unit column stride
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)  # (M, N)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h2 = torch.empty_like(x2, memory_format=torch.contiguous_format)  # (M, N)
    else:
        r2 = h2 = x2  # unused by the kernel (HAS_RESIDUAL is False)
    m = x2.shape[0]
    if m:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(m,)](
            x2, r2, weight, out, h2,
            n, x2.stride(0), r2.stride(0), out.stride(0), h2.stride(0), float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=min(max(block // 256, 1), 16),
        )
    out = out.reshape(*x.shape[:-1], n)
    if residual is None:
        return out
    return out, h2.reshape(x.shape)


# --------------------------------------------------------------------------------------------- gated RMSNorm


def gated_rms_norm_ref(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int
) -> torch.Tensor:
    """Mamba-2's gated RMSNorm: g = x * silu(z), each group of `group_size` channels normalised by its own RMS.

    x, z (..., H) with H a multiple of group_size; weight (H,). As mamba_ssm's RMSNormGated(norm_before_gate=False)
    and transformers' MambaRMSNormGated: fp32 statistics, cast to x's dtype before the weight (as rms_norm_ref).
    """
    hidden = x.shape[-1]
    g = x.float() * torch.nn.functional.silu(z.float())
    groups = g.reshape(*g.shape[:-1], hidden // group_size, group_size)  # (..., H / group, group)
    normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.reshape(g.shape).to(x.dtype)


if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _gated_rms_norm_kernel(
        x_ptr, z_ptr, w_ptr, out_ptr, GROUP, stride_x, stride_z, stride_out, eps, BLOCK: tl.constexpr,
    ):
        # One program: one group of one row.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < GROUP
        cols = tl.program_id(1) * GROUP + offs
        x_dtype: tl.constexpr = x_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
        g = x * (z / (1.0 + tl.exp(-z)))  # fp32 throughout, as the reference
        ms = tl.sum(g * g, axis=0) / GROUP
        inv = 1.0 / tl.sqrt_rn(ms + eps)  # IEEE sqrt, as in _rms_norm_kernel
        normed = round_to(g * inv, x_dtype)  # the reference casts to x's dtype before the weight
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out_dtype: tl.constexpr = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * stride_out + cols, round_to(normed * w, out_dtype).to(out_dtype), mask=mask)


def gated_rms_norm_triton(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int
) -> torch.Tensor:
    """gated_rms_norm_ref(x, z, weight, eps, group_size) by one Triton program per (row, group)."""
    require_triton("gated_rms_norm_triton", x, z, weight)
    hidden = x.shape[-1]
    if z.shape != x.shape or z.device != x.device:
        raise ValueError(f"gated_rms_norm_triton: z must match x {tuple(x.shape)}, got {tuple(z.shape)}")
    if group_size <= 0 or hidden % group_size:
        raise ValueError(f"gated_rms_norm_triton: {hidden} channels do not split into groups of {group_size}")
    if x.dtype not in _FLOAT_DTYPES or z.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"gated_rms_norm_triton: x, z and weight must be fp16, bf16 or fp32, "
                         f"got {x.dtype}, {z.dtype} and {weight.dtype}")
    if tuple(weight.shape) != (hidden,) or weight.device != x.device:
        raise ValueError(f"gated_rms_norm_triton: weight must be ({hidden},) on {x.device}, "
                         f"got {tuple(weight.shape)} on {weight.device}")
    x2, z2 = x.reshape(-1, hidden), z.reshape(-1, hidden)  # (M, H); copied only without unit column stride
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    z2 = z2 if z2.stride(-1) == 1 else z2.contiguous()
    weight = weight.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)  # (M, H)
    if x2.shape[0] and hidden:
        block = triton.next_power_of_2(group_size)
        _gated_rms_norm_kernel[(x2.shape[0], hidden // group_size)](
            x2, z2, weight, out, group_size, x2.stride(0), z2.stride(0), out.stride(0), float(eps),
            BLOCK=block, num_warps=min(max(block // 256, 1), 16),
        )
    return out.reshape(x.shape)
