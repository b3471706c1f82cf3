"""GPTQ (Frantar et al., 2022) on ggml's grids: the output packs into Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 blocks bit
for bit (and, with `gptq_quantize_k`, into Q4_K / Q5_K / Q6_K super-blocks).

The algorithm follows the IST-DASLab reference `gptq.py` and the paper's notation: H = 2/n Σ xᵀx, dead
columns, `percdamp` dampening, Hinv = upper Cholesky factor of H⁻¹, lazy batch updates over blocks of
`blocksize` columns (W1, Q1, Err1, Hinv1), one column at a time inside a block, all rows at once.

What differs from the reference is the quantization grid. A GPTQ group is a ggml block: 32 consecutive
input columns of one row share one fp16 scale d (and, for Q4_1, one fp16 minimum m):

* Q4_0 (symmetric): d = peak / -8 with peak the signed weight of largest magnitude;
  code = clamp(floor(w / d + 8.5), 0, 15), value = d * (code - 8).
* Q4_1 (asymmetric): d = (max - min) / 15, m = min; code = clamp(floor((w - min) / d + 0.5), 0, 15),
  value = d * code + m.
* Q8_0 (symmetric): d = absmax / 127; code = clamp(round_half_away(w / d), -127, 127), value = code * d.
* Q5_0 / Q5_1: as Q4_0 / Q4_1 with 32 levels (d = peak / -16, codes 0..31 around 16; d = (max - min) / 31).

Codes are assigned exactly as ggml's `quantize_row_*_ref` assigns them (with the float32 reciprocal of
the unrounded scale and float32 minimum), and values are computed exactly as the registry dequantises
them (with the fp16-rounded scale and minimum). So the Q that GPTQ feeds its error back from is the
value the file will hold, and with a diagonal Hessian (no error feedback) GPTQ reproduces ggml's RTN
bytes exactly. Codes are clamped to the codes ggml's own quantisers produce (Q8_0 never -128).

Group parameters. Without act-order a group's scale is computed when GPTQ reaches the group's first
column, from the group's CURRENT weights (every earlier column's error already fed back). The reference
reads the outer W there, which misses the updates made earlier in the same lazy block; we read W1, the
up-to-date weights (so `blocksize` must be a multiple of 32, which keeps each group inside one block).
With act-order the parameters of every group are computed up front from the original weights in their
original order (the reference's `static_groups=True`), so each ggml block keeps one scale while its
columns are visited in order of decreasing diag(H).

Scale search (`scale_search=True`): for each block, the candidates are ggml's own parameters plus
shrunk ranges (factors in `SEARCH_FACTORS`, 0.975 down to 0.8): Q8_0 d = f·absmax/127; Q4_0 d = f·peak/-8
and the opposite sign convention d = f·peak/7 (the peak on code 15 instead of code 0); Q4_1 the range
[min, max] shrunk by f about its midpoint. Each candidate quantizes the block's weights (the current
ones, or with act-order the original ones) and the block keeps the candidate minimising
Σ_j H_jj (w_j - q_j)², with H after dead-column repair and before dampening; ties keep ggml's choice.
With a diagonal Hessian this objective is the exact output error, so the search can never lose to RTN.
With a full Hessian it is a proxy that ignores the error feedback (on Q8_0 it can lose), so
`scale_search=True` also runs GPTQ without the search and keeps whichever has the lower
`hessian_error`: the option never makes a layer worse on its calibration data, for twice the time.

Packing builds the uint8 blocks directly from codes and fp16 parameters. Re-quantizing the dequantized
matrix with the registry would not be exact: after error feedback a block's extreme weight is not
necessarily on the end of its grid, so ggml's scale rule would pick a different scale. The packed bytes
are checked against the registry: its dequantisation must equal GPTQ's Q bit for bit.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gguf.constants import QK_K

from kilnlm.quant.formats import (
    QuantizationError,
    QuantizedTensor,
    WeightFormat,
    first_extreme,
    le_bytes,
    pack_fifth_bits,
    pack_nibbles,
    round_half_away,
    safe_reciprocal,
    get_format,
)

__all__ = [
    "SEARCH_FACTORS",
    "HessianAccumulator",
    "GPTQResult",
    "gptq_solve",
    "gptq_quantize",
    "gptq_quantize_k",
    "rtn_quantize",
    "hessian_error",
]

GROUP = 32  # ggml's block of the legacy quants = GPTQ's group size
SEARCH_FACTORS = (0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8)  # range shrink tried by scale_search


class HessianAccumulator:
    """Running H = 2/n Σ x̃ᵀx̃ (float32) over calibration inputs x̃ of shape (..., in_features).

    n counts input vectors (tokens), so H is the same however the calibration set is batched. (The
    reference counts the leading batch dimension of each call instead; H's scale does not change GPTQ's
    result, only the magnitude of `hessian_error`.)

    With `float_targets` it also keeps the cross term C = 2/n Σ x̃ᵀx, where x is the same position's input
    in the float model while x̃ is its input in the partly quantized model: `target_weight` needs both.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, *, float_targets: bool = False):
        self.in_features = int(in_features)
        self.nsamples = 0
        self.float_targets = float_targets
        self._device = torch.device(device) if device is not None else None
        self._hessian: torch.Tensor | None = None
        self._cross: torch.Tensor | None = None

    @property
    def hessian(self) -> torch.Tensor:
        """H, float32 (in_features, in_features); zeros before the first batch."""
        if self._hessian is None:
            self._hessian = self._zeros()
        return self._hessian

    @property
    def cross(self) -> torch.Tensor:
        """C = 2/n Σ x̃ᵀx, float32 (in_features, in_features); only with `float_targets`."""
        if not self.float_targets:
            raise QuantizationError("internal error: the cross term needs HessianAccumulator(float_targets=True)")
        if self._cross is None:
            self._cross = self._zeros()
        return self._cross

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self._device)

    def add_batch(self, inp: torch.Tensor, float_inp: torch.Tensor | None = None) -> None:
        """Fold a batch of layer inputs (..., in_features), and the float model's inputs if tracked, into the means."""
        if (float_inp is not None) != self.float_targets:
            raise QuantizationError("internal error: float inputs are given exactly when float_targets is set")
        x = self._flat(inp)
        if x.shape[0] == 0:
            return
        xf = self._flat(float_inp) if float_inp is not None else None
        if xf is not None and xf.shape != x.shape:
            raise QuantizationError(f"GPTQ calibration: float inputs {tuple(xf.shape)} do not match {tuple(x.shape)}")
        tmp = x.shape[0]
        decay = self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        factor = 2 / self.nsamples
        H = self.hessian
        H *= decay
        H += factor * x.t().matmul(x)
        if xf is not None:
            C = self.cross
            C *= decay
            C += factor * x.t().matmul(xf)

    def _flat(self, inp: torch.Tensor) -> torch.Tensor:
        if inp.ndim == 0 or inp.shape[-1] != self.in_features:
            raise QuantizationError(
                f"GPTQ calibration: a layer with {self.in_features} input features got an input of shape "
                f"{tuple(inp.shape)}; the last dimension must be {self.in_features}"
            )
        if self._hessian is None and self._device is None:
            self._device = inp.device  # the statistics live where the activations are
        return inp.detach().reshape(-1, self.in_features).to(device=self._device, dtype=torch.float32)

    def target_weight(self, weight: torch.Tensor, percdamp: float) -> torch.Tensor:
        """W* = argmin ||xWᵀ - x̃W*ᵀ||² + λ||W* - W||²: the weight whose output on the quantized model's inputs x̃
        best reproduces the float layer's output on the float model's inputs x (float32, weight's shape).

        GPTQ on W* with H minimises ||xWᵀ - x̃Ŵᵀ||² (the two differ by a constant), so each layer also undoes
        the error that the quantized layers before it left in its inputs: the asymmetric calibration of
        GPTAQ (Li et al., 2025), solved here as a least-squares target. The ridge λ = percdamp·mean(diag H)
        pulls W* toward W where the inputs do not determine it (dead or collinear features).
        """
        H = self.hessian.double()
        damp = percdamp * float(torch.diag(H).mean())
        if not damp > 0:
            raise QuantizationError("GPTQ float targets need percdamp > 0 and some calibration inputs")
        W = weight.detach().to(device=H.device, dtype=torch.float64)
        lhs = H + damp * torch.eye(self.in_features, dtype=H.dtype, device=H.device)
        rhs = W.matmul(self.cross.double().t()) + damp * W  # (rows, cols)
        L, info = torch.linalg.cholesky_ex(lhs)
        if int(info) != 0:
            raise QuantizationError("GPTQ float targets: the dampened Hessian is not positive definite; raise percdamp")
        return torch.cholesky_solve(rhs.t(), L).t().to(torch.float32)


