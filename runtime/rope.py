"""RoPE frequencies for every scaling type HF configs use: default, linear, dynamic (NTK), yarn, llama3.

The formulas follow the papers as transformers implements them, so logits match HF to fp32 precision.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kilnlm.runtime.config import ModelConfig


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (base**exponents)


def _llama3_inv_freq(config: ModelConfig, dim: int) -> torch.Tensor:
    scaling = config.rope_scaling
    inv_freq = _base_inv_freq(config.rope_theta, dim)
    old_context = scaling.original_max_position_embeddings or config.max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(config: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    scaling = config.rope_scaling
    base, factor = config.rope_theta, scaling.factor
    original_max = scaling.original_max_position_embeddings or config.max_position_embeddings
    if scaling.attention_factor is not None:
        attention_factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, scaling.mscale) / _yarn_mscale(factor, scaling.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, attention_factor


def _dynamic_inv_freq(config: ModelConfig, dim: int, seq_len: int) -> torch.Tensor:
    max_pos = config.max_position_embeddings
    if seq_len <= max_pos:
        return _base_inv_freq(config.rope_theta, dim)
    factor = config.rope_scaling.factor
    base = config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim)


def rope_frequencies(config: ModelConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the factor cos/sin are scaled by, for sequences of `seq_len` tokens."""
    inv_freq, attention_factor = _scaled_frequencies(config, seq_len)
    factors = config.rope_scaling.freq_factors
    if factors is not None:
        if len(factors) != inv_freq.numel():
            raise ValueError(f"rope freq_factors has {len(factors)} entries, expected {inv_freq.numel()}")
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32, device="cpu")
    return inv_freq, attention_factor


def _scaled_frequencies(config: ModelConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    dim, kind = config.head_dim, config.rope_scaling.type
    if kind == "default":
        return _base_inv_freq(config.rope_theta, dim), 1.0
    if kind == "linear":
        return _base_inv_freq(config.rope_theta, dim) / config.rope_scaling.factor, 1.0
    if kind == "dynamic":
        return _dynamic_inv_freq(config, dim, seq_len), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(config, dim), 1.0
    return _yarn_inv_freq(config, dim)


class RotaryEmbedding(nn.Module):
    """Produces the (T, head_dim) cos/sin tables for a run of positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_frequencies(config, config.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, start: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (fp32) for positions start .. start + length - 1: (T, D) tables, or (B, T, D) when `start`
        is a tensor of per-sequence starts (a batch of sequences at different lengths)."""
        inv_freq = self.inv_freq
        end = int(start.max()) + length if isinstance(start, torch.Tensor) else start + length
        if self.config.rope_scaling.type == "dynamic" and end > self.config.max_position_embeddings:
            # NTK-aware scaling grows with the sequence; earlier cached keys keep their rotation, as in HF.
            inv_freq = rope_frequencies(self.config, end)[0].to(inv_freq.device)
        steps = torch.arange(length, device=inv_freq.device, dtype=torch.float32)
        if isinstance(start, torch.Tensor):
            positions = start.to(inv_freq.device, torch.float32)[:, None] + steps  # (B, T)
        else:
            positions = steps + start
        freqs = positions[..., None] * inv_freq  # (..., T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
