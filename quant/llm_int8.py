"""LLM.int8() (Dettmers et al., 2022): vector-wise INT8 weights plus fp16 outlier columns, and its forward.

The paper's observation: a few hidden dimensions of transformer activations carry values far larger than
the rest (|x| ≥ 6, up to ~60 and beyond), in most tokens. Per-token absmax INT8 quantization of x then
spends its 255 levels on those few values and rounds the remaining features to a handful of levels:
plain vector-wise W8A8 loses the model. The mixed-precision decomposition fixes it:

    X W ᵀ = X[:, O] W[:, O]ᵀ                      (fp16, the few outlier dimensions O)
          + s_x s_wᵀ ∘ (Q(X[:, ¬O]) Q(W[:, ¬O])ᵀ)  (int8 × int8, int32 accumulate, the rest)

with Q(·) absmax quantization per row of X (per token) and per row of W (per output feature), s the
absmax / 127 scales, and O = the dimensions where any |x| exceeds the threshold (6.0 in the paper).

Here the packed artifact of one linear layer is an `Int8Weight`: W[:, ¬O] as int8 codes with one scale
per output row (taken over the non-outlier columns only, so outlier weights do not inflate it), and
W[:, O] kept as fp16 for the outlier list O found on calibration data by `OutlierTracker`.

`int8_linear_forward` is the torch reference of the decomposition (the CPU path, and the oracle for the
GPU kernel that comes later). At run time O is the stored list ∪ every input feature whose |x| exceeds
`threshold` anywhere in this batch (the paper's rule, as bitsandbytes applies it: one column set for the
whole batch, so a token's output depends slightly on which other tokens share its batch). A feature that
crosses the threshold without being in the stored list is still computed in floating point, but its
weight column is the DEQUANTIZED int8 column (code × row scale): the fp16 original of that column is not
stored. The activation side, where the large error of INT8 comes from, is then exact; the weight side has
ordinary INT8 error (≤ row scale / 2 per weight).

Numerics of the reference:
* Rounding is half to even (`torch.round`), codes are clamped to -127..127 (never -128, so x and w are
  symmetric), an all-zero row (of W or of x) has scale 0 and codes 0.
* The int8 × int8 products are accumulated in int32 exactly: `torch._int_mm` on the CPU where this torch
  build implements it, else an int32 matmul; on other devices (torch has no integer matmul on CUDA) a
  float64 matmul, exact as well (every partial sum is an integer below 2**31 < 2**53). The path never
  changes the result. A layer wider than `MAX_IN_FEATURES` could overflow int32 and is refused.
* The int32 result is converted to float32 and multiplied by outer(s_x, s_w); the outlier part is the
  float32 product of x's own values (an fp16/bf16 x is already in its compute dtype; an fp32 x is not
  rounded to fp16) and the fp16 weights, accumulated in float32 as tensor-core kernels accumulate. The
  sum (+ bias) is returned in x's dtype.
* NaN activations give NaN outputs (through their token's scale), never a silently finite number.
  NaN/Inf weights are refused at quantization time: they mean a corrupt checkpoint.

`vectorwise_int8_forward` is plain W8A8 (same per-row / per-token absmax, no decomposition), kept to show
what the decomposition buys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from kilnlm.quant.formats import QuantizationError, check_finite

__all__ = [
    "DEFAULT_THRESHOLD",
    "MAX_IN_FEATURES",
    "OutlierTracker",
    "Int8Weight",
    "quantize_llm_int8",
    "int8_linear_forward",
    "vectorwise_int8_forward",
]

DEFAULT_THRESHOLD = 6.0  # the paper's outlier threshold on |activation|
# |code| ≤ 128 on either side (a foreign artifact may hold -128), so k · 128² must fit in int32.
MAX_IN_FEATURES = (2**31 - 1) // (128 * 128)


class OutlierTracker:
    """Running max |activation| per input feature of one linear layer, over calibration batches."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = int(in_features)
        self.ntokens = 0
        self._device = torch.device(device) if device is not None else None
        self._max_abs: torch.Tensor | None = None

    @property
    def max_abs(self) -> torch.Tensor:
        """max |x| seen per input feature, float32 (in_features,); zeros before the first batch."""
        if self._max_abs is None:
            self._max_abs = torch.zeros(self.in_features, dtype=torch.float32, device=self._device)
        return self._max_abs

    def add_batch(self, inp: torch.Tensor) -> None:
        """Fold a batch of layer inputs (..., in_features) into the running per-feature maximum."""
        if not isinstance(inp, torch.Tensor) or inp.ndim == 0 or inp.shape[-1] != self.in_features:
            shape = tuple(inp.shape) if isinstance(inp, torch.Tensor) else type(inp).__name__
            raise QuantizationError(
                f"LLM.int8 calibration: a layer with {self.in_features} input features got an input of shape "
                f"{shape}; the last dimension must be {self.in_features}"
            )
        if self._max_abs is None and self._device is None:
            self._device = inp.device  # the statistics live where the activations are
        x = inp.detach().reshape(-1, self.in_features)  # (tokens, in_features)
        if x.shape[0] == 0:
            return
        batch_max = x.abs().amax(dim=0).to(device=self.max_abs.device, dtype=torch.float32)  # (in_features,)
        if not bool(torch.isfinite(batch_max).all()):
            bad = torch.nonzero(~torch.isfinite(batch_max)).flatten()[:8].tolist()
            raise QuantizationError(
                f"LLM.int8 calibration: input features {bad} hold NaN or Inf activations; the model "
                "overflowed on the calibration data (run calibration in float32 or bfloat16)"
            )
        torch.maximum(self.max_abs, batch_max, out=self._max_abs)
        self.ntokens += x.shape[0]

    def outlier_columns(self, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
        """Sorted int64 indices (n_outliers,) of the features whose max |x| exceeds `threshold`."""
        return torch.nonzero(self.max_abs > threshold).flatten().to(torch.int64)


@dataclass(frozen=True, eq=False)
class Int8Weight:
    """The packed LLM.int8 artifact of one linear layer (out_features, in_features).

    weight_int8:    int8 (out_features, in_features). Codes of the non-outlier weights, round(w / row_scale)
                    in -127..127; the outlier columns are 0.
    row_scale:      float32 (out_features,). Per output row, absmax over the non-outlier columns / 127;
                    0 for a row whose non-outlier weights are all zero.
    outlier_idx:    int64 (n_outliers,). Sorted, distinct input-feature indices kept in fp16.
    outlier_weight: float16 (out_features, n_outliers). The original weights of those columns, rounded
                    to fp16: column j is W[:, outlier_idx[j]].
    threshold:      float. The run-time activation threshold: an input feature with |x| > threshold in
                    a batch is computed in floating point even when not in outlier_idx (default 6.0).

    The dequantized weight is weight_int8 * row_scale[:, None] with the outlier columns replaced by
    outlier_weight. All tensors live on one device.
    """

    weight_int8: torch.Tensor
    row_scale: torch.Tensor
    outlier_idx: torch.Tensor
    outlier_weight: torch.Tensor
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        threshold = float(self.threshold)
        object.__setattr__(self, "threshold", threshold)
        w, s, idx, ow = self.weight_int8, self.row_scale, self.outlier_idx, self.outlier_weight
        if not all(isinstance(t, torch.Tensor) for t in (w, s, idx, ow)):
            raise QuantizationError("Int8Weight: every field but threshold must be a torch.Tensor")
        if w.dtype != torch.int8 or w.ndim != 2:
            raise QuantizationError(f"Int8Weight: weight_int8 must be int8 (out, in), got {w.dtype} {tuple(w.shape)}")
        out_f, in_f = w.shape
        if s.dtype != torch.float32 or tuple(s.shape) != (out_f,):
            raise QuantizationError(f"Int8Weight: row_scale must be float32 ({out_f},), got {s.dtype} {tuple(s.shape)}")
        if idx.dtype != torch.int64 or idx.ndim != 1:
            raise QuantizationError(f"Int8Weight: outlier_idx must be int64 (n,), got {idx.dtype} {tuple(idx.shape)}")
        n = idx.shape[0]
        if ow.dtype != torch.float16 or tuple(ow.shape) != (out_f, n):
            raise QuantizationError(
                f"Int8Weight: outlier_weight must be float16 ({out_f}, {n}), got {ow.dtype} {tuple(ow.shape)}"
            )
        if len({t.device for t in (w, s, idx, ow)}) != 1:
            raise QuantizationError("Int8Weight: all tensors must be on one device")
        if not threshold > 0:  # also rejects NaN; inf disables run-time detection
            raise QuantizationError(f"Int8Weight: threshold must be a positive number, got {threshold}")
        if not bool((torch.isfinite(s) & (s >= 0)).all()):
            raise QuantizationError("Int8Weight: row_scale must be finite and non-negative")
        if n and (int(idx[0]) < 0 or int(idx[-1]) >= in_f or not bool((idx[1:] > idx[:-1]).all())):
            raise QuantizationError(
                f"Int8Weight: outlier_idx must be sorted, distinct and in 0..{in_f - 1}, got {idx.tolist()[:16]}"
            )
        if n and bool(w[:, idx].any()):
            raise QuantizationError("Int8Weight: weight_int8 must be 0 in the outlier columns")

    @property
    def out_features(self) -> int:
        """Rows of the weight (output features)."""
        return self.weight_int8.shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the weight (input features)."""
        return self.weight_int8.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of all packed tensors (codes, scales, outlier indices and fp16 columns)."""
        fields = (self.weight_int8, self.row_scale, self.outlier_idx, self.outlier_weight)
        return sum(t.numel() * t.element_size() for t in fields)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 (out_features, in_features): codes × row scale, outlier columns from fp16."""
        w = self.weight_int8.to(torch.float32) * self.row_scale[:, None]  # (out, in)
        w[:, self.outlier_idx] = self.outlier_weight.to(torch.float32)
        return w


def quantize_llm_int8(
    weight: torch.Tensor, outlier_idx: torch.Tensor, threshold: float = DEFAULT_THRESHOLD
) -> Int8Weight:
    """Pack a float weight (out, in): fp16 columns at outlier_idx, per-row absmax INT8 for the rest."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim != 2:
        kind = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise QuantizationError(f"LLM.int8: expected a floating-point (out_features, in_features) weight, got {kind}")
    w = weight.detach().to(torch.float32)  # (out, in)
    check_finite(w, "LLM.int8")
    idx = _outlier_index(outlier_idx, w.shape[1], w.device)  # (n,)

    outlier_weight = w[:, idx].to(torch.float16)  # (out, n)
    if bool(torch.isinf(outlier_weight).any()):
        raise QuantizationError(
            f"LLM.int8: outlier weights up to {float(w[:, idx].abs().max()):.6g} overflow fp16 (65504); "
            "keep this layer in bf16 or f32"
        )
    regular = w.clone()
    regular[:, idx] = 0  # outlier weights must not inflate their row's scale
    codes, row_scale = _absmax_int8(regular)
    return Int8Weight(codes, row_scale, idx, outlier_weight, threshold)


def int8_linear_forward(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ bias) by the LLM.int8 decomposition; x (..., in_features) -> (..., out_features), x's dtype."""
    x2 = _flat_input(x, w.in_features, "int8_linear_forward")  # (T, in) float32
    stored = torch.zeros(w.in_features, dtype=torch.bool, device=x2.device)  # (in,)
    stored[w.outlier_idx] = True
    crossing = (x2.abs() > w.threshold).any(dim=0)  # (in,): the paper's run-time rule, whole batch
    extra_idx = torch.nonzero(crossing & ~stored).flatten()  # (n_extra,) not stored: dequantized columns
    outlier = stored | crossing  # (in,)

    # Regular part: int8 × int8 over the non-outlier features, int32 accumulate, then both scales.
    x_q, x_scale = _absmax_int8(x2.masked_fill(outlier, 0))  # (T, in) int8, (T,) float32
    acc = _int8_matmul_t(x_q, w.weight_int8)  # (T, out) int32
    y = acc.to(torch.float32) * torch.outer(x_scale, w.row_scale)  # (T, out)

    # Outlier part in floating point: stored columns from fp16, run-time ones from the int8 codes.
    idx = torch.cat([w.outlier_idx, extra_idx])  # (n_all,)
    extra_weight = w.weight_int8[:, extra_idx].to(torch.float32) * w.row_scale[:, None]  # (out, n_extra)
    w_out = torch.cat([w.outlier_weight.to(torch.float32), extra_weight], dim=1)  # (out, n_all)
    y += x2[:, idx] @ w_out.t()
    return _finish(y, x, bias, w.out_features)


def vectorwise_int8_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ bias) by plain W8A8: per-row weight and per-token activation absmax INT8, int32 accumulate."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim != 2:
        kind = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise QuantizationError(f"vector-wise INT8: expected a floating-point (out, in) weight, got {kind}")
    w32 = weight.detach().to(torch.float32)  # (out, in)
    check_finite(w32, "vector-wise INT8")
    x2 = _flat_input(x, w32.shape[1], "vectorwise_int8_forward")  # (T, in)
    w_q, w_scale = _absmax_int8(w32)  # (out, in), (out,)
    x_q, x_scale = _absmax_int8(x2)  # (T, in), (T,)
    y = _int8_matmul_t(x_q, w_q).to(torch.float32) * torch.outer(x_scale, w_scale)  # (T, out)
    return _finish(y, x, bias, w32.shape[0])