# ---------------------------------------------------------------------------------------------
# ggml grids: group parameters, code assignment and values, exactly as quant/formats.py computes them.


class _Grid(ABC):
    """One ggml legacy format's grid. Parameters are (rows, 1) float32 columns; candidates (C, rows, 1)."""

    name: str
    has_min: bool = False

    @abstractmethod
    def candidates(self, G: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Unrounded (d, lo) candidates for blocks G (rows, 32), each (C, rows, 1); index 0 is ggml's."""

    @abstractmethod
    def encode(self, w: torch.Tensor, inv: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        """Codes (float32) of weights w given the float32 reciprocal scale and minimum."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Values of codes given the fp16-rounded scale and minimum (as float32)."""

    @abstractmethod
    def pack(self, codes: torch.Tensor, d16: torch.Tensor, m16: torch.Tensor) -> torch.Tensor:
        """ggml blocks uint8 (n, bytes_per_block) from codes (n, 32) and fp16 parameters (n, 1)."""


class _Q4_0Grid(_Grid):
    name = "q4_0"
    half = 8  # codes 0 .. 2 * half - 1 around half

    def candidates(self, G, search):
        imax = G.abs().argmax(dim=-1, keepdim=True)
        peak = G.gather(-1, imax)  # (rows, 1), signed
        peak = torch.where(peak == 0, torch.zeros_like(peak), peak)  # ggml's all-zero block: d = -0.0
        d = [peak / -self.half]
        if search:
            d += [(peak * f) / -self.half for f in SEARCH_FACTORS]
            # the peak on the top code (+half - 1) instead of the bottom one (-half)
            d += [(peak * f) / (self.half - 1) for f in (1.0, *SEARCH_FACTORS)]
        d = torch.stack(d)
        return d, torch.zeros_like(d)

    def encode(self, w, inv, lo):
        # Mirrors Q4_0Format / Q5_0Format: (x * id + half + 0.5) floored; clamped because fed-back weights can
        # leave the range.
        return (w * inv).add_(self.half + 0.5).floor_().clamp_(0, 2 * self.half - 1)

    def decode(self, codes, d, m):
        return d * (codes - self.half)

    def pack(self, codes, d16, m16):
        return torch.cat([le_bytes(d16), pack_nibbles(codes.to(torch.uint8))], dim=-1)


class _Q4_1Grid(_Grid):
    name = "q4_1"
    has_min = True
    levels = 15  # the highest code

    def candidates(self, G, search):
        lo = first_extreme(G, G.amin(dim=-1, keepdim=True), torch.argmin)
        hi = first_extreme(G, G.amax(dim=-1, keepdim=True), torch.argmax)
        d, m = [(hi - lo) / self.levels], [lo]
        if search:
            for f in SEARCH_FACTORS:  # [lo, hi] shrunk by f about its midpoint
                cut = (hi - lo) * ((1 - f) / 2)
                d.append(((hi - cut) - (lo + cut)) / self.levels)
                m.append(lo + cut)
        return torch.stack(d), torch.stack(m)

    def encode(self, w, inv, lo):
        return (w - lo).mul_(inv).add_(0.5).floor_().clamp_(0, self.levels)

    def decode(self, codes, d, m):
        return (d * codes) + m

    def pack(self, codes, d16, m16):
        return torch.cat([le_bytes(d16), le_bytes(m16), pack_nibbles(codes.to(torch.uint8))], dim=-1)


class _Q8_0Grid(_Grid):
    name = "q8_0"

    def candidates(self, G, search):
        amax = G.abs().amax(dim=-1, keepdim=True)
        d = [amax / 127]
        if search:
            d += [(amax * f) / 127 for f in SEARCH_FACTORS]
        d = torch.stack(d)
        return d, torch.zeros_like(d)

    def encode(self, w, inv, lo):
        # ggml's codes are -127..127 (some of its SIMD dot products assume no -128).
        # + 0.0 turns round's -0.0 into the +0.0 that int8 code 0 decodes to (Q must match the file bitwise).
        return round_half_away(w * inv).clamp_(-127, 127).add_(0.0)

    def decode(self, codes, d, m):
        return codes * d

    def pack(self, codes, d16, m16):
        return torch.cat([le_bytes(d16), codes.to(torch.int8).view(torch.uint8)], dim=-1)


class _Q5_0Grid(_Q4_0Grid):
    name = "q5_0"
    half = 16

    def pack(self, codes, d16, m16):
        q = codes.to(torch.uint8)
        return torch.cat([le_bytes(d16), pack_fifth_bits(q), pack_nibbles(q & 0x0F)], dim=-1)


class _Q5_1Grid(_Q4_1Grid):
    name = "q5_1"
    levels = 31

    def pack(self, codes, d16, m16):
        q = codes.to(torch.uint8)
        return torch.cat([le_bytes(d16), le_bytes(m16), pack_fifth_bits(q), pack_nibbles(q & 0x0F)], dim=-1)


_GRIDS: dict[str, _Grid] = {g.name: g for g in (_Q4_0Grid(), _Q4_1Grid(), _Q8_0Grid(), _Q5_0Grid(), _Q5_1Grid())}


@dataclass
class _GroupParams:
    """Per-block parameters, each float32 (rows, n_groups) except the stored fp16 ones."""

    inv: torch.Tensor  # float32 reciprocal of the unrounded scale: assigns codes
    lo: torch.Tensor  # float32 unrounded minimum (Q4_1; zeros otherwise): assigns codes
    d: torch.Tensor  # fp16-rounded scale as float32: gives values
    m: torch.Tensor  # fp16-rounded minimum as float32 (zeros for Q4_0/Q8_0)
    d16: torch.Tensor  # stored scale, float16
    m16: torch.Tensor  # stored minimum, float16

    @classmethod
    def empty(cls, rows: int, n_groups: int, device: torch.device) -> _GroupParams:
        def f32() -> torch.Tensor:
            return torch.zeros(rows, n_groups, dtype=torch.float32, device=device)

        def f16() -> torch.Tensor:
            return torch.zeros(rows, n_groups, dtype=torch.float16, device=device)

        return cls(f32(), f32(), f32(), f32(), f16(), f16())

    def set(self, grid: _Grid, g: int, G: torch.Tensor, h: torch.Tensor, search: bool) -> None:
        """Choose block g's parameters from its weights G (rows, 32) and Hessian diagonal h (32,)."""
        d, lo = grid.candidates(G, search)  # (C, rows, 1)
        d16, m16 = d.to(torch.float16), lo.to(torch.float16)
        ok = torch.isfinite(d16) & torch.isfinite(m16)
        if d.shape[0] > 1:
            values = grid.decode(grid.encode(G, safe_reciprocal(d), lo), d16.float(), m16.float())
            err = ((G - values).square_() * h).sum(dim=-1, keepdim=True)  # (C, rows, 1)
            err = torch.where(ok, err, torch.full_like(err, math.inf))
            best = err.argmin(dim=0, keepdim=True)  # the first minimum: ggml's own candidate on ties
            d, lo, d16, m16, ok = (t.gather(0, best) for t in (d, lo, d16, m16, ok))
        d, lo, d16, m16, ok = d[0], lo[0], d16[0], m16[0], ok[0]
        if not bool(ok.all()):
            worst = float(G.abs().max())
            raise QuantizationError(
                f"{grid.name}: a block holds weights up to {worst:.6g}, whose scale or minimum is beyond fp16's "
                f"range (65504); weights this large cannot be stored in {grid.name}: keep this tensor in bf16 or f32"
            )
        self.inv[:, g : g + 1] = safe_reciprocal(d)
        self.lo[:, g : g + 1] = lo
        self.d[:, g : g + 1] = d16.float()
        self.m[:, g : g + 1] = m16.float()
        self.d16[:, g : g + 1] = d16
        self.m16[:, g : g + 1] = m16


# ---------------------------------------------------------------------------------------------
# GPTQ


@dataclass(frozen=True)
class GPTQResult:
    """GPTQ's output before packing, every tensor in the weight's original column order.

    format:      the registered format (q4_0, q4_1 or q8_0).
    codes:       (rows, cols) uint8 0..15 for Q4_0/Q4_1, int8 -127..127 for Q8_0.
    scales:      (rows, cols // 32) float16, one per ggml block.
    mins:        (rows, cols // 32) float16 for Q4_1, else None.
    dequantized: (rows, cols) float32, the weights GPTQ chose (Q); the packed blocks decode to exactly these.
    perm:        (cols,) int64, the order columns were quantized in (act_order), else None.
    scale_search: whether the blocks' parameters come from the scale search (else ggml's rule).
    """

    format: WeightFormat
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    dequantized: torch.Tensor
    perm: torch.Tensor | None
    scale_search: bool = False

    def pack(self) -> QuantizedTensor:
        """The ggml blocks, checked to dequantise (by the registry) to `dequantized` bit for bit."""
        grid = _GRIDS[self.format.name]
        rows, cols = self.codes.shape
        n = rows * (cols // GROUP)
        m16 = self.mins if self.mins is not None else torch.zeros_like(self.scales)
        blocks = grid.pack(self.codes.reshape(n, GROUP), self.scales.reshape(n, 1), m16.reshape(n, 1))
        packed = QuantizedTensor(self.format, (rows, cols), blocks.reshape(self.format.packed_shape((rows, cols))))
        if not torch.equal(packed.dequantize().view(torch.int32), self.dequantized.view(torch.int32)):  # bitwise
            raise QuantizationError(
                f"{self.format.name}: internal error: GPTQ's packed blocks do not decode to the weights it chose; "
                "quant/gptq.py and quant/formats.py disagree about the format"
            )
        return packed


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, fmt: str, blocksize: int, percdamp: float):
    """Validated float32 copies of W (rows, cols) and H (cols, cols) on the weight's device, and the format."""
    format_ = get_format(fmt)
    if format_.name not in _GRIDS:
        raise QuantizationError(f"GPTQ produces {', '.join(_GRIDS)}; got format {format_.name!r}")
    return (format_, *_checked(weight, hessian, format_, blocksize, percdamp))


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹, as the reference computes it; raises if H is not positive definite."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if int(info) == 0:
            return U
    raise QuantizationError(
        f"GPTQ: the Hessian of this layer is not positive definite after dampening with percdamp={percdamp} "
        f"(Cholesky failed at column {int(info) - 1}); retry with a larger percdamp (e.g. {max(percdamp * 10, 0.1):g}) "
        "or more calibration samples"
    )


def gptq_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: str = "q4_0",
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    scale_search: bool = False,
) -> GPTQResult:
    """GPTQ on ggml's grid: codes, fp16 scales (and mins) and Q, not yet packed (see `gptq_quantize`).

    With `scale_search` GPTQ runs twice, with and without the per-block search, and keeps the run with
    the lower `hessian_error`: the search's objective ignores the error feedback, and on Q8_0 it can lose
    (measured: 0.233 -> 0.275 of RTN's error with act-order on the test layer), so the option never
    makes the layer worse on its calibration data.
    """
    format_, W, H = _prepare(weight, hessian, fmt, blocksize, percdamp)
    grid = _GRIDS[format_.name]
    plain = _gptq(format_, grid, W.clone(), H.clone(), blocksize, percdamp, act_order, search=False)
    if not scale_search:
        return plain
    searched = _gptq(format_, grid, W, H, blocksize, percdamp, act_order, search=True)
    errors = [hessian_error(weight, r.dequantized, hessian) for r in (plain, searched)]
    return searched if errors[1] < errors[0] else plain


def _gptq(
    format_: WeightFormat,
    grid: _Grid,
    W: torch.Tensor,
    H: torch.Tensor,
    blocksize: int,
    percdamp: float,
    act_order: bool,
    search: bool,
) -> GPTQResult:
    """The algorithm, on validated float32 W (rows, cols) and H (cols, cols), both overwritten."""
    rows, columns = W.shape
    n_groups = columns // GROUP
    params = _GroupParams.empty(rows, n_groups, W.device)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    hdiag = torch.diag(H).clone()  # scale-search weights, original order, undamped

    perm = None
    if act_order:
        for g in range(n_groups):  # static groups: from the original weights in the original order
            params.set(grid, g, W[:, g * GROUP : (g + 1) * GROUP], hdiag[g * GROUP : (g + 1) * GROUP], search)
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    group_of = (perm // GROUP).tolist() if perm is not None else [j // GROUP for j in range(columns)]

    def quantize_column(j: int, i: int, W1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not act_order and j % GROUP == 0:  # the group's current (error-updated) weights
            params.set(grid, j // GROUP, W1[:, i : i + GROUP], hdiag[j : j + GROUP], search)
        g = group_of[j]
        c = grid.encode(W1[:, i : i + 1], params.inv[:, g : g + 1], params.lo[:, g : g + 1])
        return c, grid.decode(c, params.d[:, g : g + 1], params.m[:, g : g + 1])

    Q, codes = _error_feedback(W, H, blocksize, percdamp, perm, quantize_column)

    code_dtype = torch.int8 if format_.name == "q8_0" else torch.uint8
    return GPTQResult(
        format=format_,
        codes=codes.to(code_dtype),
        scales=params.d16,
        mins=params.m16 if grid.has_min else None,
        dequantized=Q.contiguous(),
        perm=perm,
        scale_search=search,
    )


def _error_feedback(W: torch.Tensor, H: torch.Tensor, blocksize: int, percdamp: float, perm: torch.Tensor | None,
                    quantize_column: Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
    """GPTQ's loop in the paper's notation: columns in order (or in `perm`'s), each quantized by
    `quantize_column(j, i, W1)` -> (codes, values) of column j (i within the lazy block W1), its error spread over
    the columns after it through Hinv. Returns (Q, codes) in the original column order."""
    columns = W.shape[1]
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=W.device)
    H[diag, diag] += damp
    Hinv = _inverse_cholesky(H, percdamp)

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()  # (rows, count)
        Q1, C1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c, q = quantize_column(i1 + i, i, W1)
            C1[:, i : i + 1], Q1[:, i : i + 1] = c, q
            err1 = (W1[:, i : i + 1] - q) / Hinv1[i, i]
            W1[:, i:] -= err1.matmul(Hinv1[i : i + 1, i:])
            Err1[:, i : i + 1] = err1
        Q[:, i1:i2], codes[:, i1:i2] = Q1, C1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if perm is not None:
        invperm = torch.argsort(perm)
        Q, codes = Q[:, invperm], codes[:, invperm]
    return Q, codes


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: str = "q4_0",
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    scale_search: bool = False,
) -> QuantizedTensor:
    """Quantize weight (out_features, in_features) with GPTQ into ggml blocks of `fmt` (q4_0, q4_1, q8_0)."""
    return gptq_solve(
        weight, hessian, fmt, blocksize=blocksize, percdamp=percdamp, act_order=act_order, scale_search=scale_search
    ).pack()


def gptq_quantize_k(weight: torch.Tensor, hessian: torch.Tensor, fmt: str = "q4_k", *, blocksize: int = 128,
                    percdamp: float = 0.01, act_order: bool = True) -> QuantizedTensor:
    """GPTQ on a K-quant grid (Q4_K, Q5_K, Q6_K), in a layout llama.cpp loads unchanged.

    The super-blocks' scales are chosen first, from the original weights, by ggml's importance-weighted
    quantizer with diag(H) as the importance (the Hessian diagonal is the mean square of the inputs, as an
    imatrix is): static groups, as with act-order on the legacy grids. GPTQ then chooses every code, column
    by column, against those fixed group scales (code = nearest((w - M) / D), clamped), feeding each column's
    error forward. The result is kept only if its `hessian_error` beats the importance-weighted rounding it
    started from, so it never makes the layer worse on its calibration data.

    The scales being static anyway, columns are visited by decreasing diag(H) by default (`act_order`): on a
    512-column layer with correlated inputs that gives 0.50x RTN's Hessian-weighted error on Q4_K, against
    0.87x in the natural order."""
    format_ = get_format(fmt)
    if format_.name not in K_GPTQ_FORMATS:
        raise QuantizationError(f"GPTQ on K-quant grids covers {', '.join(K_GPTQ_FORMATS)}; got {format_.name!r}")
    W, H = _checked(weight, hessian, format_, blocksize, percdamp)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    rows, columns = W.shape
    base = format_.quantize(W, importance=torch.diag(H).clamp(min=0))
    blocks = base.reshape(-1, format_.bytes_per_block)
    D, M = (t.reshape(rows, -1) if t is not None else None for t in format_.group_affine(blocks))
    group, (lowest, highest) = format_.code_group, format_.code_limits
    safe_D = torch.where(D == 0, torch.ones_like(D), D)  # a zero scale gives every code the same value
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else None
    group_of = (perm // group).tolist() if perm is not None else [j // group for j in range(columns)]

    def quantize_column(j: int, i: int, W1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = group_of[j]
        d, m = D[:, g : g + 1], (M[:, g : g + 1] if M is not None else None)
        shifted = W1[:, i : i + 1] if m is None else W1[:, i : i + 1] - m
        # + 0.0 turns round's -0.0 into the +0.0 a stored code decodes to (Q must match the file bitwise)
        c = torch.round(shifted / safe_D[:, g : g + 1]).clamp_(lowest, highest).add_(0.0)
        return c, d * c if m is None else d * c + m  # the registry's dequantisation, bit for bit

    Q, codes = _error_feedback(W.clone(), H.clone(), blocksize, percdamp, perm, quantize_column)
    stored = (codes - lowest).to(torch.uint8).reshape(-1, QK_K)
    packed = QuantizedTensor(format_, (rows, columns),
                             format_.with_codes(blocks, stored).reshape(format_.packed_shape((rows, columns))))
    if not torch.equal(packed.dequantize().view(torch.int32), Q.view(torch.int32)):
        raise QuantizationError(f"{format_.name}: internal error: GPTQ's packed blocks do not decode to the weights it "
                                "chose; quant/gptq.py and quant/formats.py disagree about the format")
    start = QuantizedTensor(format_, (rows, columns), base)
    return packed if hessian_error(weight, packed, hessian) < hessian_error(weight, start, hessian) else start


def _checked(weight: torch.Tensor, hessian: torch.Tensor, format_: WeightFormat, blocksize: int, percdamp: float):
    """Validated float32 copies of W and H (see _prepare), for any registered grid."""
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        kind = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise QuantizationError(f"GPTQ needs a 2-D float weight (out_features, in_features), got {kind}")
    format_.packed_shape(weight.shape)  # raises for in_features not a multiple of the block
    cols = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (cols, cols):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise QuantizationError(f"GPTQ: a weight with {cols} input features needs a ({cols}, {cols}) Hessian, got {shape}")
    if blocksize <= 0 or blocksize % GROUP != 0:
        raise QuantizationError(f"GPTQ: blocksize must be a positive multiple of {GROUP} (one ggml block), got {blocksize}")
    if not percdamp >= 0:
        raise QuantizationError(f"GPTQ: percdamp must be >= 0, got {percdamp}")
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    for name, t in (("weight", W), ("Hessian", H)):
        if not bool(torch.isfinite(t).all()):
            raise QuantizationError(f"GPTQ: the {name} holds NaN or Inf values; the checkpoint or calibration is corrupt")
    return W, H


def rtn_quantize(weight: torch.Tensor, fmt: str) -> QuantizedTensor:
    """Round-to-nearest: the registry's own (ggml's) quantisation of `weight` into `fmt`."""
    return QuantizedTensor.from_float(weight, fmt)


def hessian_error(weight: torch.Tensor, dequantized: torch.Tensor | QuantizedTensor, hessian: torch.Tensor) -> float:
    """trace((W - Q) H (W - Q)ᵀ): the layer's squared output error on the calibration inputs (float64 sum)."""
    if isinstance(dequantized, QuantizedTensor):
        dequantized = dequantized.dequantize()
    E = weight.detach().to(torch.float64) - dequantized.detach().to(device=weight.device, dtype=torch.float64)
    H = hessian.detach().to(device=weight.device, dtype=torch.float64)
    return float((E.matmul(H) * E).sum())


# --------------------------------------------------------------------------------------------- whole models

K_GPTQ_FORMATS = ("q4_k", "q5_k", "q6_k")
GPTQ_FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", *K_GPTQ_FORMATS)
FLOAT_FORMATS = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class GPTQRecipe:
    """How a model was GPTQ-quantized; stored in the GGUF file as `kilnlm.quantization.recipe`."""

    calibration: str  # e.g. "64 sampled from the model; 64 from c4.txt"
    nsamples: int
    seqlen: int
    seed: int
    percdamp: float = 0.01
    blocksize: int = 128
    act_order: bool = False
    scale_search: bool = True
    float_targets: bool = True  # aim each layer at the float model's output (see HessianAccumulator.target_weight)
    version: int = 2

    def describe(self) -> str:
        """One line: every field as key=value."""
        return "gptq " + " ".join(f"{k}={v}" for k, v in self.__dict__.items())


class GPTQQuantizer:
    """GPTQ over a whole checkpoint, block by block (the writer's Quantizer protocol).

    Calibration activations flow through one decoder block at a time. Within a block the linear layers are
    solved in execution order, q/k/v sharing one Hessian and gate/up another, and the block is re-run after
    each group so later layers see the quantized earlier ones ("true sequential"); its outputs with all
    weights quantized become the next block's inputs. Embeddings, norms and the LM head are rounded to
    nearest, as the reference leaves them.

    With `recipe.float_targets` (the default) the same samples also flow through the float model, and each
    layer is solved for the float layer's output on the float inputs rather than for its own output on the
    quantized inputs, so errors do not pile up block after block (HessianAccumulator.target_weight). Block
    linears planned in a float type (F16 fallbacks such as a down_proj whose width is not a multiple of 32)
    then store their target weight; without float targets those are rounded to nearest too. On stories260K
    (Q4_0, c4 calibration, perplexity on text sampled from the model) the reference way closes 17% of the
    RTN-F16 gap and float targets close 37%.
    """

    def __init__(self, ids: torch.Tensor, recipe: GPTQRecipe, *, device: str | torch.device = "cpu",
                 on_layer: Callable[[int, int], None] | None = None):
        self.ids, self.recipe, self.device, self.on_layer = ids, recipe, device, on_layer
        self.errors: dict[str, tuple[float, float]] = {}  # name -> (GPTQ, RTN) Hessian-weighted error

    def plan(self, checkpoint, plan: list) -> list:
        """The writer's plan, unchanged: one packed tensor per parameter."""
        return plan

    def quantized_tensors(self, checkpoint, plan: list) -> Iterator[tuple[object, QuantizedTensor]]:
        """Yield (planned tensor, packed tensor) in plan order, calibrating each block just before its tensors."""
        from kilnlm.quant.calibration import LayerRunner

        runner: LayerRunner | None = None
        solved: dict[str, QuantizedTensor] = {}
        current = -1
        for planned in plan:
            layer = _layer_index(planned.name)
            if layer is not None and layer != current:
                runner = runner or LayerRunner(checkpoint, self.ids, device=self.device,
                                               float_stream=self.recipe.float_targets)
                solved, current = self._solve_layer(runner, layer, plan), layer
                if self.on_layer is not None:
                    self.on_layer(layer, checkpoint.config.num_layers)
            packed = solved.get(planned.name)
            yield planned, packed if packed is not None else QuantizedTensor.from_float(
                checkpoint.tensor(planned.name), planned.format)

    def _solve_layer(self, runner, index: int, plan: list) -> dict[str, QuantizedTensor]:
        formats = {p.name: p.format for p in plan}
        layer = runner.layer(index)
        # A copy taken before any weight is replaced, rather than reading the block from the checkpoint again.
        float_layer = copy.deepcopy(layer) if self.recipe.float_targets else None
        # Linears planned in a float type (F16 fallbacks) take the float target too when there is one:
        # storing W* costs nothing and absorbs the error of the quantized layers before them.
        solvable = GPTQ_FORMATS + (FLOAT_FORMATS if float_layer is not None else ())
        solved: dict[str, QuantizedTensor] = {}
        for group in layer.linear_groups:
            names = [m for m in group if formats[f"layers.{index}.{m}.weight"].name in solvable]
            if not names:
                continue
            stats = HessianAccumulator(layer.get_submodule(names[0]).in_features, device=runner.device,
                                       float_targets=float_layer is not None)
            if float_layer is not None:
                runner.observe_with_float(layer, float_layer, names[0], stats.add_batch)
            else:
                runner.observe(layer, names[0], stats.add_batch)
            for module_name in names:
                module = layer.get_submodule(module_name)
                full_name = f"layers.{index}.{module_name}.weight"
                solved[full_name] = packed = self._solve(full_name, module.weight, stats, formats[full_name].name)
                module.weight = torch.nn.Parameter(packed.dequantize().to(module.weight.device), requires_grad=False)
        runner.advance(layer, float_layer)
        return solved

    def _solve(self, name: str, weight: torch.Tensor, stats: HessianAccumulator, fmt: str) -> QuantizedTensor:
        r, hessian = self.recipe, stats.hessian
        target = stats.target_weight(weight, r.percdamp) if stats.float_targets else weight
        if fmt in FLOAT_FORMATS:
            return QuantizedTensor.from_float(target, fmt)
        if fmt in K_GPTQ_FORMATS:  # static scales: act-order always (see gptq_quantize_k)
            packed = gptq_quantize_k(target, hessian, fmt, blocksize=r.blocksize, percdamp=r.percdamp)
        else:
            packed = gptq_quantize(target, hessian, fmt, blocksize=r.blocksize, percdamp=r.percdamp,
                                   act_order=r.act_order, scale_search=r.scale_search)
        # Both errors against the target: with float targets that is the layer's error against the float model.
        rtn = rtn_quantize(weight, fmt)
        self.errors[name] = (hessian_error(target, packed, hessian), hessian_error(target, rtn, hessian))
        return packed


def _layer_index(name: str) -> int | None:
    if not name.startswith("layers."):
        return None
    return int(name.split(".")[1])


def gptq_quantizer(checkpoint, *, calib_files: list[str], nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                   model_samples: int | None = None, act_order: bool = False, scale_search: bool = True,
                   float_targets: bool = True, device: str | torch.device = "cpu",
                   on_layer: Callable[[int, int], None] | None = None) -> GPTQQuantizer:
    """A GPTQQuantizer with its calibration samples drawn (see `load_calibration` for `model_samples`)."""
    from kilnlm.quant.calibration import load_calibration

    ids, source = load_calibration(checkpoint, calib_files, nsamples, seqlen, seed, device, model_samples)
    recipe = GPTQRecipe(calibration=source, nsamples=nsamples, seqlen=seqlen, seed=seed, act_order=act_order,
                        scale_search=scale_search, float_targets=float_targets)
    return GPTQQuantizer(ids, recipe, device=device, on_layer=on_layer)
