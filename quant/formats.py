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
K-quants (Q2_K..Q6_K) are quantized as ggml's quantize_row_*_ref, bit for bit (their scale searches are in
quant/kquant_search.py).
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
from kilnlm.quant.kquant_search import (
    GROUP_MAX_EPS,
    f32,
    first_abs_max,
    make_q3_quants,
    make_qkx2_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    over,
    sequential_sum,
)

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
    "Q5_0",
    "Q5_1",
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
    uses_importance = False  # whether llama.cpp weights this format's rounding by an importance matrix
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

    def quantize(self, weights: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """Pack float weights (..., cols) into uint8 (..., cols // block_size * bytes_per_block).

        `importance` (cols,) is an importance-matrix entry (the mean square of each input column's activations,
        quant/imatrix.py): formats llama.cpp weights by one (`uses_importance`) choose their scales and codes
        as llama-quantize --imatrix does; the others ignore it, as llama.cpp does."""
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            kind = weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise QuantizationError(f"{self.name}: expected a floating-point torch.Tensor, got {kind}")
        out_shape = self.packed_shape(weights.shape)
        w = weights.detach().to(torch.float32).contiguous()
        check_finite(w, self.name)
        blocks = w.reshape(-1, self.block_size)
        packed = torch.empty((blocks.shape[0], self.bytes_per_block), dtype=torch.uint8, device=w.device)
        if importance is not None and self.uses_importance:
            self._quantize_with_importance(blocks, self._importance_blocks(importance, w.shape[-1]), packed)
            return packed.reshape(out_shape)
        step = max(1, _CHUNK_WEIGHTS // self.block_size)
        for start in range(0, blocks.shape[0], step):
            packed[start : start + step] = self._quantize_blocks(blocks[start : start + step])
        return packed.reshape(out_shape)

    def _importance_blocks(self, importance: torch.Tensor, cols: int) -> torch.Tensor:
        """The importance entry checked and split like one row: float32 (cols // block_size, block_size)."""
        imp = torch.as_tensor(importance, dtype=torch.float32).flatten()
        if imp.numel() != cols:
            raise QuantizationError(f"{self.name}: the importance entry has {imp.numel()} values for {cols} columns; "
                                    "was the importance matrix made for another model?")
        if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
            raise QuantizationError(f"{self.name}: the importance entry holds negative or non-finite values")
        return imp.reshape(-1, self.block_size)

    def _quantize_with_importance(self, blocks: torch.Tensor, importance: torch.Tensor, packed: torch.Tensor) -> None:
        """Fill `packed` from `blocks`, whole rows at a time, each row's blocks weighted by `importance`."""
        per_row = importance.shape[0]
        step = max(1, _CHUNK_WEIGHTS // (per_row * self.block_size)) * per_row
        for start in range(0, blocks.shape[0], step):
            chunk = blocks[start : start + step]
            weights = importance.repeat(chunk.shape[0] // per_row, 1)
            packed[start : start + step] = self._quantize_weighted(chunk, weights, per_row)

    def _quantize_weighted(self, blocks: torch.Tensor, importance: torch.Tensor, per_row: int) -> torch.Tensor:
        """float32 (n_blocks, block_size) with their importance (same shape), whole rows of `per_row` blocks ->
        uint8 (n_blocks, bytes_per_block). Formats with `uses_importance` implement it."""
        raise NotImplementedError(f"{self.name} sets uses_importance but has no _quantize_weighted")

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
    def from_float(cls, weights: torch.Tensor, fmt: WeightFormat | str,
                   importance: torch.Tensor | None = None) -> QuantizedTensor:
        """Quantize `weights` into `fmt` (a format or its registered name), weighted by an importance-matrix
        entry where the format uses one (see WeightFormat.quantize)."""
        fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        return cls(fmt, tuple(weights.shape), fmt.quantize(weights, importance))

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


def _peak_codes(blocks: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 (half 8) and Q5_0 (half 16): d = peak / -half, codes floor(x / d + half + 0.5) up to 2 * half - 1.

    ggml keeps the sign of the first element of largest magnitude, so it maps to code 0 exactly; in an
    all-zero block (even of -0.0s) its loop never updates `max` from its initial +0.0, so d is -0.0.
    Returns (d (n, 1), codes uint8 (n, 32)).
    """
    imax = blocks.abs().argmax(dim=-1, keepdim=True)
    peak = blocks.gather(-1, imax)  # (n, 1)
    d = torch.where(peak == 0, torch.zeros_like(peak), peak) / -half
    # x * id + half + 0.5 >= 0.5, so floor is ggml's truncation (and cheaper than torch.trunc).
    q = (blocks * safe_reciprocal(d)).add_(half + 0.5).floor_().clamp_(max=2 * half - 1).to(torch.uint8)
    return d, q


def _range_codes(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 (15 levels) and Q5_1 (31): d = (max - min) / levels, m = min (the first of equal extremes, as
    ggml's loop finds it), codes floor((x - min) / d + 0.5). Returns (d (n, 1), m (n, 1), codes uint8 (n, 32))."""
    lo = first_extreme(blocks, blocks.amin(dim=-1, keepdim=True), torch.argmin)
    hi = first_extreme(blocks, blocks.amax(dim=-1, keepdim=True), torch.argmax)
    d = (hi - lo) / levels
    q = (blocks - lo).mul_(safe_reciprocal(d)).add_(0.5).floor_().clamp_(max=levels).to(torch.uint8)
    return d, lo, q


def _row_energy_weights(blocks: torch.Tensor, importance: torch.Tensor, per_row: int) -> torch.Tensor:
    """ggml's legacy-format imatrix weights qw * sqrt(sigma2 + x^2), sigma2 being the mean square of the whole row."""
    rows = blocks.reshape(-1, per_row * blocks.shape[1])
    return _energy_weights(blocks, importance, _mean_square(rows).repeat_interleave(per_row))


class Q4_0Format(WeightFormat):
    """Q4_0, 18 bytes per 32 weights: d fp16 (2) | qs (16) with weights 0..15 in the low nibbles
    and 16..31 in the high nibbles. w = d * (q - 8), d = -(signed value of largest magnitude) / 8."""

    name = "q4_0"
    gguf_type = GGMLQuantizationType.Q4_0
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    scale_offset = 0

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, q = _peak_codes(blocks, 8)
        return torch.cat([_to_fp16_bytes(d, self.name, "scale"), pack_nibbles(q)], dim=-1)

    uses_importance = True

    def _quantize_weighted(self, blocks: torch.Tensor, importance: torch.Tensor, per_row: int) -> torch.Tensor:
        """quantize_row_q4_0_impl: codes and scale by make_qx_quants weighted by qw * sqrt(sigma2 + x^2)."""
        codes, d = make_qx_quants(blocks, 8, _row_energy_weights(blocks, importance, per_row))
        return torch.cat([_to_fp16_bytes(d[:, None], self.name, "scale"), pack_nibbles(codes)], dim=-1)

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
        d, lo, q = _range_codes(blocks, 15)
        d_bytes = _to_fp16_bytes(d, self.name, "scale")
        m_bytes = _to_fp16_bytes(lo, self.name, "minimum")
        return torch.cat([d_bytes, m_bytes, pack_nibbles(q)], dim=-1)

    uses_importance = True

    def _quantize_weighted(self, blocks: torch.Tensor, importance: torch.Tensor, per_row: int) -> torch.Tensor:
        """quantize_row_q4_1_impl: a weighted scale-and-min search (make_qkx3_quants)."""
        weights = _row_energy_weights(blocks, importance, per_row)
        codes, d, offset = make_qkx2_quants(blocks, weights, 15, -0.9, f32(0.05), 36, use_mad=False)
        return torch.cat([_to_fp16_bytes(d[:, None], self.name, "scale"),
                          _to_fp16_bytes(-offset[:, None], self.name, "minimum"), pack_nibbles(codes)], dim=-1)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = fp16_field(blocks, self.scale_offset)
        m = fp16_field(blocks, self.min_offset)
        q = _unpack_nibbles(blocks[:, 4:]).to(torch.float32)
        return (d * q) + m


# ---------------------------------------------------------------------------------------------
# Q5_0 / Q5_1: blocks of 32 weights with a fifth bit per weight.


def pack_fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes (n, 32) in 0..31 -> (n, 4): bit j of the little-endian uint32 is code j's bit 4."""
    bits = ((q >> 4) & 1).to(torch.int64) << torch.arange(32, device=q.device)
    return le_bytes(bits.sum(dim=-1, keepdim=True).to(torch.int32))


def _unpack_fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) -> uint8 (n, 32): bit 4 of each code."""
    word = qh.contiguous().view(torch.int32).to(torch.int64)  # (n, 1)
    return (((word >> torch.arange(32, device=qh.device)) & 1) << 4).to(torch.uint8)


class Q5_0Format(WeightFormat):
    """Q5_0, 22 bytes per 32 weights: d fp16 (2) | qh (4; bit j = code j's 5th bit) | qs (16, nibbles as
    Q4_0). w = d * (q - 16), d = -(signed value of largest magnitude) / 16."""

    name = "q5_0"
    gguf_type = GGMLQuantizationType.Q5_0
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_0]
    scale_offset = 0

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, q = _peak_codes(blocks, 16)
        return torch.cat([_to_fp16_bytes(d, self.name, "scale"), pack_fifth_bits(q), pack_nibbles(q & 0x0F)], dim=-1)

    uses_importance = True

    def _quantize_weighted(self, blocks: torch.Tensor, importance: torch.Tensor, per_row: int) -> torch.Tensor:
        """quantize_row_q5_0_impl: codes and scale by make_qx_quants weighted by qw * sqrt(sigma2 + x^2)."""
        q, d = make_qx_quants(blocks, 16, _row_energy_weights(blocks, importance, per_row))
        return torch.cat([_to_fp16_bytes(d[:, None], self.name, "scale"), pack_fifth_bits(q),
                          pack_nibbles(q & 0x0F)], dim=-1)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        q = _unpack_nibbles(blocks[:, 6:]) | _unpack_fifth_bits(blocks[:, 2:6])
        return fp16_field(blocks, 0) * (q.to(torch.float32) - 16)


class Q5_1Format(WeightFormat):
    """Q5_1, 24 bytes per 32 weights: d fp16 | m fp16 | qh (4) | qs (16). w = d * q + m, d = (max - min) / 31."""

    name = "q5_1"
    gguf_type = GGMLQuantizationType.Q5_1
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_1]
    scale_offset, min_offset = 0, 2

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, lo, q = _range_codes(blocks, 31)
        return torch.cat([_to_fp16_bytes(d, self.name, "scale"), _to_fp16_bytes(lo, self.name, "minimum"),
                          pack_fifth_bits(q), pack_nibbles(q & 0x0F)], dim=-1)

    uses_importance = True

    def _quantize_weighted(self, blocks: torch.Tensor, importance: torch.Tensor, per_row: int) -> torch.Tensor:
        """quantize_row_q5_1_impl: a weighted scale-and-min search (make_qkx3_quants)."""
        weights = _row_energy_weights(blocks, importance, per_row)
        q, d, offset = make_qkx2_quants(blocks, weights, 31, -0.9, f32(0.05), 36, use_mad=False)
        return torch.cat([_to_fp16_bytes(d[:, None], self.name, "scale"),
                          _to_fp16_bytes(-offset[:, None], self.name, "minimum"), pack_fifth_bits(q),
                          pack_nibbles(q & 0x0F)], dim=-1)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        q = _unpack_nibbles(blocks[:, 8:]) | _unpack_fifth_bits(blocks[:, 4:8])
        return fp16_field(blocks, 0) * q.to(torch.float32) + fp16_field(blocks, 2)


# ---------------------------------------------------------------------------------------------
# K-quants: super-blocks of QK_K = 256 weights. The quantizers are ggml's quantize_row_*_ref, bit for bit:
# a per-group scale (and min) search (quant/kquant_search.py), the group scales quantized against the
# block's largest, then every code chosen again with the stored (fp16-rounded) scales.


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    """What GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x)) gives."""
    return x.to(torch.float16).to(torch.float32)


def _exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrtf: correctly rounded (torch's float32 sqrt is not always; a float64 root rounded to float32 is)."""
    return torch.sqrt(x.double()).float()


def _energy_weights(x: torch.Tensor, importance: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """ggml's imatrix weights qw * sqrtf(sigma2 + x^2) for groups x (g, k), sigma2 one value per group (g,)."""
    return importance * _exact_sqrt(sigma2[:, None] + x * x)


def _mean_square(blocks: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """scale * (sum of x^2, summed left to right) / width, per row of `blocks` (ggml's sigma2)."""
    return scale * sequential_sum((blocks * blocks).t().contiguous()) / blocks.shape[1]


def _positive_max(values: torch.Tensor) -> torch.Tensor:
    """ggml's `max = 0; if (v > max) max = v` over the last dim: +0.0 when nothing is positive (even -0.0)."""
    peak = values.amax(dim=-1)
    return torch.where(peak > 0, peak, 0)


def _byte(values: torch.Tensor) -> torch.Tensor:
    """C's int -> uint8_t conversion (modulo 256) of int32 values."""
    return (values & 0xFF).to(torch.uint8)


def _pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (n, 256) in 0..3 -> (n, 64): per 128 weights, byte l holds weights l, l+32, l+64, l+96."""
    q = codes.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _requantize(x: torch.Tensor, d: torch.Tensor, offset: torch.Tensor | None, lowest: int, highest: int,
                codes: torch.Tensor) -> torch.Tensor:
    """Codes of groups `x` (g, k) for the stored group scales d (g,) (and mins): nearest_int((x + m) / d)
    clamped; groups whose stored scale is 0 keep the search's codes, as ggml's `if (!d) continue;`."""
    shifted = x if offset is None else x + offset[:, None]
    kept = d == 0
    fresh = nearest_int(shifted / torch.where(kept, 1, d)[:, None]).clamp_(lowest, highest) - lowest
    return torch.where(kept[:, None], codes.to(torch.int32), fresh).to(torch.uint8)


class _KQuantFormat(WeightFormat):
    """A K-quant: 256-weight super-blocks."""


class Q2_KFormat(_KQuantFormat):
    """Q2_K, 84 bytes per 256: scales (16; low nibble scale, high nibble min, per 16 weights) |
    qs (64; 2-bit codes) | d fp16 | dmin fp16. w = d * sc * q - dmin * m."""

    name = "q2_k"
    gguf_type = GGMLQuantizationType.Q2_K
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K]

    uses_importance = True

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        x = blocks.reshape(n * 16, 16)
        codes, scales, mins = make_qkx2_quants(x, x.abs(), 3, -0.5, f32(0.1), 15, use_mad=True)
        scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        has_scale, has_min = (max_scale > 0)[:, None], (max_min > 0)[:, None]
        sc = torch.where(has_scale, nearest_int(over(15, torch.where(has_scale, max_scale[:, None], 1)) * scales), 0)
        m = torch.where(has_min, nearest_int(over(15, torch.where(has_min, max_min[:, None], 1)) * mins), 0)
        d = torch.where(has_scale, max_scale[:, None] / 15, 0)
        dmin = torch.where(has_min, max_min[:, None] / 15, 0)
        return self._pack(x, codes, _byte(sc) | _byte(m << 4), d, dmin)

    def _quantize_weighted(self, blocks: torch.Tensor, importance: torch.Tensor, per_row: int) -> torch.Tensor:
        """quantize_row_q2_K_impl: weights qw * sqrt(sigma2 + x^2), the group scales and mins quantized by
        make_qp_quants against the groups' total weight."""
        n = blocks.shape[0]
        x = blocks.reshape(n * 16, 16)
        weights = _energy_weights(x, importance.reshape(n * 16, 16), _mean_square(blocks).repeat_interleave(16))
        group_weight = sequential_sum(weights.t().contiguous()).reshape(n, 16)
        codes, scales, mins = make_qkx2_quants(x, weights, 3, -0.9, f32(0.05), 36, use_mad=False)
        sc, d = make_qp_quants(scales.reshape(n, 16), 15, group_weight)
        m, dmin = make_qp_quants(mins.reshape(n, 16), 15, group_weight)
        return self._pack(x, codes, sc | (m << 4), d[:, None], dmin[:, None])

    def _pack(self, x: torch.Tensor, codes: torch.Tensor, packed_scales: torch.Tensor, d: torch.Tensor,
              dmin: torch.Tensor) -> torch.Tensor:
        """Choose the codes again for the stored scales and lay the block out."""
        n = packed_scales.shape[0]
        group_d = (_fp16_round(d) * (packed_scales & 0x0F).to(torch.float32)).reshape(-1)
        group_m = (_fp16_round(dmin) * (packed_scales >> 4).to(torch.float32)).reshape(-1)
        codes = _requantize(x, group_d, group_m, 0, 3, codes).reshape(n, QK_K)
        return torch.cat([packed_scales, _pack_2bit(codes), _to_fp16_bytes(d, self.name, "scale"),
                          _to_fp16_bytes(dmin, self.name, "minimum")], dim=-1)

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

    uses_importance = True

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        x = blocks.reshape(n * 16, 16)
        codes, scales = make_q3_quants(x, 4)
        scales = scales.reshape(n, 16)
        _, max_scale = first_abs_max(scales)
        has_scale = (max_scale != 0)[:, None]
        iscale = over(-32, torch.where(has_scale, max_scale[:, None], 1))
        biased = torch.where(has_scale, nearest_int(iscale * scales).clamp_(-32, 31) + 32, 0)  # (n, 16) 0..63
        return self._pack(x, codes, biased, torch.where(has_scale, over(1, iscale), 0))

    def _quantize_weighted(self, blocks: torch.Tensor, importance: torch.Tensor, per_row: int) -> torch.Tensor:
        """quantize_row_q3_K_impl: weights qw * sqrt(sigma2 + x^2); the sixteen group scales quantized by
        make_qx_quants against the groups' total weight."""
        n = blocks.shape[0]
        x = blocks.reshape(n * 16, 16)
        weights = _energy_weights(x, importance.reshape(n * 16, 16), _mean_square(blocks, 2).repeat_interleave(16))
        group_weight = sequential_sum(weights.t().contiguous()).reshape(n, 16)
        codes, scales = make_qx_quants(x, 4, weights)
        biased, d = make_qx_quants(scales.reshape(n, 16), 32, group_weight)
        return self._pack(x, codes, biased.to(torch.int32), d[:, None])

    def _pack(self, x: torch.Tensor, codes: torch.Tensor, biased: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Choose the codes again for the stored scales (`biased`: scale + 32) and lay the block out."""
        n = biased.shape[0]
        group_d = (_fp16_round(d) * (biased - 32).to(torch.float32)).reshape(-1)
        codes = _requantize(x, group_d, None, -4, 3, codes).reshape(n, QK_K)
        high = codes > 3
        hmask = (high.reshape(n, 8, 32).to(torch.int32) << torch.arange(8).reshape(1, 8, 1)).sum(1).to(torch.uint8)
        low = torch.where(high, codes - 4, codes)
        return torch.cat([hmask, _pack_2bit(low), self._pack_scales(biased), _to_fp16_bytes(d, self.name, "scale")],
                         dim=-1)

    @staticmethod
    def _pack_scales(biased: torch.Tensor) -> torch.Tensor:
        """Sixteen 6-bit values (n, 16) -> 12 bytes: low nibbles of 0..7 and 8..15, then the high 2 bits of
        value j at bit 2 * (j // 4) of byte 8 + j % 4."""
        b = biased.to(torch.uint8)
        low = (b[:, :8] & 0x0F) | ((b[:, 8:] & 0x0F) << 4)
        high = ((b >> 4).reshape(-1, 4, 4) << _shifts(b.device, (0, 2, 4, 6), (1, 4, 1))).sum(1).to(torch.uint8)
        return torch.cat([low, high], dim=-1)

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


def _pack_k_scale_min(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The inverse of _k_scale_min: 6-bit scales and mins (n, 8) -> 12 bytes."""
    first = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6)], dim=-1)
    return torch.cat([first, (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)], dim=-1)


class _ScaleMinKFormat(_KQuantFormat):
    """Q4_K and Q5_K: eight groups of 32 with a 6-bit scale and a 6-bit min each, searched by make_qkx2_quants
    with weights mean|x| + |x|."""

    nmax: int
    search: tuple[float, float, int]  # rmin, rdelta, nstep

    uses_importance = True

    def _scale_min_codes(self, blocks: torch.Tensor, importance: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (d, dmin) fp16-ready (n, 1), the 12 scale bytes (n, 12), codes (n, 256) in 0..nmax; with an
        `importance` (n, 256) as quantize_row_q4_K_impl / q5_K_impl, else as quantize_row_q4_K_ref / q5_K_ref."""
        n = blocks.shape[0]
        x = blocks.reshape(n * 8, 32)
        if importance is None:
            weights = _exact_sqrt(_mean_square(x))[:, None] + x.abs()
            codes, scales, mins = make_qkx2_quants(x, weights, self.nmax, *self.search, use_mad=False)
            sc, m, d, dmin = self._scales_against_largest(scales.reshape(n, 8), mins.reshape(n, 8))
        else:
            weights = _energy_weights(x, importance.reshape(n * 8, 32), _mean_square(blocks, 2).repeat_interleave(8))
            group_weight = sequential_sum(weights.t().contiguous()).reshape(n, 8)
            codes, scales, mins = make_qkx2_quants(x, weights, self.nmax, -0.9, f32(0.05), 36, use_mad=False)
            sc, d = make_qp_quants(scales.reshape(n, 8), 63, group_weight)
            m, dmin = make_qp_quants(mins.reshape(n, 8), 63, group_weight)
            d, dmin = d[:, None], dmin[:, None]
        group_d = (_fp16_round(d) * sc.to(torch.float32)).reshape(-1)
        group_m = (_fp16_round(dmin) * m.to(torch.float32)).reshape(-1)
        codes = _requantize(x, group_d, group_m, 0, self.nmax, codes).reshape(n, QK_K)
        return d, dmin, _pack_k_scale_min(sc, m), codes

    @staticmethod
    def _scales_against_largest(scales: torch.Tensor, mins: torch.Tensor):
        """6-bit group scales and mins as fractions of the block's largest: (sc, m) uint8 (n, 8), (d, dmin) (n, 1)."""
        max_scale, max_min = _positive_max(scales)[:, None], _positive_max(mins)[:, None]
        inv_scale = torch.where(max_scale > 0, over(63, torch.where(max_scale > 0, max_scale, 1)), 0)
        inv_min = torch.where(max_min > 0, over(63, torch.where(max_min > 0, max_min, 1)), 0)
        sc = _byte(nearest_int(inv_scale * scales)).clamp_(max=63)
        m = _byte(nearest_int(inv_min * mins)).clamp_(max=63)
        return sc, m, max_scale / 63, max_min / 63

    def _quantize_weighted(self, blocks: torch.Tensor, importance: torch.Tensor, per_row: int) -> torch.Tensor:
        return self._layout(*self._scale_min_codes(blocks, importance))

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return self._layout(*self._scale_min_codes(blocks))

    @abstractmethod
    def _layout(self, d: torch.Tensor | None, dmin: torch.Tensor | None, scales: torch.Tensor, codes: torch.Tensor,
                head: torch.Tensor | None = None) -> torch.Tensor:
        """The block's bytes from its scales d, dmin (n, 1) (or `head`, their 4 stored bytes), its 12 scale bytes
        and its codes (n, 256)."""

    # GPTQ on this grid (quant/gptq.py) keeps a block's scales and chooses its codes itself.
    code_group = 32  # weights per group scale

    @property
    def code_limits(self) -> tuple[int, int]:
        """The lowest and highest code."""
        return 0, self.nmax

    def group_affine(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(D, M) float32 (n, 8): every weight of group j is D * code + M, bit for bit as _dequantize_blocks."""
        sc, m = _k_scale_min(blocks[:, 4:16])
        return fp16_field(blocks, 0) * sc.to(torch.float32), -(fp16_field(blocks, 2) * m.to(torch.float32))

    def with_codes(self, blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """`blocks` with their codes replaced by `codes` (n, 256) uint8 in 0..nmax, the scales kept."""
        return self._layout(None, None, blocks[:, 4:16], codes, head=blocks[:, :4])


class Q4_KFormat(_ScaleMinKFormat):
    """Q4_K, 144 bytes per 256: d fp16 | dmin fp16 | scales (12; 8 six-bit scales and mins) |
    qs (128; per 64 weights, 32 bytes: first 32 in low nibbles, next 32 in high). w = d*sc*q - dmin*m."""

    name = "q4_k"
    gguf_type = GGMLQuantizationType.Q4_K
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
    nmax, search = 15, (-1.0, f32(0.1), 20)

    def _layout(self, d: torch.Tensor | None, dmin: torch.Tensor | None, scales: torch.Tensor, codes: torch.Tensor,
                head: torch.Tensor | None = None) -> torch.Tensor:
        q = codes.reshape(-1, 4, 2, 32)
        head = head if head is not None else torch.cat([_to_fp16_bytes(d, self.name, "scale"),
                                                        _to_fp16_bytes(dmin, self.name, "minimum")], dim=-1)
        return torch.cat([head, scales, (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)], dim=-1)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, dmin = fp16_field(blocks, 0), fp16_field(blocks, 2)
        sc, m = _k_scale_min(blocks[:, 4:16])
        dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
        ml = (dmin * m.to(torch.float32)).reshape(n, 8, 1)
        qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> _shifts(blocks.device, (0, 4), (1, 1, 2, 1))
        q = (qs & 0x0F).reshape(n, 8, 32).to(torch.float32)
        return ((dl * q) - ml).reshape(n, QK_K)


class Q5_KFormat(_ScaleMinKFormat):
    """Q5_K, 176 bytes per 256: d fp16 | dmin fp16 | scales (12, as Q4_K) | qh (32; bit j of byte l
    is the 5th bit of weight 32*j + l) | qs (128, as Q4_K). w = d*sc*q - dmin*m."""

    name = "q5_k"
    gguf_type = GGMLQuantizationType.Q5_K
    block_size, bytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_K]
    nmax, search = 31, (-0.5, f32(0.1), 15)

    def _layout(self, d: torch.Tensor | None, dmin: torch.Tensor | None, scales: torch.Tensor, codes: torch.Tensor,
                head: torch.Tensor | None = None) -> torch.Tensor:
        groups = codes.reshape(-1, 8, 32)
        qh = (((groups >> 4) & 1).to(torch.int32) << torch.arange(8).reshape(1, 8, 1)).sum(1).to(torch.uint8)
        q = (groups & 0x0F).reshape(-1, 4, 2, 32)
        head = head if head is not None else torch.cat([_to_fp16_bytes(d, self.name, "scale"),
                                                        _to_fp16_bytes(dmin, self.name, "minimum")], dim=-1)
        return torch.cat([head, scales, qh, (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)], dim=-1)

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

    uses_importance = True

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return self._quantize(blocks, None)

    def _quantize_weighted(self, blocks: torch.Tensor, importance: torch.Tensor, per_row: int) -> torch.Tensor:
        """quantize_row_q6_K_impl: the group searches weighted by the importance itself."""
        return self._quantize(blocks, importance.reshape(-1, 16))

    def _quantize(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        n = blocks.shape[0]
        x = blocks.reshape(n * 16, 16)
        codes, scales = make_qx_quants(x, 32, importance)
        scales = scales.reshape(n, 16)
        max_abs, max_scale = first_abs_max(scales)
        live = (max_abs >= GROUP_MAX_EPS)[:, None]  # ggml writes an all-zero block otherwise
        iscale = over(-128, torch.where(live, max_scale[:, None], 1))
        sc = torch.where(live, nearest_int(iscale * scales).clamp_(max=127), 0)  # int8 values
        d = torch.where(live, over(1, iscale), 0)
        group_d = (_fp16_round(d) * sc.to(torch.float32)).reshape(-1)
        codes = _requantize(x, group_d, None, -32, 31, codes).reshape(n, QK_K)
        codes = torch.where(live, codes, 0)
        return torch.cat([self._pack_codes(codes), sc.to(torch.int8).view(torch.uint8),
                          _to_fp16_bytes(d, self.name, "scale")], dim=-1)

    @staticmethod
    def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes (n, 256) in 0..63 -> ql (128) | qh (64) bytes."""
        q = codes.reshape(-1, 2, 4, 32)
        low, high = q & 0x0F, q >> 4
        ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=-1)
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        return torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64)], dim=-1)

    # GPTQ on this grid (quant/gptq.py) keeps a block's scales and chooses its codes itself.
    code_group = 16
    code_limits = (-32, 31)

    def group_affine(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(D, None), D float32 (n, 16): every weight of group j is D * (code - 32), bit for bit."""
        sc = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        return fp16_field(blocks, 208) * sc, None

    def with_codes(self, blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """`blocks` with their codes replaced by `codes` (n, 256) uint8 in 0..63 (code - 32 the signed value)."""
        return torch.cat([self._pack_codes(codes), blocks[:, 192:]], dim=-1)

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
Q5_0 = register(Q5_0Format())
Q5_1 = register(Q5_1Format())
Q2_K = register(Q2_KFormat())
Q3_K = register(Q3_KFormat())
Q4_K = register(Q4_KFormat())
Q5_K = register(Q5_KFormat())
Q6_K = register(Q6_KFormat())
I8 = register(I8Format())
I32 = register(I32Format())
