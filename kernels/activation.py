"""SwiGLU's gate: silu(gate) * up. The Triton kernel beside the reference that defines its semantics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kilnlm.kernels.norm import _TRITON_IMPORT_ERROR, require_triton

if _TRITON_IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    from kilnlm.kernels.norm import round_to


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise."""
    return F.silu(gate) * up


if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # fp32 math; silu is rounded to the dtype before the product, as F.silu(gate) * up does
        s = round_to(g / (1.0 + tl.exp(-g)), dtype)
        tl.store(out_ptr + offs, round_to(s * u, dtype).to(dtype), mask=mask)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """silu_mul_ref(gate, up) in one Triton launch: gate and up share shape, dtype (fp16/bf16/fp32) and device."""
    require_triton("silu_mul_triton", gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"silu_mul_triton: gate and up must match, got {tuple(gate.shape)} {gate.dtype} on {gate.device} "
            f"and {tuple(up.shape)} {up.dtype} on {up.device}"
        )
    if gate.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"silu_mul_triton: expected fp16, bf16 or fp32, got {gate.dtype}")
    gate, up = gate.contiguous(), up.contiguous()  # flat indexing; a no-op for the usual contiguous inputs
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=4)
    return out
