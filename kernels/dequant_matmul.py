"""Y = X · dequant(W)ᵀ for ggml Q4_0 / Q4_1 / Q8_0 and Q4_K / Q5_K / Q6_K weights: Triton kernels + reference.

The GGUF file keeps ggml's byte layout (blocks of 32 weights with the scale inline). At load time
`pack_for_kernel` splits that array-of-structs into separate planes (codes, scales, minimums), each
contiguous along K, so a program streaming one row range over K issues wide, coalesced loads and
never touches bytes it does not need. `dequantize_packed` inverts the repack in pure torch; the tests
pin it bit for bit to `quant.formats`, which stays the one source of truth for ggml's layout (this
module may not import `quant`: kernels sit below it in the layering, so the three block layouts are
restated here in `_LAYOUTS` and `_k_planes` and checked against the registry by the tests).

K-quants become the same planes: their two-level scales (an fp16 super-block scale times a 6- or 8-bit group
scale) are multiplied out at load into one float32 scale (and minimum) per group, exactly (at most 17
significant bits), so the kernels treat Q4_K as Q4_1 with float32 planes, Q5_K as int8 codes with a minimum,
and Q6_K as Q8_0 with groups of 16. That costs 2 (Q4_K, Q5_K) or 2 + 1.4 (Q6_K's 8-bit codes) bits per weight
more than the file; a kernel reading the super-blocks directly would not (left for the GPU bring-up).

Two regimes, chosen in `dequant_matmul`:

* decode (M <= 16 rows of x): memory-bound GEMV. A program owns BLOCK_N output features and walks
  its share of K in BLOCK_K chunks, dequantising each W tile once in registers and reusing it for
  every x row; fp32 accumulation. With SPLIT_K > 1 the K range is split over programs, each writing
  fp32 partials that one torch sum reduces: deterministic (no atomics), so greedy decoding is
  reproducible, and it works the same under the interpreter and on GPU.
* prefill (M > 16): tiled GEMM, one program per (BLOCK_M, BLOCK_N) tile in grouped order for L2
  reuse of W; the W tile is dequantised to x's dtype in registers and fed to `tl.dot` (tensor cores),
  with an fp32 accumulator.

Errors a caller can cause (unknown format, wrong shapes or dtypes) raise `DequantMatmulError`, which
is both a `kilnlm.errors.KilnError` and a `ValueError`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from kilnlm.errors import KilnError

try:  # triton is optional: the repack and the reference must import without it
    import triton
    import triton.language as tl
except ImportError as exc:  # raised again, with a message, only when a Triton wrapper is called
    _TRITON_IMPORT_ERROR: ImportError | None = exc
else:
    _TRITON_IMPORT_ERROR = None

__all__ = [
    "DECODE_MAX_M",
    "DecodeConfig",
    "DequantMatmulError",
    "PackedWeight",
    "PrefillConfig",
    "dequant_matmul",
    "dequant_matmul_ref",
    "dequantize_packed",
    "kernel_bytes",
    "pack_for_kernel",
]

QK = 32  # weights per ggml block (Q4_0, Q4_1, Q8_0)
QK_K = 256  # weights per K-quant super-block
DECODE_MAX_M = 16  # x rows up to this use the GEMV kernel; more use the tensor-core GEMM

# fmt -> (bytes per block, byte offset of d, byte offset of m or None, byte offset of the codes).
# Restated from ggml (see module docstring); tests check it against quant.formats bit for bit.
_LAYOUTS: dict[str, tuple[int, int, int | None, int]] = {
    "q4_0": (18, 0, None, 2),
    "q4_1": (20, 0, 2, 4),
    "q8_0": (34, 0, None, 2),
}
# fmt -> bytes per 256-weight super-block (layouts in _k_planes).
_K_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
# Kernel-side format ids (constexpr): 0 d*(q-8) nibbles, 1 d*q+m nibbles, 2 d*q int8, 3 d*q+m int8.
_FMT_ID = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "q4_k": 1, "q6_k": 2, "q5_k": 3}
_NIBBLE_FORMATS = ("q4_0", "q4_1", "q4_k")


class DequantMatmulError(KilnError, ValueError):
    """Bad input to the dequant-matmul kernels: unknown format, wrong shape, dtype or device."""


@dataclass(frozen=True)
class PackedWeight:
    """A ggml weight repacked into kernel-friendly planes (all contiguous).

    fmt:     "q4_0", "q4_1", "q8_0", "q4_k", "q5_k" or "q6_k".
    shape:   (N, K) = (out_features, in_features); K is a multiple of 32 (256 for K-quants).
    qweight: the codes, row-major, contiguous along K.
             q4_0 / q4_1 / q4_k: int32 (N, K // 8); nibble j (bits 4j..4j+3) of word w is the 4-bit code
             of element 8w + j (natural order, unlike ggml's in-block low-half/high-half split).
             q8_0, q5_k (0..31), q6_k (-32..31): int8 (N, K), element k at column k.
    scales:  (N, K // group), the scale of elements group*b.. at column b: float16 ggml block scales d for the
             legacy formats, float32 products d * group scale for K-quants.
    mins:    (N, K // group), the minimum added to each element: q4_1's m (float16), q4_k / q5_k's
             -dmin * group min (float32); None for q4_0, q8_0 and q6_k.
    group:   weights per scale: 32, or 16 for q6_k.
    Values: q4_0 d * (q - 8); q4_1, q4_k, q5_k d * q + m; q8_0, q6_k d * q (as quant.formats dequantises them).
    """

    fmt: str
    shape: tuple[int, int]
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None
    group: int = QK

    @property
    def device(self) -> torch.device:
        """The device holding the planes."""
        return self.qweight.device

    def to(self, device: torch.device | str) -> PackedWeight:
        """The same weight with every plane on `device`."""
        mins = None if self.mins is None else self.mins.to(device)
        return PackedWeight(self.fmt, self.shape, self.qweight.to(device), self.scales.to(device), mins, self.group)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the GEMV (decode) kernel. split_k None: chosen from the tile count.

    Defaults: a 32 x 128 W tile is 4 ggml blocks per row (64 B of q4 codes, 128 B of q8) and 32
    fp32 registers a thread at 4 warps, leaving room for the x rows; 4096 / 32 = 128 programs for a
    4096-wide layer, and split-K (CUDA only, by default) fills the SMs when N is smaller.
    """

    block_n: int = 32
    block_k: int = 128
    split_k: int | None = None
    num_warps: int = 4


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of the tiled GEMM (prefill) kernel.

    Defaults: 64 x 64 x 64 tiles, the common fp16 tensor-core shape that fits consumer RTX shared
    memory at 3 stages; group_m = 8 keeps a W column tile in L2 across 8 row tiles.
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# ---------------------------------------------------------------------------------------------
# Load-time repack and its pure-torch inverse


def _check_format(fmt: str) -> str:
    name = fmt.lower() if isinstance(fmt, str) else fmt
    if name not in _FMT_ID:
        raise DequantMatmulError(
            f"dequant_matmul: unsupported weight format {fmt!r}; supported: {', '.join(_FMT_ID)} "
            "(dequantise other formats to f16/bf16 and use a dense matmul)"
        )
    return name


def kernel_bytes(fmt: str, shape: Sequence[int]) -> int:
    """Bytes of the planes pack_for_kernel makes of an (N, K) weight of `fmt` (what the runtime holds)."""
    fmt = _check_format(fmt)
    n, k = (int(s) for s in shape)
    codes = k // 2 if fmt in _NIBBLE_FORMATS else k
    if fmt in _LAYOUTS:
        return n * (codes + k // QK * 2 * (2 if _LAYOUTS[fmt][2] is not None else 1))
    group = 16 if fmt == "q6_k" else QK
    return n * (codes + k // group * 4 * (1 if fmt == "q6_k" else 2))


def _pack_nibbles_natural(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, K) in natural order -> int32 (N, K // 8), element 8w + j in nibble j of word w."""
    pairs = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (N, K/2): element 2i low, 2i+1 high
    # Little-endian bytes 0..3 of a word are its bits 0..31, so nibble j is element 8w + j.
    return pairs.contiguous().view(torch.int32).contiguous()


def _fp16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 at byte `offset` of every super-block (N, NB, bytes) as float32 (N, NB, 1)."""
    return blocks[..., offset:offset + 2].contiguous().view(torch.float16).to(torch.float32)


def _bits(values: torch.Tensor, shifts: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """values >> each shift, broadcast into `shape` (ggml packs sub-fields at several bit offsets)."""
    return values >> torch.tensor(shifts, dtype=torch.uint8, device=values.device).reshape(shape)


def _k_planes(fmt: str, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """K-quant super-blocks (N, NB, bytes) -> (codes (N, K) uint8/int8, scales, mins or None, group).

    Q4_K / Q5_K: d fp16 | dmin fp16 | 12 bytes of eight 6-bit group scales and mins | (Q5_K: 32 bytes of fifth
    bits) | 128 bytes of nibbles, per 64 weights the first 32 low and the next 32 high. Q6_K: 128 bytes of low
    nibbles | 64 of high 2-bit pairs | sixteen int8 group scales | d fp16.
    """
    n, nb, _ = blocks.shape
    if fmt == "q6_k":
        lo = (_bits(blocks[..., :128].reshape(n, nb, 2, 1, 64), (0, 4), (1, 1, 2, 1)) & 0x0F).reshape(n, nb, 8, 32)
        hi = (_bits(blocks[..., 128:192].reshape(n, nb, 2, 1, 32), (0, 2, 4, 6), (1, 1, 4, 1)) & 3).reshape(
            n, nb, 8, 32)
        codes = ((lo | (hi << 4)).to(torch.int16) - 32).to(torch.int8).reshape(n, nb * QK_K)
        group_scales = blocks[..., 192:208].contiguous().view(torch.int8).to(torch.float32)
        return codes, (_fp16_at(blocks, 208) * group_scales).reshape(n, nb * 16), None, 16
    packed = blocks[..., 4:16]
    sc = torch.cat([packed[..., 0:4] & 0x3F, (packed[..., 8:12] & 0x0F) | ((packed[..., 0:4] >> 2) & 0x30)], -1)
    mn = torch.cat([packed[..., 4:8] & 0x3F, (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 2) & 0x30)], -1)
    scales = (_fp16_at(blocks, 0) * sc.to(torch.float32)).reshape(n, nb * 8)
    mins = -(_fp16_at(blocks, 2) * mn.to(torch.float32)).reshape(n, nb * 8)
    qs = blocks[..., 16:144] if fmt == "q4_k" else blocks[..., 48:176]
    codes = (_bits(qs.reshape(n, nb, 4, 1, 32), (0, 4), (1, 1, 2, 1)) & 0x0F).reshape(n, nb, 8, 32)
    if fmt == "q5_k":
        fifth = _bits(blocks[..., 16:48].reshape(n, nb, 1, 32), tuple(range(8)), (1, 8, 1)) & 1
        codes = codes | (fifth << 4)
    return codes.reshape(n, nb * QK_K), scales, mins, QK


def pack_for_kernel(packed: torch.Tensor, fmt: str, shape: Sequence[int]) -> PackedWeight:
    """Split ggml uint8 blocks (N, K // 32 * bytes_per_block) of `fmt` into the planes of a PackedWeight."""
    fmt = _check_format(fmt)
    block = QK if fmt in _LAYOUTS else QK_K
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0 or shape[1] % block != 0:
        raise DequantMatmulError(
            f"pack_for_kernel({fmt}): shape must be (out_features, in_features) with in_features a "
            f"positive multiple of {block}, got {shape}"
        )
    n, k = shape
    nb = k // block
    bpb = _LAYOUTS[fmt][0] if fmt in _LAYOUTS else _K_BYTES[fmt]
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        kind = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise DequantMatmulError(f"pack_for_kernel({fmt}): packed data must be a uint8 tensor, got {kind}")
    if packed.numel() != n * nb * bpb:
        raise DequantMatmulError(
            f"pack_for_kernel({fmt}): shape {shape} packs into {n * nb * bpb} bytes ({n}, {nb * bpb}), "
            f"got {packed.numel()} bytes {tuple(packed.shape)}"
        )
    blocks = packed.reshape(n, nb, bpb)  # (N, K/block, bytes_per_block)
    if fmt not in _LAYOUTS:
        codes, scales, mins, group = _k_planes(fmt, blocks)
        qweight = _pack_nibbles_natural(codes) if fmt in _NIBBLE_FORMATS else codes.view(torch.int8).contiguous()
        return PackedWeight(fmt, (n, k), qweight, scales.contiguous(), None if mins is None else mins.contiguous(),
                            group)
    _, d_off, m_off, q_off = _LAYOUTS[fmt]

    def fp16_plane(off: int) -> torch.Tensor:
        return blocks[:, :, off : off + 2].contiguous().view(torch.float16).reshape(n, nb).contiguous()

    scales = fp16_plane(d_off)
    mins = fp16_plane(m_off) if m_off is not None else None
    qs = blocks[:, :, q_off:]
    if fmt == "q8_0":
        qweight = qs.contiguous().view(torch.int8).reshape(n, k).contiguous()
    else:
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)  # ggml order -> natural order
        qweight = _pack_nibbles_natural(codes)  # (N, K/8)
    return PackedWeight(fmt, (n, k), qweight, scales, mins)


def _unpack_codes(pw: PackedWeight) -> torch.Tensor:
    """The integer codes of pw as int32 (N, K), natural element order."""
    n, k = pw.shape
    if pw.fmt not in _NIBBLE_FORMATS:
        return pw.qweight.to(torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=pw.qweight.device)
    return ((pw.qweight.unsqueeze(-1) >> shifts) & 0xF).reshape(n, k)


def dequantize_packed(pw: PackedWeight) -> torch.Tensor:
    """The float32 weights (N, K) of pw, computed exactly as quant.formats dequantises ggml blocks."""
    n, k = pw.shape
    q = _unpack_codes(pw).to(torch.float32).reshape(n, k // pw.group, pw.group)
    d = pw.scales.to(torch.float32).unsqueeze(-1)  # (N, K/group, 1)
    if pw.fmt == "q4_0":
        w = d * (q - 8)
    elif pw.mins is not None:
        w = (d * q) + pw.mins.to(torch.float32).unsqueeze(-1)
    else:
        w = q * d
    return w.reshape(n, k)


def _check_inputs(x: torch.Tensor, pw: PackedWeight) -> None:
    if not isinstance(pw, PackedWeight):
        raise DequantMatmulError(
            f"dequant_matmul: expected a PackedWeight (see pack_for_kernel), got {type(pw).__name__}"
        )
    _check_format(pw.fmt)
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise DequantMatmulError("dequant_matmul: x must be a torch.Tensor of shape (..., K)")
    k = pw.shape[1]
    if x.shape[-1] != k:
        raise DequantMatmulError(
            f"dequant_matmul: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but the {pw.fmt} "
            f"weight of shape {pw.shape} expects K = {k}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DequantMatmulError(f"dequant_matmul: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.device != pw.device:
        raise DequantMatmulError(f"dequant_matmul: x is on {x.device} but the weight is on {pw.device}")


def dequant_matmul_ref(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """Reference: x (..., K) @ dequantize_packed(pw)ᵀ in fp32, cast to x's dtype -> (..., N)."""
    _check_inputs(x, pw)
    w = dequantize_packed(pw)  # (N, K) fp32
    return (x.to(torch.float32) @ w.t()).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels


if _TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _dequant_tile(q_ptr, s_ptr, m_ptr, offs_n, offs_k, mask, stride_qn, stride_sn, FMT: tl.constexpr,
                      GROUP: tl.constexpr):
        """fp32 W tile [BLOCK_N, BLOCK_K] for rows offs_n, columns offs_k (masked lanes are 0)."""
        rows = offs_n[:, None].to(tl.int64)  # N * K can pass 2^31 (large-vocab output heads)
        if FMT >= 2:  # q8_0, q6_k, q5_k: int8 code per element
            q = tl.load(q_ptr + rows * stride_qn + offs_k[None, :], mask=mask, other=0).to(tl.float32)
        else:  # q4: 8 nibbles per int32 word; neighbouring lanes read the same word (one transaction)
            word = tl.load(q_ptr + rows * stride_qn + (offs_k // 8)[None, :], mask=mask, other=0)
            q = ((word >> ((offs_k % 8) * 4)[None, :]) & 0xF).to(tl.float32)
        s_off = rows * stride_sn + (offs_k // GROUP)[None, :]
        d = tl.load(s_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
        if FMT == 0:
            w = d * (q - 8.0)
        elif FMT == 1 or FMT == 3:
            m = tl.load(m_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
            w = d * q + m
        else:
            w = q * d
        return w


    @triton.jit
    def _decode_kernel(
        x_ptr, q_ptr, s_ptr, m_ptr, out_ptr,
        M, N, K, K_CHUNKS_PER_SPLIT,
        stride_xm, stride_qn, stride_sn, stride_os, stride_om,
        FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[split, m, n] = sum over this split's K chunks of x[m, k] * W[n, k]; program (n tile, split)."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_s * K_CHUNKS_PER_SPLIT * BLOCK_K
        k_hi = tl.minimum(k_lo + K_CHUNKS_PER_SPLIT * BLOCK_K, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            w = _dequant_tile(q_ptr, s_ptr, m_ptr, offs_n, offs_k, mask_n[:, None] & mask_k[None, :],
                              stride_qn, stride_sn, FMT, GROUP)  # (BLOCK_N, BLOCK_K) fp32, loaded once
            for mi in tl.static_range(BLOCK_M):  # reuse the dequantised tile for every x row
                # Padding rows (mi >= M) re-read row M - 1: always in bounds, and never stored.
                row = tl.minimum(mi, M - 1)
                xm = tl.load(x_ptr + row * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                part = tl.sum(w * xm[None, :], axis=1)  # (BLOCK_N,)
                acc += tl.where(offs_m[:, None] == mi, part[None, :], 0.0)
        out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :].to(tl.int64)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & mask_n[None, :])


    @triton.jit
    def _prefill_kernel(
        x_ptr, q_ptr, s_ptr, m_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_qn, stride_sn, stride_ym,
        FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """y[m, n] = sum_k x[m, k] * W[n, k] for one (BLOCK_M, BLOCK_N) tile, W dequantised to x's dtype."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # Grouped ordering: GROUP_M row tiles sweep the same W column tiles while they sit in L2.
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K) x dtype
            w = _dequant_tile(q_ptr, s_ptr, m_ptr, offs_n, offs_k, mask_n[:, None] & mask_k[None, :],
                              stride_qn, stride_sn, FMT, GROUP)  # (BLOCK_N, BLOCK_K) fp32
            w = w.to(a.dtype)  # the rounding a tensor-core MMA in x's dtype sees
            if UPCAST_DOT:  # exact: a product of two bf16 values fits an fp32 mantissa
                acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# Host wrappers


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _require_triton(x: torch.Tensor) -> None:
    """Fail loudly when triton is missing, or x is off CUDA without the interpreter."""
    if _TRITON_IMPORT_ERROR is not None:
        raise ImportError(
            f"dequant_matmul needs the `triton` package, which failed to import ({_TRITON_IMPORT_ERROR}); "
            "install triton or call dequant_matmul_ref instead"
        ) from _TRITON_IMPORT_ERROR
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise DequantMatmulError(
            f"dequant_matmul: got tensors on {x.device}; the Triton kernels run on CUDA tensors "
            "(or on the CPU under TRITON_INTERPRET=1, for tests); use dequant_matmul_ref on the CPU"
        )


def _planes(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # q4_0/q8_0/q6_k have no minimum plane; the kernel never reads m_ptr then, any valid pointer will do.
    mins = pw.mins if pw.mins is not None else pw.scales
    return pw.qweight, pw.scales, mins


def _check_block(value: int, name: str, minimum: int) -> None:
    """Block sizes are powers of two (tl.arange); K blocks hold whole ggml blocks, dot tiles >= 16."""
    if value < minimum or value & (value - 1):
        raise DequantMatmulError(f"dequant_matmul: {name} must be a power of two >= {minimum}, got {value}")


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _default_split_k(n_tiles: int, k_chunks: int, device: torch.device) -> int:
    """Enough K splits that skinny shapes fill the GPU (about 2 programs per SM); 1 on the CPU."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(k_chunks, (2 * sms) // max(n_tiles, 1), 16))


def _decode(x2: torch.Tensor, pw: PackedWeight, cfg: DecodeConfig) -> torch.Tensor:
    """GEMV launch for x2 (M <= 16, K) contiguous; returns (M, N) in x2's dtype."""
    m, k = x2.shape
    n = pw.shape[0]
    _check_block(cfg.block_k, "DecodeConfig.block_k", 32)
    _check_block(cfg.block_n, "DecodeConfig.block_n", 1)
    block_m = max(1, 1 << (m - 1).bit_length())
    n_tiles = _cdiv(n, cfg.block_n)
    k_chunks = _cdiv(k, cfg.block_k)
    split_k = cfg.split_k if cfg.split_k is not None else _default_split_k(n_tiles, k_chunks, x2.device)
    if split_k < 1:
        raise DequantMatmulError(f"dequant_matmul: split_k must be >= 1, got {split_k}")
    split_k = min(split_k, k_chunks)
    per_split = _cdiv(k_chunks, split_k)
    split_k = _cdiv(k_chunks, per_split)  # no empty splits
    if split_k == 1:
        out = torch.empty((1, m, n), dtype=x2.dtype, device=x2.device)
    else:
        out = torch.empty((split_k, m, n), dtype=torch.float32, device=x2.device)  # fp32 partials
    q, s, mn = _planes(pw)
    _decode_kernel[(n_tiles, split_k)](
        x2, q, s, mn, out,
        m, n, k, per_split,
        x2.stride(0), q.stride(0), s.stride(0), out.stride(0), out.stride(1),
        FMT=_FMT_ID[pw.fmt], GROUP=pw.group, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
    )
    return out[0] if split_k == 1 else out.sum(dim=0).to(x2.dtype)


def _prefill(x2: torch.Tensor, pw: PackedWeight, cfg: PrefillConfig) -> torch.Tensor:
    """Tiled GEMM launch for x2 (M, K) contiguous; returns (M, N) in x2's dtype."""
    m, k = x2.shape
    n = pw.shape[0]
    _check_block(cfg.block_k, "PrefillConfig.block_k", 32)
    _check_block(cfg.block_m, "PrefillConfig.block_m", 16)
    _check_block(cfg.block_n, "PrefillConfig.block_n", 16)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    q, s, mn = _planes(pw)
    grid = (_cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n),)
    _prefill_kernel[grid](
        x2, q, s, mn, y,
        m, n, k,
        x2.stride(0), q.stride(0), s.stride(0), y.stride(0),
        FMT=_FMT_ID[pw.fmt], GROUP=pw.group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        # The CPU interpreter's tl.dot multiplies bf16 as its uint16 storage; products of bf16
        # values are exact in fp32, so an fp32 dot of the same bf16 operands gives the MMA's result.
        UPCAST_DOT=x2.dtype == torch.bfloat16 and x2.device.type != "cuda",
        # fp32 activations get true fp32 products (no TF32): fp32 is the accuracy/debug path.
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def dequant_matmul(
    x: torch.Tensor,
    pw: PackedWeight,
    *,
    decode: DecodeConfig = DecodeConfig(),
    prefill: PrefillConfig = PrefillConfig(),
) -> torch.Tensor:
    """x (..., K) @ dequant(pw)ᵀ -> (..., N) in x's dtype; GEMV for <= 16 rows of x, tiled GEMM above."""
    _check_inputs(x, pw)
    _require_triton(x)
    n, k = pw.shape
    lead = x.shape[:-1]
    m = math.prod(lead)
    if m == 0:
        return x.new_empty((*lead, n))
    x2 = x.reshape(m, k).contiguous()
    y = _decode(x2, pw, decode) if m <= DECODE_MAX_M else _prefill(x2, pw, prefill)
    return y.reshape(*lead, n)
