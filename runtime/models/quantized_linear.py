"""Drop-in nn.Linear / nn.Embedding replacements that keep a GGUF file's weights packed, and the rule of which
weights stay packed on which device.

* CUDA: the Triton kernels (kernels.dequant_matmul) read Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K block linears
  repacked at load into planes (PackedWeight).
* CPU: the C kernels (kernels.cpu) read the file's own blocks (GGMLMatrix) for every block type up to Q6_K
  and for F16 / BF16 matrices, the token embedding and the output matrix included, so memory after load is the
  file's tensor bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kilnlm import kernels
from kilnlm.kernels.dequant_matmul import PackedWeight, kernel_bytes, pack_for_kernel
from kilnlm.kernels.cpu import CpuOptions, GGMLMatrix, ggml_embedding, supports
from kilnlm.quant.formats import QuantizedTensor, WeightFormat

CUDA_PACKED_FORMATS = ("q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k")  # what kernels.dequant_matmul reads


def keeps_packed(device: torch.device, name: str, fmt: WeightFormat, shape: Sequence[int]) -> bool:
    """Whether the runtime on `device` multiplies through matrix `name` as stored in `fmt` (else dequantises it)."""
    if fmt.gguf_type is None or len(shape) != 2 or not name.endswith(".weight"):
        return False
    if device.type == "cuda":
        return fmt.name in CUDA_PACKED_FORMATS and name.startswith("layers.")
    # block types whose rows split into whole blocks, and 16-bit floats of any width; float32 stays a torch tensor
    # (the kernels would hold the same bytes, and files keep non-linear matrices such as Mamba's conv in F32)
    return device.type == "cpu" and fmt.name != "f32" and supports(int(fmt.gguf_type), int(shape[1]))


def packed_bytes(device: torch.device, fmt: WeightFormat, shape: Sequence[int]) -> int:
    """Bytes a matrix kept packed takes on `device`: the Triton kernels' planes, or the file's blocks on the CPU."""
    if device.type == "cuda":
        return kernel_bytes(fmt.name, tuple(shape))
    return math.prod(fmt.packed_shape(shape))


def cpu_matrix(tensor: QuantizedTensor) -> GGMLMatrix:
    """A QuantizedTensor as the CPU kernels' GGMLMatrix (the same bytes, no copy)."""
    fmt, (rows, cols) = tensor.format, tensor.shape
    return GGMLMatrix(int(fmt.gguf_type), (rows, cols), tensor.data.contiguous(),
                      lambda data: fmt.dequantize(data, (data.shape[0], cols)))


