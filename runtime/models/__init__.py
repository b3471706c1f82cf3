"""Model families, one readable file each, and the one place that builds a model from named tensors."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable

import torch
from torch import nn

from kilnlm.errors import CheckpointError
from kilnlm.kernels.cpu import CpuOptions
from kilnlm.runtime.models.quantized_linear import fuse_linears
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


class on_meta(torch.overrides.TorchFunctionMode):
    """Build modules on the meta device (shapes, no memory) without running their random init: meta tensors hold
    no values, and torch's meta kernels of normal_ / uniform_ are Python decompositions whose first call imports
    torch._dynamo and sympy (about 1 s and 70 MiB of resident memory, for nothing)."""

    _INITS = frozenset({torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.trunc_normal_,
                        torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_, torch.Tensor.normal_,
                        torch.Tensor.uniform_})

    def __enter__(self):
        self._device = torch.device("meta")
        self._device.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._device.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._INITS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name of the model for `config`, with its shape (built on the meta device: no memory)."""
    with on_meta():
        model = MODEL_CLASSES[config.architecture](config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def build_model(
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
    cpu: CpuOptions = CpuOptions(),
) -> nn.Module:
    """Instantiate the model for `config` and fill it from (name, tensor) pairs, one tensor in memory at a time.

    QuantizedTensor values stay packed (runtime.models.quantized_linear): linears as QuantizedLinear, and on the
    CPU the token embedding as QuantizedEmbedding (a tied LM head then shares its bytes), multiplying as `cpu` says."""
    with on_meta():
        model = MODEL_CLASSES[config.architecture](config)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in tensors:
        if name not in params:
            continue  # e.g. rotary inv_freq buffers that some exporters save
        if isinstance(tensor, QuantizedTensor):
            _use_quantized(model, name, tensor, torch.device(device), dtype, cpu)
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
    fuse_linears(model)  # CPU-packed linears that share an input become one matmul (no-op elsewhere)
    _return_freed_heap()
    return model.eval()


def _return_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). Loading frees staging
    copies (each tensor as read, the members of a fused matrix) of sizes under glibc's mmap threshold, which
    otherwise stay resident: 248 MiB after loading a 1B-parameter F16 GGUF, 72 MiB for its Q4_0 file."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # a libc without malloc_trim (musl)
        pass


def _use_quantized(model: nn.Module, name: str, weight: QuantizedTensor, device: torch.device, dtype: torch.dtype,
                   cpu: CpuOptions) -> None:
    """Replace the nn.Linear (or, on the CPU, nn.Embedding) owning `name` by its packed form; a linear's bias, if
    any, is loaded separately."""
    from kilnlm.runtime.models.quantized_linear import QuantizedEmbedding, QuantizedLinear, cpu_matrix

    owner_name, _, module_name = name.removesuffix(".weight").rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    module = getattr(owner, module_name)
    if isinstance(module, nn.Embedding) and device.type == "cpu":
        expected = (module.num_embeddings, module.embedding_dim)
    elif isinstance(module, nn.Linear):
        expected = (module.out_features, module.in_features)
    else:
        raise CheckpointError(f"tensor {name!r} is stored packed but {type(module).__name__} cannot use it packed "
                              f"on {device}")
    if tuple(weight.shape) != expected:
        raise CheckpointError(f"tensor {name!r} has shape {weight.shape}, expected {expected} from the model config")
    if isinstance(module, nn.Embedding):
        embedding = QuantizedEmbedding(cpu_matrix(weight), dtype, cpu)
        setattr(owner, module_name, embedding)
        if getattr(model, "lm_head", False) is None:  # tied: the output projection reads the same bytes
            model.lm_head = embedding.as_linear()
        return
    quantized = QuantizedLinear.from_quantized(weight, device, cpu=cpu)
    quantized.bias = module.bias  # still on meta here; a bias tensor later in the stream replaces it
    setattr(owner, module_name, quantized)


def _assign(model: nn.Module, name: str, value: nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner_name), attr, value)
