"""`kiln bench`: prefill and decode speed, peak memory, and decode as a share of the memory roofline.

Decode of one sequence is memory-bound: every token reads every weight once, so the best possible rate is
(memory bandwidth) / (bytes of weights read per token). The bandwidth is measured in the same run with a
large device-to-device copy, so the ratio is honest for the machine it runs on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from kilnlm.runtime.config import ModelConfig, SSMConfig

_LLAMA = dict(architecture="llama", max_position_embeddings=4096, rope_theta=500000.0)
_MAMBA = dict(intermediate_size=0, num_heads=0, num_kv_heads=0, head_dim=0, max_position_embeddings=1 << 20,
              rms_norm_eps=1e-5, vocab_size=50280, tie_word_embeddings=True)
SHAPES = {  # public checkpoints' sizes (random weights: no download)
    "llama-1b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                     head_dim=64, vocab_size=128256, tie_word_embeddings=True),  # Llama 3.2 1B
    "llama-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                     head_dim=128, vocab_size=128256, tie_word_embeddings=False),  # Llama 3.1 8B
    "llama-3b": dict(_LLAMA, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8,
                     head_dim=128, vocab_size=128256, tie_word_embeddings=True),  # Llama 3.2 3B
    # A GPT-2-small-sized Llama (124M parameters, Mamba-130m's vocabulary): the transformer beside mamba-130m.
    "llama-130m": dict(_LLAMA, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                       num_kv_heads=12, head_dim=64, vocab_size=50280, tie_word_embeddings=True),
    # state-spaces/mamba-130m-hf, mamba-2.8b-hf, mamba2-130m and mamba2-2.7b
    "mamba-130m": dict(_MAMBA, architecture="mamba", hidden_size=768, num_layers=24,
                       ssm=SSMConfig(version=1, inner_size=1536, state_size=16, conv_kernel=4, time_step_rank=48)),
    "mamba-2.8b": dict(_MAMBA, architecture="mamba", hidden_size=2560, num_layers=64,
                       ssm=SSMConfig(version=1, inner_size=5120, state_size=16, conv_kernel=4, time_step_rank=160)),
    "mamba2-130m": dict(_MAMBA, architecture="mamba2", hidden_size=768, num_layers=24,
                        ssm=SSMConfig(version=2, inner_size=1536, state_size=128, conv_kernel=4, time_step_rank=24)),
    "mamba2-2.7b": dict(_MAMBA, architecture="mamba2", hidden_size=2560, num_layers=64,
                        ssm=SSMConfig(version=2, inner_size=5120, state_size=128, conv_kernel=4, time_step_rank=80)),
    # Few-MB shapes that run anywhere in seconds: for --dry-run checks of the harness itself.
    "tiny": dict(_LLAMA, hidden_size=256, intermediate_size=704, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=64, vocab_size=2048, tie_word_embeddings=True),
    "tiny-mamba": dict(_MAMBA, architecture="mamba2", hidden_size=256, num_layers=2, vocab_size=2048,
                       ssm=SSMConfig(version=2, inner_size=512, state_size=64, conv_kernel=4, time_step_rank=8)),
}


@dataclass
class BenchResult:
    """What one benchmark run measured."""

    device: str
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    weight_bytes: int
    bandwidth_gb_per_s: float
    peak_memory_bytes: int | None
    kv_bytes: int = 0  # the cache of prompt + new tokens: keys and values, or the recurrent state

    @property
    def roofline_tokens_per_s(self) -> float:
        """Decode rate if every token only read the weights at the measured bandwidth."""
        return self.bandwidth_gb_per_s * 1e9 / self.weight_bytes

    @property
    def roofline_share(self) -> float:
        """Measured decode rate / roofline rate."""
        return self.decode_tokens_per_s / self.roofline_tokens_per_s

    def as_dict(self) -> dict:
        """Fields plus the derived roofline figures, for --json."""
        return {**asdict(self), "roofline_tokens_per_s": self.roofline_tokens_per_s,
                "roofline_share": self.roofline_share}


def synthetic_config(shape: str) -> ModelConfig:
    """The ModelConfig of a named size."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return ModelConfig(**SHAPES[shape])


def synthetic_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model for `config` with random weights (std 0.02), built directly on `device`."""
    from kilnlm.runtime.models import expected_shapes, build_model

    generator = torch.Generator(device="cpu").manual_seed(0)

    def tensors():
        for name, shape in expected_shapes(config).items():
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape)
            else:
                yield name, torch.randn(shape, generator=generator) * 0.02

    return build_model(config, tensors(), device=device, dtype=dtype, source="synthetic")


def weight_bytes(model: nn.Module) -> int:
    """Memory held by the model's weights (an ONNX model's are in its onnxruntime session and files)."""
    from kilnlm.runtime.onnx_decoder import OnnxDecoder

    if isinstance(model, OnnxDecoder):
        return model.weight_bytes()
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes decode reads per token: every parameter and buffer of the layers and head (one embedding row only)."""
    from kilnlm.runtime.onnx_decoder import OnnxDecoder

    total = weight_bytes(model)
    if isinstance(model, OnnxDecoder):  # its files' size, the whole embedding table included
        return total
    if not model.config.tie_word_embeddings:  # an untied embedding table is only read one row per token
        embedding = model.embed_tokens
        total -= sum(t.numel() * t.element_size() for t in list(embedding.parameters()) + list(embedding.buffers()))
    return total


def measure_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second), the best of `repeats` copies."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() / best / 1e9


def run_bench(model: nn.Module, *, prompt_tokens: int = 512, new_tokens: int = 128,
              kv_options: dict | None = None, bandwidth: bool = True) -> BenchResult:
    """Time one prefill of `prompt_tokens` and `new_tokens` greedy decode steps, batch 1.

    kv_options: k_type / v_type / kv_rotation of the KV cache (see runtime.cache.new_kv_cache).
    bandwidth: measure the copy bandwidth too (0 without: it allocates 512 MiB, which a caller measuring resident
    memory may not want).
    """
    kv_options = dict(kv_options or {})
    if "kv_rotation" in kv_options:
        kv_options["rotate"] = kv_options.pop("kv_rotation")
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        _timed_generation(model, prompt[:, :8], 2, kv_options)  # warm-up: kernels compiled, allocator primed
        prefill_s, decode_s, kv_bytes = _timed_generation(model, prompt, new_tokens, kv_options)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return BenchResult(
        device=str(device), prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        prefill_tokens_per_s=prompt_tokens / prefill_s, decode_tokens_per_s=new_tokens / decode_s,
        weight_bytes=weight_bytes_per_token(model), bandwidth_gb_per_s=measure_bandwidth(device) if bandwidth else 0.0,
        peak_memory_bytes=peak, kv_bytes=kv_bytes,
    )


def _timed_generation(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                      kv_options: dict) -> tuple[float, float, int]:
    device = prompt.device
    cache = model.new_cache(prompt.shape[1] + new_tokens, **kv_options)
    _sync(device)
    started = time.perf_counter()
    logits = model(prompt, cache, last_logits_only=True)
    token = logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = model(token, cache)[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return prefill, time.perf_counter() - started, cache.nbytes()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_timer(device: torch.device):
    """fn, repeats -> the median seconds of `repeats` runs after one warm-up (CUDA events on the GPU)."""

    def run(fn, repeats: int) -> float:
        fn()  # warm-up (compilation)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    return run