# ---------------------------------------------------------------------------------------------
# Helpers


def _absmax_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (rows, k) -> int8 codes (rows, k) = round_half_even(t / s) and scales s = absmax / 127 (rows,).

    A row of zeros gets s = 0 and codes 0. A row holding NaN gets s = NaN, which carries into the output.
    """
    scale = t.abs().amax(dim=-1) / 127 if t.shape[-1] else t.new_zeros(t.shape[:-1])  # (rows,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]  # (rows, 1); zero rows divide by 1
    codes = torch.round(t / safe).clamp_(-127, 127).to(torch.int8)
    return codes, scale


@functools.lru_cache(maxsize=None)
def _cpu_int_mm_available() -> bool:
    """Whether this torch build has `torch._int_mm` for CPU tensors (CUDA-only before torch 2.4 or so)."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        probe = torch.ones(1, 1, dtype=torch.int8)
        return int(torch._int_mm(probe, probe)) == 1
    except (RuntimeError, NotImplementedError):
        return False


def _int8_matmul_t(a: torch.Tensor, b: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """int8 a (m, k) @ int8 b (n, k)ᵀ -> int32 (m, n), exact. The one place the accumulation path is chosen.

    path None picks "int_mm" (`torch._int_mm`) on the CPU where this torch build has it, else "int32"
    (an int32 matmul) on the CPU and "float64" elsewhere (torch has no integer matmul on CUDA; float64
    sums of integers below 2**31 are exact). All three give the same result; tests force each one.
    """
    k = a.shape[1]
    if k > MAX_IN_FEATURES:
        raise QuantizationError(
            f"LLM.int8: {k} input features can overflow the int32 accumulator (at most {MAX_IN_FEATURES}); "
            "keep this layer in fp16 or split it"
        )
    if path is None:
        if a.device.type != "cpu":
            path = "float64"
        else:
            path = "int_mm" if _cpu_int_mm_available() else "int32"
    if path == "int_mm":
        return torch._int_mm(a.contiguous(), b.t())
    if path == "int32":
        return a.to(torch.int32) @ b.t().to(torch.int32)
    if path == "float64":
        return (a.to(torch.float64) @ b.t().to(torch.float64)).to(torch.int32)
    raise ValueError(f"unknown int8 matmul path {path!r}")


def _flat_input(x: torch.Tensor, in_features: int, what: str) -> torch.Tensor:
    """Check x (..., in_features) and return it as float32 (T, in_features)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim == 0 or x.shape[-1] != in_features:
        kind = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise QuantizationError(
            f"{what}: expected a floating-point input (..., {in_features}) for a layer with {in_features} "
            f"input features, got {kind}"
        )
    return x.reshape(-1, in_features).to(torch.float32)


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """Add the bias to float32 y (T, out) and return it as x's dtype, shape (..., out)."""
    if bias is not None:
        if tuple(bias.shape) != (out_features,):
            raise QuantizationError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def _outlier_index(outlier_idx: torch.Tensor, in_features: int, device: torch.device) -> torch.Tensor:
    """Validate outlier indices and return them sorted, distinct, int64 (n,) on `device`."""
    idx = torch.as_tensor(outlier_idx)
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)  # torch.tensor([]) is float32: accept it
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool or idx.ndim != 1:
        raise QuantizationError(
            f"LLM.int8: outlier_idx must be a 1-D integer tensor, got {idx.dtype} {tuple(idx.shape)}"
        )
    idx = torch.unique(idx.to(device=device, dtype=torch.int64))  # sorted
    if int(idx[0]) < 0 or int(idx[-1]) >= in_features:
        raise QuantizationError(
            f"LLM.int8: outlier indices must lie in 0..{in_features - 1} (the input features), "
            f"got {int(idx[0])}..{int(idx[-1])}"
        )
    return idx


