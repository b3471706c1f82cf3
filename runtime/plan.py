"""Memory plans: what loading a model would take (weights, KV cache per token and in total, activations, the CUDA
context and a margin) without loading it, and the largest context that fits the free memory of a device.

Engine.plan() and `kiln plan` print a plan; Engine.load() on CUDA without an explicit context uses it to pick
the largest context (up to the model's) that fits, and refuses before allocating anything when even the
weights do not fit, naming the sizes and the options that would help. The free-memory figure can be given
(`free_bytes=`) so that all of this is testable without a GPU.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass

import torch

from kilnlm.errors import KilnError
from kilnlm.runtime.config import ModelConfig

MiB = 1 << 20
CUDA_CONTEXT = 400 * MiB  # the CUDA runtime, cuBLAS workspaces and the Triton/torch allocator's first pools
MARGIN_SHARE, MIN_MARGIN = 0.05, 256 * MiB  # kept free for fragmentation and other processes' growth
# Bytes per key or value element of each KV cache type (ggml blocks of 32: fp16 scale + codes).
KV_ELEMENT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


class OutOfMemoryPlanError(KilnError):
    """The model (or the asked context) does not fit the device's free memory."""


@dataclass
class MemoryPlan:
    """Bytes a loaded model needs on its device."""

    device: str
    weights: int
    kv_per_token: float  # per sequence, for the attention layers (window layers counted up to their window)
    context_length: int
    parallel: int
    kv_cache: int
    recurrent_state: int
    activations: int
    cuda_context: int
    margin: int
    free: int | None  # the device's free memory when planned (None: not known, e.g. the CPU)

    @property
    def total(self) -> int:
        """Everything the plan counts."""
        return (self.weights + self.kv_cache + self.recurrent_state + self.activations + self.cuda_context
                + self.margin)

    @property
    def fits(self) -> bool | None:
        """Whether the total fits the free memory (None when the free memory is not known)."""
        return None if self.free is None else self.total <= self.free

    def as_dict(self) -> dict:
        """Fields and totals, for --json."""
        return {**asdict(self), "total": self.total, "fits": self.fits}

    def describe(self) -> str:
        """A few lines for people."""
        def mib(n: float) -> str:
            return f"{n / MiB:10.1f} MiB"

        lines = [f"memory plan on {self.device} ({self.parallel} sequence(s) of {self.context_length} tokens)",
                 f"  weights          {mib(self.weights)}",
                 f"  KV cache         {mib(self.kv_cache)}  ({self.kv_per_token / 1024:.1f} KiB per token)",
                 f"  recurrent state  {mib(self.recurrent_state)}",
                 f"  activations      {mib(self.activations)}",
                 f"  CUDA context     {mib(self.cuda_context)}",
                 f"  margin           {mib(self.margin)}",
                 f"  total            {mib(self.total)}"]
        if self.free is not None:
            lines.append(f"  free             {mib(self.free)}  -> {'fits' if self.fits else 'does NOT fit'}")
        return "\n".join(lines)


def kv_bytes_per_token(config: ModelConfig, k_type: str | None, v_type: str | None, dtype: torch.dtype) -> float:
    """Key + value bytes one position takes over all attention layers (window layers: see kv_bytes)."""
    model_type = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    per_element = KV_ELEMENT_BYTES[k_type or model_type] + KV_ELEMENT_BYTES[v_type or model_type]
    layers = sum(kind == "attention" for kind in config.layer_kinds())
    return layers * config.num_kv_heads * config.head_dim * per_element


def kv_bytes(config: ModelConfig, context: int, k_type: str | None, v_type: str | None, dtype: torch.dtype) -> int:
    """KV cache bytes of one sequence of `context` positions (a sliding-window layer holds at most its window plus
    a prefill chunk and the rollback margin, as runtime.cache allocates it)."""
    from kilnlm.runtime.cache import PREFILL_CHUNK, ROLLBACK_MARGIN

    per_layer = kv_bytes_per_token(config, k_type, v_type, dtype) / max(
        1, sum(kind == "attention" for kind in config.layer_kinds()))
    total = 0.0
    for layer, kind in enumerate(config.layer_kinds()):
        if kind != "attention":
            continue
        window = config.window_for_layer(layer)
        positions = context if window is None else min(context, window - 1 + ROLLBACK_MARGIN + PREFILL_CHUNK)
        total += per_layer * positions
    return int(total)


