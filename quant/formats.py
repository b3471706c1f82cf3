"""The one registry of weight formats: ggml-compatible packing, reference dequantisation, GGUF type.

Every format is a `WeightFormat` instance registered under a lower-case name ("q4_0") and, when
GGUF has a type for it, under its `gguf.GGMLQuantizationType`. Packed data is always a uint8
tensor laid out byte for byte as ggml lays it out, so the GGUF writer copies it without knowing
the format, and so a llama.cpp file's tensor bytes can be dequantised here directly.

Quantisation is bit-exact with ggml's C `quantize_row_*_ref` and with `gguf.quants.quantize` (its
numpy mirror), except in edge cases where those are undefined, useless or disagree; decided here:

* A block whose fp16 scale (or Q4_1 minimum) overflows fp16 to infinity raises
  `QuantizationError`. ggml and gguf write an infinite scale, which dequantises to inf/NaN
  weights; we refuse, and the message suggests keeping that tensor in bf16 or f32. The same rule
  makes F16/BF16 refuse finite weights that round to infinity in the narrower type.
* A block whose scale is so small (below about 2.9e-39) that its reciprocal overflows float32 is
  encoded as ggml encodes an all-zero block (reciprocal 0): Q8_0 codes 0, Q4_0 codes 8, Q4_1
  codes 0. ggml converts inf/NaN floats to integers there (undefined behaviour in C, platform-
  dependent bytes in numpy); the fp16 scale of such a block is 0, so every choice dequantises the
  same, and ours is deterministic.
* Signed zeros follow ggml's C loops, where gguf's numpy differs: Q4_0 stores d = -0.0 for every
  all-zero block (numpy: +0.0 when the block starts with -0.0), and Q4_1 takes the first of
  equal extremes, so a block whose minimum is 0 stores m = +0.0 or -0.0 as its first zero is
  (numpy's min/max pick a SIMD-order-dependent one). Only zeros' signs differ, never values.

NaN and Inf weights are rejected by every format: they mean a corrupt checkpoint.
Input weights of any float dtype are converted to float32 first, as ggml's quantisers read f32.
K-quants (Q2_K..Q6_K) are read-only: they dequantise llama.cpp files but cannot be produced here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from kilnlm.errors import KilnError

__all__ = [
    "QuantizationError",
    "WeightFormat",
    "QuantizedTensor",
    "register",
    "get_format",
    "format_for_gguf_type",
    "registered_formats",
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
]


class QuantizationError(KilnError):
    """A tensor cannot be packed into (or unpacked from) the requested weight format."""


# Blocks are processed this many weights at a time: temporaries stay cache- and memory-friendly.
_CHUNK_WEIGHTS = 1 << 20


class WeightFormat(ABC):
    """A packed weight format: ggml byte layout, quantize/dequantize, GGUF type.

    Subclasses set the class attributes and implement `_quantize_blocks` / `_dequantize_blocks`,
    which see a 2-D view: float32 (n_blocks, block_size) <-> uint8 (n_blocks, bytes_per_block).
    Parameterised formats (e.g. GPTQ group sizes) may set these attributes per instance instead.
    """

    name: str
    gguf_type: GGMLQuantizationType | None
    block_size: int
    bytes_per_block: int
    can_quantize: bool = True
    # Byte offsets of the fp16 scale d and minimum m in a block, for legacy formats where every weight
    # is d * code (+ m); None where the format has no such single field (float types, K-quants).
    scale_offset: int | None = None
    min_offset: int | None = None

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight, scales included (Q4_0: 4.5)."""
        return self.bytes_per_block * 8 / self.block_size

    def __repr__(self) -> str:
        return f"<WeightFormat {self.name}>"

    def packed_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The uint8 shape (..., cols // block_size * bytes_per_block) that packs `shape`."""
        shape = tuple(int(s) for s in shape)
        if len(shape) == 0:
            raise QuantizationError(f"{self.name}: a weight needs at least one dimension, got a scalar")
        cols = shape[-1]
        if cols % self.block_size != 0:
            raise QuantizationError(
                f"{self.name}: the last dimension of shape {shape} is {cols}, which is not a multiple of "
                f"the block size {self.block_size} ({self.name} packs whole blocks; "
                "store such a tensor as f16, bf16 or f32)"
            )
        return (*shape[:-1], cols // self.block_size * self.bytes_per_block)

    def quantize(self, weights: torch.Tensor) -> torch.Tensor:
        """Pack float weights (..., cols) into uint8 (..., cols // block_size * bytes_per_block)."""
        if not self.can_quantize:
            raise QuantizationError(
                f"{self.name} is read-only in kilnlm: it can dequantise llama.cpp files but not be "
                f"produced; quantize to one of {', '.join(f.name for f in registered_formats() if f.can_quantize)}"
            )
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            kind = weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise QuantizationError(f"{self.name}: expected a floating-point torch.Tensor, got {kind}")
        out_shape = self.packed_shape(weights.shape)
        w = weights.detach().to(torch.float32).contiguous()
        check_finite(w, self.name)
        blocks = w.reshape(-1, self.block_size)
        packed = torch.empty((blocks.shape[0], self.bytes_per_block), dtype=torch.uint8, device=w.device)
        step = max(1, _CHUNK_WEIGHTS // self.block_size)
        for start in range(0, blocks.shape[0], step):
            packed[start : start + step] = self._quantize_blocks(blocks[start : start + step])
        return packed.reshape(out_shape)

    def dequantize(self, packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Unpack uint8 data (any shape holding prod(packed_shape(shape)) bytes) to float32 `shape`."""
        shape = tuple(int(s) for s in shape)
        expected = self.packed_shape(shape)
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            kind = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
            raise QuantizationError(f"{self.name}: packed data must be a uint8 torch.Tensor, got {kind}")
        if packed.numel() != math.prod(expected):
            raise QuantizationError(
                f"{self.name}: a tensor of shape {shape} packs into {math.prod(expected)} bytes "
                f"{expected}, but the packed data holds {packed.numel()} bytes {tuple(packed.shape)}"
            )
        blocks = packed.reshape(-1, self.bytes_per_block)
        out = torch.empty((blocks.shape[0], self.block_size), dtype=torch.float32, device=packed.device)
        step = max(1, _CHUNK_WEIGHTS // self.block_size)
        for start in range(0, blocks.shape[0], step):
            out[start : start + step] = self._dequantize_blocks(blocks[start : start + step])
        return out.reshape(shape)

    @abstractmethod
    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """float32 (n_blocks, block_size) -> uint8 (n_blocks, bytes_per_block)."""

    @abstractmethod
    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """uint8 (n_blocks, bytes_per_block) -> float32 (n_blocks, block_size)."""


# The registry table: the only module-level mutable state. Keyed by format name.
_FORMATS: dict[str, WeightFormat] = {}


def register(fmt: WeightFormat) -> WeightFormat:
    """Add a format to the registry (names and GGUF types must be unique); return it."""
    if not fmt.name or fmt.name != fmt.name.lower():
        raise ValueError(f"format names are non-empty lower case, got {fmt.name!r}")
    if fmt.name in _FORMATS:
        raise ValueError(f"a weight format named {fmt.name!r} is already registered")
    if fmt.gguf_type is not None:
        if any(other.gguf_type == fmt.gguf_type for other in _FORMATS.values()):
            raise ValueError(f"GGUF type {fmt.gguf_type.name} already has a registered format")
        if GGML_QUANT_SIZES[fmt.gguf_type] != (fmt.block_size, fmt.bytes_per_block):
            raise ValueError(f"{fmt.name}: block layout disagrees with gguf's GGML_QUANT_SIZES")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> WeightFormat:
    """The registered format called `name` (case-insensitive, e.g. "q4_0")."""
    fmt = _FORMATS.get(name.lower())
    if fmt is None:
        raise QuantizationError(f"unknown weight format {name!r}; known formats: {', '.join(sorted(_FORMATS))}")
    return fmt


def format_for_gguf_type(gguf_type: GGMLQuantizationType | int) -> WeightFormat:
    """The registered format whose GGUF tensor type is `gguf_type`."""
    for fmt in _FORMATS.values():
        if fmt.gguf_type is not None and fmt.gguf_type == gguf_type:
            return fmt
    try:
        label = GGMLQuantizationType(gguf_type).name
    except ValueError:
        label = str(gguf_type)
    raise QuantizationError(
        f"GGUF tensor type {label} is not supported by kilnlm; supported: "
        f"{', '.join(f.gguf_type.name for f in _FORMATS.values() if f.gguf_type is not None)}"
    )


def registered_formats() -> tuple[WeightFormat, ...]:
    """Every registered format, in registration order."""
    return tuple(_FORMATS.values())


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight in packed form.

    format: the registered `WeightFormat`.
    shape:  logical shape in torch/HF order, (rows, cols) = (out_features, in_features) for a
            matrix, (cols,) for a vector. GGUF lists dimensions in the reverse order (ne0 = cols).
    data:   uint8, shape format.packed_shape(shape) = (rows, cols // block_size * bytes_per_block);
            each row is cols // block_size ggml blocks of bytes_per_block bytes.
    """

    format: WeightFormat
    shape: tuple[int, ...]
    data: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        expected = self.format.packed_shape(self.shape)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != expected:
            raise QuantizationError(
                f"{self.format.name}: a tensor of shape {self.shape} needs uint8 data of shape {expected}, "
                f"got {self.data.dtype} {tuple(self.data.shape)}"
            )

    @classmethod
    def from_float(cls, weights: torch.Tensor, fmt: WeightFormat | str) -> QuantizedTensor:
        """Quantize `weights` into `fmt` (a format or its registered name)."""
        fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        return cls(fmt, tuple(weights.shape), fmt.quantize(weights))

    @property
    def nbytes(self) -> int:
        """Bytes of packed data."""
        return self.data.numel()

    def dequantize(self) -> torch.Tensor:
        """The weights as float32, shape `self.shape`."""
        return self.format.dequantize(self.data, self.shape)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the formats


def check_finite(w: torch.Tensor, name: str) -> None:
    """Raise QuantizationError naming the count and first index of NaN/Inf values in `w`."""
    # A NaN or Inf anywhere makes the sum non-finite; the sum is vectorised, isfinite is not.
    if bool(torch.isfinite(w.sum())) or bool(torch.isfinite(w).all()):
        return
    n_nan = int(torch.isnan(w).sum())
    n_inf = int(torch.isinf(w).sum())
    first = tuple(int(i) for i in torch.nonzero(~torch.isfinite(w))[0])
    raise QuantizationError(
        f"{name}: cannot quantize a tensor of shape {tuple(w.shape)} holding {n_nan} NaN and {n_inf} Inf "
        f"value(s) (first at index {first}); non-finite weights mean the checkpoint is corrupt"
    )


def _to_fp16_bytes(x: torch.Tensor, fmt: str, what: str) -> torch.Tensor:
    """float32 (n, 1) -> uint8 (n, 2), little-endian fp16; raises where x overflows fp16."""
    h = x.to(torch.float16)
    if bool(torch.isinf(h).any()):
        worst = float(x.abs().max())
        raise QuantizationError(
            f"{fmt}: a block's {what} is {worst:.6g}, beyond fp16's range (65504); weights this large "
            f"cannot be stored in {fmt}: keep this tensor in bf16 or f32"
        )
    return le_bytes(h)


def le_bytes(x: torch.Tensor) -> torch.Tensor:
    """Raw little-endian bytes of a contiguous tensor (..., n) -> uint8 (..., n * itemsize)."""
    if sys.byteorder != "little":
        raise QuantizationError("kilnlm's packed formats assume a little-endian host")
    return x.contiguous().view(torch.uint8)


def fp16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian fp16 at byte `offset` of every block, as float32 (n_blocks, 1)."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    """1/d as ggml computes it, with 0 where d == 0 or where 1/d overflows (see module docstring)."""
    inv = torch.ones_like(d) / d
    return torch.where((d == 0) | torch.isinf(inv), torch.zeros_like(inv), inv)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C roundf (ties away from zero), exact for every float32, as gguf's np_roundf."""
    a = x.abs()
    floored = a.floor()
    return a.sub_(floored).mul_(2).floor_().add_(floored).copysign_(x)


def first_extreme(blocks: torch.Tensor, extreme: torch.Tensor, arg_fn) -> torch.Tensor:
    """The block extreme (n, 1) as ggml's `if (v < min) min = v` loop finds it: the first of equal values.

    Only the sign of a zero extreme can differ (+0.0 == -0.0), so only those blocks are looked at.
    """
    zero = extreme.squeeze(-1) == 0
    if not bool(zero.any()):
        return extreme
    sub = blocks[zero]
    extreme = extreme.clone()
    extreme[zero] = sub.gather(-1, arg_fn(sub, dim=-1, keepdim=True))
    return extreme


def _shifts(device: torch.device, values: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).reshape(shape)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 (n, k) -> uint8 (n, 2k): low nibbles of all k bytes, then their high nibbles (ggml order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes (n, 2k) in 0..15 -> (n, k): element j in the low nibble, j + k in the high one."""
    half = q.shape[-1] // 2
    return q[:, :half] | (q[:, half:] << 4)


# ---------------------------------------------------------------------------------------------
# Unquantized formats: raw little-endian bytes, block size 1.


class _FloatFormat(WeightFormat):
    dtype: torch.dtype

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        out = blocks.to(self.dtype)
        if self.dtype != torch.float32 and bool(torch.isinf(out).any()):
            raise QuantizationError(
                f"{self.name}: weights up to {float(blocks.abs().max()):.6g} overflow {self.name}; "
                "keep this tensor in f32"
            )
        return le_bytes(out)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(self.dtype).to(torch.float32)


class F32Format(_FloatFormat):
    """float32, 4 bytes per weight."""

    name = "f32"
    gguf_type = GGMLQuantizationType.F32
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.F32]
    dtype = torch.float32


class F16Format(_FloatFormat):
    """IEEE fp16, round to nearest even from float32."""

    name = "f16"
    gguf_type = GGMLQuantizationType.F16
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.F16]
    dtype = torch.float16


class BF16Format(_FloatFormat):
    """bfloat16, round to nearest even from float32 (ggml_compute_fp32_to_bf16)."""

    name = "bf16"
    gguf_type = GGMLQuantizationType.BF16
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.BF16]
    dtype = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Legacy quants: blocks of 32 weights.


class Q8_0Format(WeightFormat):
    """Q8_0, 34 bytes per 32 weights: d fp16 (2 bytes) | qs int8 (32). w = d * q, d = absmax / 127."""

    name = "q8_0"
    gguf_type = GGMLQuantizationType.Q8_0
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    scale_offset = 0

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127  # (n, 1)
        q = round_half_away(blocks * safe_reciprocal(d)).to(torch.int8)  # (n, 32) in -127..127
        return torch.cat([_to_fp16_bytes(d, self.name, "scale"), q.view(torch.uint8)], dim=-1)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = fp16_field(blocks, self.scale_offset)
        q = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
        return q * d


class Q4_0Format(WeightFormat):
    """Q4_0, 18 bytes per 32 weights: d fp16 (2) | qs (16) with weights 0..15 in the low nibbles
    and 16..31 in the high nibbles. w = d * (q - 8), d = -(signed value of largest magnitude) / 8."""

    name = "q4_0"
    gguf_type = GGMLQuantizationType.Q4_0
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    scale_offset = 0

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        # ggml keeps the sign of the first element of largest magnitude, so it maps to code 0 exactly;
        # in an all-zero block its loop never updates `max` from its initial +0.0, so d is -0.0.
        imax = blocks.abs().argmax(dim=-1, keepdim=True)
        peak = blocks.gather(-1, imax)  # (n, 1)
        d = torch.where(peak == 0, torch.zeros_like(peak), peak) / -8
        # x * id + 8.5 >= 0, so floor is ggml's truncation (and cheaper than torch.trunc).
        q = (blocks * safe_reciprocal(d)).add_(8.5).floor_().to(torch.uint8).clamp_(max=15)
        return torch.cat([_to_fp16_bytes(d, self.name, "scale"), pack_nibbles(q)], dim=-1)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = fp16_field(blocks, self.scale_offset)
        q = _unpack_nibbles(blocks[:, 2:]).to(torch.float32) - 8
        return d * q


class Q4_1Format(WeightFormat):
    """Q4_1, 20 bytes per 32 weights: d fp16 (2) | m fp16 (2) | qs (16), nibbles as Q4_0.
    w = d * q + m, d = (max - min) / 15, m = min."""

    name = "q4_1"
    gguf_type = GGMLQuantizationType.Q4_1
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_1]
    scale_offset, min_offset = 0, 2

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        lo = first_extreme(blocks, blocks.amin(dim=-1, keepdim=True), torch.argmin)
        hi = first_extreme(blocks, blocks.amax(dim=-1, keepdim=True), torch.argmax)
        d = (hi - lo) / 15
        q = (blocks - lo).mul_(safe_reciprocal(d)).add_(0.5).floor_().to(torch.uint8).clamp_(max=15)
        d_bytes = _to_fp16_bytes(d, self.name, "scale")
        m_bytes = _to_fp16_bytes(lo, self.name, "minimum")
        return torch.cat([d_bytes, m_bytes, pack_nibbles(q)], dim=-1)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = fp16_field(blocks, self.scale_offset)
        m = fp16_field(blocks, self.min_offset)
        q = _unpack_nibbles(blocks[:, 4:]).to(torch.float32)
        return (d * q) + m


# ---------------------------------------------------------------------------------------------
# K-quants: super-blocks of QK_K = 256 weights, read-only.


class _KQuantFormat(WeightFormat):
    can_quantize = False

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        # quantize() refuses read-only formats before it gets here.
        raise QuantizationError(f"{self.name} is read-only in kilnlm")


class Q2_KFormat(_KQuantFormat):
    """Q2_K, 84 bytes per 256: scales (16; low nibble scale, high nibble min, per 16 weights) |
    qs (64; 2-bit codes) | d fp16 | dmin fp16. w = d * sc * q - dmin * m."""

    name = "q2_k"
    gguf_type = GGMLQuantizationType.Q2_K
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K]

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        scales = blocks[:, : QK_K // 16]
        qs = blocks[:, QK_K // 16 : QK_K // 16 + QK_K // 4]
        d = fp16_field(blocks, QK_K // 16 + QK_K // 4)
        dmin = fp16_field(blocks, QK_K // 16 + QK_K // 4 + 2)
        dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
        ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
        # Two halves of 128 weights; each half's 32 bytes hold 4 groups of 32 codes at bit 0, 2, 4, 6.
        q = (qs.reshape(n, 2, 1, 32) >> _shifts(blocks.device, (0, 2, 4, 6), (1, 1, 4, 1))) & 3
        q = q.reshape(n, 16, 16).to(torch.float32)
        return ((dl * q) - ml).reshape(n, QK_K)


class Q3_KFormat(_KQuantFormat):
    """Q3_K, 110 bytes per 256: hmask (32; high bit, set = no -4 offset) | qs (64; low 2 bits) |
    scales (12; sixteen 6-bit scales, biased by 32) | d fp16. w = d * (sc - 32) * q, q in -4..3."""

    name = "q3_k"
    gguf_type = GGMLQuantizationType.Q3_K
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q3_K]

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        dev = blocks.device
        hmask = blocks[:, : QK_K // 8]
        qs = blocks[:, QK_K // 8 : QK_K // 8 + QK_K // 4]
        packed_scales = blocks[:, QK_K // 8 + QK_K // 4 : QK_K // 8 + QK_K // 4 + 12]
        d = fp16_field(blocks, QK_K // 8 + QK_K // 4 + 12)
        # Bytes 0..7 hold the low 4 bits of scales 0..7 (low nibble) and 8..15 (high nibble);
        # bytes 8..11 hold the high 2 bits: scale 4*i + j at bits 2i of byte 8 + j.
        low = _unpack_nibbles(packed_scales[:, :8])  # (n, 16)
        high = (packed_scales[:, 8:].reshape(n, 1, 4) >> _shifts(dev, (0, 2, 4, 6), (1, 4, 1))).reshape(n, 16)
        sc = ((low & 0x0F) | ((high & 3) << 4)).to(torch.float32) - 32
        dl = (d * sc).reshape(n, 16, 1)
        ql = (qs.reshape(n, 2, 1, 32) >> _shifts(dev, (0, 2, 4, 6), (1, 1, 4, 1))).reshape(n, 16, 16) & 3
        qh = (hmask.reshape(n, 1, 1, 32) >> _shifts(dev, tuple(range(8)), (1, 1, 8, 1))).reshape(n, 16, 16) & 1
        q = ql.to(torch.float32) - ((qh ^ 1) << 2).to(torch.float32)
        return (dl * q).reshape(n, QK_K)


def _k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes (n, 12) -> 6-bit scales (n, 8) and mins (n, 8), as uint8.

    Bytes 0..3: scales 0..3 (low 6 bits), high 2 bits of scales 4..7; bytes 4..7: the same for
    mins; bytes 8..11: low 4 bits of scale 4..7 (low nibble) and of min 4..7 (high nibble).
    """
    sc_lo, m_lo, mixed = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([sc_lo & 0x3F, (mixed & 0x0F) | ((sc_lo >> 2) & 0x30)], dim=-1)
    m = torch.cat([m_lo & 0x3F, (mixed >> 4) | ((m_lo >> 2) & 0x30)], dim=-1)
    return sc, m


class Q4_KFormat(_KQuantFormat):
    """Q4_K, 144 bytes per 256: d fp16 | dmin fp16 | scales (12; 8 six-bit scales and mins) |
    qs (128; per 64 weights, 32 bytes: first 32 in low nibbles, next 32 in high). w = d*sc*q - dmin*m."""

    name = "q4_k"
    gguf_type = GGMLQuantizationType.Q4_K
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, dmin = fp16_field(blocks, 0), fp16_field(blocks, 2)
        sc, m = _k_scale_min(blocks[:, 4:16])
        dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
        ml = (dmin * m.to(torch.float32)).reshape(n, 8, 1)
        qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> _shifts(blocks.device, (0, 4), (1, 1, 2, 1))
        q = (qs & 0x0F).reshape(n, 8, 32).to(torch.float32)
        return ((dl * q) - ml).reshape(n, QK_K)


class Q5_KFormat(_KQuantFormat):
    """Q5_K, 176 bytes per 256: d fp16 | dmin fp16 | scales (12, as Q4_K) | qh (32; bit j of byte l
    is the 5th bit of weight 32*j + l) | qs (128, as Q4_K). w = d*sc*q - dmin*m."""

    name = "q5_k"
    gguf_type = GGMLQuantizationType.Q5_K
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_K]

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        dev = blocks.device
        d, dmin = fp16_field(blocks, 0), fp16_field(blocks, 2)
        sc, m = _k_scale_min(blocks[:, 4:16])
        dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
        ml = (dmin * m.to(torch.float32)).reshape(n, 8, 1)
        qh = blocks[:, 16:48]
        qs = blocks[:, 48:]
        ql = ((qs.reshape(n, 4, 1, 32) >> _shifts(dev, (0, 4), (1, 1, 2, 1))) & 0x0F).reshape(n, 8, 32)
        qh = ((qh.reshape(n, 1, 1, 32) >> _shifts(dev, tuple(range(8)), (1, 1, 8, 1))) & 1).reshape(n, 8, 32)
        q = (ql | (qh << 4)).to(torch.float32)
        return ((dl * q) - ml).reshape(n, QK_K)


class Q6_KFormat(_KQuantFormat):
    """Q6_K, 210 bytes per 256: ql (128; low 4 bits) | qh (64; high 2 bits) | scales (16, int8) |
    d fp16. w = d * sc * (q - 32)."""

    name = "q6_k"
    gguf_type = GGMLQuantizationType.Q6_K
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K]

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        dev = blocks.device
        ql = blocks[:, : QK_K // 2]
        qh = blocks[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
        sc = blocks[:, QK_K // 2 + QK_K // 4 : QK_K // 2 + QK_K // 4 + QK_K // 16].contiguous().view(torch.int8)
        d = fp16_field(blocks, QK_K // 2 + QK_K // 4 + QK_K // 16)
        dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)
        # Per half of 128 weights: 64 ql bytes (low nibbles = weights 0..63, high = 64..127) and
        # 32 qh bytes (bits 2i..2i+1 = high bits of weights 32i..32i+31).
        lo = ((ql.reshape(n, 2, 1, 64) >> _shifts(dev, (0, 4), (1, 1, 2, 1))) & 0x0F).reshape(n, 8, 32)
        hi = ((qh.reshape(n, 2, 1, 32) >> _shifts(dev, (0, 2, 4, 6), (1, 1, 4, 1))) & 3).reshape(n, 8, 32)
        q = ((lo | (hi << 4)).to(torch.float32) - 32).reshape(n, 16, 16)
        return (dl * q).reshape(n, QK_K)


class _IntegerFormat(WeightFormat):
    """Integers stored raw (GGUF I8 / I32): LLM.int8's codes and outlier indices. 'Quantizing' accepts only
    floats that already hold integers in range, so nothing is silently rounded."""

    dtype: torch.dtype

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        info = torch.iinfo(self.dtype)
        if bool((blocks != blocks.round()).any()) or bool(((blocks < info.min) | (blocks > info.max)).any()):
            raise QuantizationError(f"{self.name}: values must be integers in [{info.min}, {info.max}]")
        return le_bytes(blocks.to(self.dtype))

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(self.dtype).to(torch.float32)


class I8Format(_IntegerFormat):
    """int8 values, 1 byte each."""

    name = "i8"
    gguf_type = GGMLQuantizationType.I8
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.I8]
    dtype = torch.int8


class I32Format(_IntegerFormat):
    """int32 values, 4 bytes each, little-endian."""

    name = "i32"
    gguf_type = GGMLQuantizationType.I32
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.I32]
    dtype = torch.int32


F32 = register(F32Format())
F16 = register(F16Format())
BF16 = register(BF16Format())
Q8_0 = register(Q8_0Format())
Q4_0 = register(Q4_0Format())
Q4_1 = register(Q4_1Format())
Q2_K = register(Q2_KFormat())
Q3_K = register(Q3_KFormat())
Q4_K = register(Q4_KFormat())
Q5_K = register(Q5_KFormat())
Q6_K = register(Q6_KFormat())
I8 = register(I8Format())
I32 = register(I32Format())