# ---------------------------------------------------------------------------------------------
# Whole models: calibration, and the tensors an LLM.int8 GGUF file holds

SCHEME_KEY = "kilnlm.quantization.scheme"  # "llm.int8" in files kilnlm alone can run
THRESHOLD_KEY = "kilnlm.llm_int8.threshold"
# Per linear layer "X" (kilnlm name "X.weight", GGUF "blk.N.attn_q.weight" as I8 codes), three more tensors:
EXTRA_TENSORS = ("int8_scale", "int8_outlier_idx", "int8_outlier_weight")


def is_linear_weight(name: str) -> bool:
    """Whether a kilnlm parameter is a decoder-block linear layer's weight (what LLM.int8 quantizes)."""
    return name.startswith("layers.") and name.endswith("_proj.weight")


class LLMInt8Quantizer:
    """LLM.int8 over a whole checkpoint (the writer's Quantizer protocol).

    One calibration pass pushes the samples through the blocks (original weights) and records, per input of
    each linear group, the max |activation| of every feature; features above the threshold become that
    layer's outlier columns. Every block linear is then stored as I8 codes + F32 row scales + I32 outlier
    indices + F16 outlier columns; everything else as the plan says (F16 / F32).
    """

    def __init__(self, ids: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, *, device: str | torch.device = "cpu",
                 on_layer=None):
        self.ids, self.threshold, self.device, self.on_layer = ids, threshold, device, on_layer
        self.outliers: dict[str, torch.Tensor] = {}  # linear weight name -> outlier columns
        self.metadata = {SCHEME_KEY: "llm.int8", THRESHOLD_KEY: float(threshold)}

    def plan(self, checkpoint, plan: list) -> list:
        """Calibrate, then replace each block linear by its codes and the three extra tensors (exact shapes)."""
        self._calibrate(checkpoint)
        from kilnlm.quant.formats import get_format

        planned = []
        for p in plan:
            if not is_linear_weight(p.name):
                planned.append(p)
                continue
            rows, n_out = p.shape[0], len(self.outliers[p.name])
            base, gguf_base = p.name.removesuffix(".weight"), p.gguf_name.removesuffix(".weight")
            planned.append(replace(p, format=get_format("i8")))
            extras = [("int8_scale", (rows,), "f32"), ("int8_outlier_idx", (n_out,), "i32"),
                      ("int8_outlier_weight", (rows, n_out), "f16")]
            planned += [replace(p, name=f"{base}.{suffix}", gguf_name=f"{gguf_base}.{suffix}", shape=shape,
                                format=get_format(fmt)) for suffix, shape, fmt in extras if n_out or suffix == "int8_scale"]
        return planned

    def quantized_tensors(self, checkpoint, plan: list):
        """Yield (planned tensor, packed tensor) in plan order."""
        from kilnlm.quant.formats import QuantizedTensor

        current: Int8Weight | None = None
        for p in plan:
            if is_linear_weight(p.name):
                current = quantize_llm_int8(checkpoint.tensor(p.name), self.outliers[p.name], self.threshold)
                values = current.weight_int8.to(torch.float32)
            elif p.name.endswith(EXTRA_TENSORS):
                values = {"int8_scale": current.row_scale, "int8_outlier_idx": current.outlier_idx.to(torch.float32),
                          "int8_outlier_weight": current.outlier_weight.to(torch.float32)}[p.name.rsplit(".", 1)[1]]
            else:
                values = checkpoint.tensor(p.name)
            yield p, QuantizedTensor.from_float(values, p.format)

    def _calibrate(self, checkpoint) -> None:
        from kilnlm.quant.calibration import LayerRunner

        runner = LayerRunner(checkpoint, self.ids, device=self.device)
        for index in range(checkpoint.config.num_layers):
            layer = runner.layer(index)
            for group in layer.linear_groups:
                tracker = OutlierTracker(layer.get_submodule(group[0]).in_features, device=runner.device)
                runner.observe(layer, group[0], tracker.add_batch)
                for module_name in group:
                    self.outliers[f"layers.{index}.{module_name}.weight"] = tracker.outlier_columns(self.threshold).cpu()
            runner.advance(layer)
            if self.on_layer is not None:
                self.on_layer(index, checkpoint.config.num_layers)


def llm_int8_quantizer(checkpoint, *, calib_files: list[str], nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                       model_samples: int | None = None, threshold: float = DEFAULT_THRESHOLD,
                       device: str | torch.device = "cpu",
                       on_layer=None) -> LLMInt8Quantizer:
    """An LLMInt8Quantizer with its calibration samples drawn (from `calib_files`, or generated by the model)."""
    from kilnlm.quant.calibration import load_calibration

    ids, _ = load_calibration(checkpoint, calib_files, nsamples, seqlen, seed, device, model_samples)
    return LLMInt8Quantizer(ids, threshold, device=device, on_layer=on_layer)