def recurrent_bytes(config: ModelConfig) -> int:
    """float32 conv + SSM state of one sequence over all Mamba layers (constant in the context)."""
    if config.ssm is None:
        return 0
    ssm = config.ssm
    per_layer = ssm.conv_channels * (ssm.conv_kernel - 1) + int(torch.tensor(ssm.state_shape).prod())
    return 4 * per_layer * sum(kind == "mamba" for kind in config.layer_kinds())


def activation_bytes(config: ModelConfig, dtype: torch.dtype, parallel: int) -> int:
    """A prefill chunk's largest live tensors: hidden states, the MLP's or mixer's inner width, fp32 logits."""
    from kilnlm.runtime.cache import PREFILL_CHUNK

    width = max(config.intermediate_size, config.ssm.inner_size * 2 if config.ssm else 0)
    per_token = (4 * config.hidden_size + 3 * width) * torch.finfo(dtype).bits // 8
    return PREFILL_CHUNK * per_token + parallel * config.vocab_size * 4


def make_plan(config: ModelConfig, weights: int, *, device: torch.device, dtype: torch.dtype, context: int,
              parallel: int = 1, k_type: str | None = None, v_type: str | None = None,
              free: int | None = None) -> MemoryPlan:
    """The memory plan of `config` with `weights` bytes of weights on `device`."""
    cuda = device.type == "cuda"
    plan = MemoryPlan(
        device=str(device), weights=weights, kv_per_token=kv_bytes_per_token(config, k_type, v_type, dtype),
        context_length=context, parallel=parallel,
        kv_cache=parallel * kv_bytes(config, context, k_type, v_type, dtype),
        recurrent_state=parallel * recurrent_bytes(config), activations=activation_bytes(config, dtype, parallel),
        cuda_context=CUDA_CONTEXT if cuda else 0, margin=0, free=free)
    plan.margin = max(MIN_MARGIN, int(MARGIN_SHARE * plan.total)) if cuda else 0
    return plan


def fit_context(config: ModelConfig, weights: int, *, device: torch.device, dtype: torch.dtype, free: int,
                parallel: int = 1, k_type: str | None = None, v_type: str | None = None,
                longest: int | None = None, source: str = "") -> MemoryPlan:
    """The plan with the largest context (up to `longest`, default the model's) that fits `free` bytes.

    Raises OutOfMemoryPlanError, naming the sizes and what would help, when not even a short context fits.
    """
    longest = longest or config.max_position_embeddings
    smallest = min(256, longest)
    plan = make_plan(config, weights, device=device, dtype=dtype, context=smallest, parallel=parallel,
                     k_type=k_type, v_type=v_type, free=free)
    if not plan.fits:
        raise OutOfMemoryPlanError(
            f"{source}: {plan.total / MiB:.0f} MiB are needed even for a {smallest}-token context "
            f"(weights {weights / MiB:.0f} MiB) but {device} has {free / MiB:.0f} MiB free; use a smaller weight "
            "type (--type q4_0 when quantizing), a quantized KV cache (--cache-type-k/-v q8_0), fewer --parallel "
            "sequences, or another device")
    low, high = smallest, longest
    while low < high:  # the largest context whose plan fits
        middle = (low + high + 1) // 2
        if make_plan(config, weights, device=device, dtype=dtype, context=middle, parallel=parallel,
                     k_type=k_type, v_type=v_type, free=free).fits:
            low = middle
        else:
            high = middle - 1
    return make_plan(config, weights, device=device, dtype=dtype, context=low, parallel=parallel, k_type=k_type,
                     v_type=v_type, free=free)


def checkpoint_weight_bytes(checkpoint, dtype: torch.dtype, packed_on: torch.device | None) -> int:
    """Bytes the model's weights take once loaded: matrices the runtime on `packed_on` keeps packed at their packed
    size (runtime.models.quantized_linear.keeps_packed), the rest in `dtype`."""
    from kilnlm.runtime.models import expected_shapes
    from kilnlm.runtime.models.quantized_linear import keeps_packed, packed_bytes

    element = torch.finfo(dtype).bits // 8
    stored_format = getattr(checkpoint, "tensor_format", None)  # GGUF checkpoints know their stored formats
    total = 0
    for name, shape in expected_shapes(checkpoint.config).items():
        fmt = stored_format(name) if packed_on is not None and stored_format is not None else None
        if fmt is not None and keeps_packed(packed_on, name, fmt, shape):
            total += packed_bytes(packed_on, fmt, shape)
        else:
            total += math.prod(shape) * element
    return total
