"""Model families, one readable file each, and the one place that builds a model from named tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kilnlm.errors import CheckpointError
from kilnlm.quant.formats import QuantizedTensor
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.models.granite_hybrid import GraniteHybridModel
from kilnlm.runtime.models.llama import LlamaModel
from kilnlm.runtime.models.mamba import MambaModel

# Every family exposes the same seams: `layers` (blocks called as block(x, context, cache)), the static
# `make_block(config, i)` and `block_context(config, start, length, device)`, each block's `linear_groups`,
# `prepare(device)` after loading and `new_cache(...)`; calibration and tuning use nothing else.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
    "mamba": MambaModel,
    "mamba2": MambaModel,
    "granitehybrid": GraniteHybridModel,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The family class that builds a model with `config`."""
    return MODEL_CLASSES[config.architecture]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name of the model for `config`, with its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = MODEL_CLASSES[config.architecture](config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def build_model(
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
) -> nn.Module:
    """Instantiate the model for `config` and fill it from (name, tensor) pairs, one tensor in memory at a time."""
    with torch.device("meta"):
        model = MODEL_CLASSES[config.architecture](config)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in tensors:
        if name not in params:
            continue  # e.g. rotary inv_freq buffers that some exporters save
        if isinstance(tensor, QuantizedTensor):
            _use_quantized_linear(model, name, tensor, torch.device(device))
            loaded.add(name)
            continue
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)} "
                "from the model config"
            )
        _assign(model, name, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{source}: missing tensors {shown}")
    model.prepare(torch.device(device))
    return model.eval()


def _use_quantized_linear(model: nn.Module, name: str, weight: QuantizedTensor, device: torch.device) -> None:
    """Replace the nn.Linear owning `name` by a QuantizedLinear (its bias, if any, is loaded separately)."""
    from kilnlm.runtime.models.quantized_linear import QuantizedLinear

    owner_name, _, linear_name = name.removesuffix(".weight").rpartition(".")
    owner = model.get_submodule(owner_name)
    linear = getattr(owner, linear_name)
    if tuple(weight.shape) != (linear.out_features, linear.in_features):
        raise CheckpointError(f"tensor {name!r} has shape {weight.shape}, expected "
                              f"{(linear.out_features, linear.in_features)} from the model config")
    quantized = QuantizedLinear.from_quantized(weight, device)
    quantized.bias = linear.bias  # still on meta here; a bias tensor later in the stream replaces it
    setattr(owner, linear_name, quantized)


def _assign(model: nn.Module, name: str, value: nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner_name), attr, value)