class QuantizedLinear(nn.Module):
    """y = x · dequant(W)ᵀ + b with W kept packed: Triton planes on CUDA (PackedWeight), ggml blocks on the CPU
    (GGMLMatrix, multiplied as `cpu` says)."""

    def __init__(self, weight: PackedWeight | GGMLMatrix, bias: torch.Tensor | None = None,
                 cpu: CpuOptions = CpuOptions()):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.cpu = cpu
        # Buffers so that state_dict() shows them and .to(device) moves them; the weight view is rebuilt after a move.
        if isinstance(weight, GGMLMatrix):
            self.register_buffer("qweight", weight.data)
        else:
            self.fmt, self.group = weight.fmt, weight.group
            self.register_buffer("qweight", weight.qweight)
            self.register_buffer("scales", weight.scales)
            self.register_buffer("mins", weight.mins)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._weight = weight
        self._group: FusedLinears | None = None  # set by fuse_linears

    @classmethod
    def from_quantized(cls, tensor: QuantizedTensor, device: torch.device, bias: torch.Tensor | None = None,
                       cpu: CpuOptions = CpuOptions()) -> QuantizedLinear:
        """A ggml QuantizedTensor (HF row order) placed on `device` in the layout its kernels read."""
        if device.type == "cpu":
            return cls(cpu_matrix(tensor), bias, cpu)
        return cls(pack_for_kernel(tensor.data, tensor.format.name, tensor.shape).to(device), bias)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if isinstance(self._weight, GGMLMatrix):
            if self.qweight.device.type != "cpu":
                raise ValueError("a linear loaded packed for the CPU cannot move to another device; load the file "
                                 "on the device it should run on")
            self._weight = GGMLMatrix(self._weight.ggml_type, self._weight.shape, self.qweight,
                                      self._weight.dequantize)
        else:
            self._weight = PackedWeight(self.fmt, (self.out_features, self.in_features), self.qweight, self.scales,
                                        self.mins, self.group)
        return module

    def fuse(self, group: FusedLinears, index: int) -> None:
        """Multiply as row block `index` of `group` from now on; this module's own copy of the bytes is released."""
        start = sum(group.sizes[:index])
        self.qweight = group.matrix.data[start:start + self.out_features]
        self._weight = GGMLMatrix(group.matrix.ggml_type, (self.out_features, self.in_features), self.qweight,
                                  group.matrix.dequantize)
        self._group, self._index = group, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._group is not None:
            y = self._group.output(self._index, x)
        else:
            y = kernels.packed_matmul(x, self._weight, self.cpu)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantizedEmbedding(nn.Module):
    """nn.Embedding over a matrix kept in ggml blocks on the CPU: looked-up rows are dequantised to `dtype`."""

    def __init__(self, matrix: GGMLMatrix, dtype: torch.dtype, cpu: CpuOptions = CpuOptions()):
        super().__init__()
        self.num_embeddings, self.embedding_dim = matrix.shape
        self.register_buffer("qweight", matrix.data)
        self.matrix, self.dtype, self.cpu = matrix, dtype, cpu

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ggml_embedding(ids, self.matrix, self.cpu).to(self.dtype)

    def as_linear(self) -> QuantizedLinear:
        """The same bytes as an output projection (a tied LM head), sharing the memory."""
        return QuantizedLinear(self.matrix, cpu=self.cpu)


class FusedLinears:
    """Linears that read the same input, multiplied as one matrix (their rows stacked): one pass of the kernel and
    its threads per token instead of one per linear (q, k, v; gate, up). Each member stays a module of the model,
    so the model files do not change: the first member called with an input computes every member's output, and
    the others take theirs when called with that same input tensor."""

    def __init__(self, members: list[QuantizedLinear]):
        first = members[0]._weight
        data = torch.cat([m._weight.data for m in members])
        sizes = [m.out_features for m in members]
        self.matrix = GGMLMatrix(first.ggml_type, (sum(sizes), first.shape[1]), data,
                                 first.dequantize)
        self.cpu, self.sizes = members[0].cpu, sizes
        self._input: torch.Tensor | None = None
        self._outputs: list[torch.Tensor | None] = []

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s output for x (computed for all members when x is new)."""
        if x is not self._input or self._outputs[index] is None:
            self._input = x
            self._outputs = list(kernels.packed_matmul(x, self.matrix, self.cpu).split(self.sizes, dim=-1))
        out, self._outputs[index] = self._outputs[index], None
        if all(o is None for o in self._outputs):
            self._input = None  # every member has its output: hold no tensors between steps
        return out


def fuse_linears(model: nn.Module) -> int:
    """Stack the CPU-packed linears of each block's `linear_groups` that share a ggml type (and have no bias) into
    FusedLinears; the number of groups fused."""
    fused = 0
    for block in getattr(model, "layers", ()):
        for group in getattr(type(block), "linear_groups", ()):
            members = [block.get_submodule(name) for name in group]
            by_type: dict[int, list[QuantizedLinear]] = {}
            for member in members:
                if isinstance(member, QuantizedLinear) and isinstance(member._weight, GGMLMatrix) and \
                        member.bias is None:
                    by_type.setdefault(member._weight.ggml_type, []).append(member)
            for same in by_type.values():
                if len(same) > 1:
                    shared = FusedLinears(same)
                    for index, member in enumerate(same):
                        member.fuse(shared, index)
                    fused += 1
    return fused
