"""A drop-in nn.Linear replacement that keeps a ggml-quantized weight packed and multiplies through it."""

from __future__ import annotations

import torch
from torch import nn

from kilnlm import kernels
from kilnlm.kernels.dequant_matmul import PackedWeight, pack_for_kernel
from kilnlm.quant.formats import QuantizedTensor


class QuantizedLinear(nn.Module):
    """y = x · dequant(W)ᵀ + b with W in Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K, repacked once into the
    kernel's planes."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.fmt, self.group = weight.fmt, weight.group
        # Buffers so that .to(device) moves them and state_dict() shows them; the PackedWeight view is
        # rebuilt after any move.
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("mins", weight.mins)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._weight = weight

    @classmethod
    def from_quantized(cls, tensor: QuantizedTensor, device: torch.device, bias: torch.Tensor | None = None):
        """Repack a ggml QuantizedTensor (HF row order) for the kernels and place it on `device`."""
        return cls(pack_for_kernel(tensor.data, tensor.format.name, tensor.shape).to(device), bias)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._weight = PackedWeight(self.fmt, (self.out_features, self.in_features), self.qweight, self.scales,
                                    self.mins, self.group)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.packed_matmul(x, self._weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)
