"""A drop-in replacement for nn.Linear that runs an LLM.int8 weight (codes, row scales, fp16 outliers)."""

from __future__ import annotations

import torch
from torch import nn

from kilnlm import kernels
from kilnlm.quant.llm_int8 import Int8Weight


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as LLM.int8 data; the forward is the paper's mixed-precision decomposition."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.threshold = weight.threshold
        # Buffers so that .to(device) moves them; the Int8Weight view is rebuilt after any move.
        self.register_buffer("weight_int8", weight.weight_int8)
        self.register_buffer("row_scale", weight.row_scale)
        self.register_buffer("outlier_idx", weight.outlier_idx)
        self.register_buffer("outlier_weight", weight.outlier_weight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._weight = weight

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._weight = Int8Weight(self.weight_int8, self.row_scale, self.outlier_idx, self.outlier_weight,
                                  self.threshold)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_linear(x, self._weight, self.bias)


def use_int8_linears(model: nn.Module, weights: dict[str, Int8Weight]) -> None:
    """Replace each nn.Linear whose weight name is in `weights` by an Int8Linear (the bias is kept)."""
    for name, weight in weights.items():
        owner_name, _, linear_name = name.removesuffix(".weight").rpartition(".")
        owner = model.get_submodule(owner_name)
        linear = getattr(owner, linear_name)
        device = linear.weight.device
        moved = Int8Weight(weight.weight_int8.to(device), weight.row_scale.to(device), weight.outlier_idx.to(device),
                           weight.outlier_weight.to(device), weight.threshold)
        setattr(owner, linear_name, Int8Linear(moved, linear.bias))
