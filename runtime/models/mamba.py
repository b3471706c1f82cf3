"""The Mamba family in one file: Mamba-1 (transformers' MambaForCausalLM, and Falcon-Mamba's RMS-normed dt, B, C)
and Mamba-2 (Mamba2ForCausalLM: heads, groups, dt bias, gated RMSNorm per group).

Reads top to bottom like the papers: token embedding, N x [RMSNorm -> Mamba mixer -> residual], final RMSNorm,
LM head. The residual stream is kept in float32 (`residual_in_fp32`, true for every released checkpoint).
Each mixer runs a whole prompt and a single decode token through the same kernels (kilnlm.kernels), taking its
conv and SSM state from the cache and writing back the state after the tokens it ran.
Parameter names follow Hugging Face's with "backbone." dropped and the embedding and final norm named as in
the Llama file (embed_tokens, norm), so readers, calibration and the GGUF names treat every family alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kilnlm import kernels
from kilnlm.runtime.cache import Cache, LayerCache, new_kv_cache
from kilnlm.runtime.config import ModelConfig, SSMConfig
from kilnlm.runtime.models.llama import RMSNorm
from kilnlm.runtime.kv_stores import CacheTypeError
from kilnlm.runtime.state_cache import StateStore


def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim (Falcon-Mamba's norm of dt, B and C, which has no learned scale)."""
    return kernels.rms_norm(x, x.new_ones(x.shape[-1]), eps)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time, the weights laid out as HF's nn.Conv1d keeps them: (C, 1, K)."""

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """SiLU(conv(x)) for x (B, T, C) after the inputs in `state` (B, C, K-1); returns it and the new state."""
        return kernels.causal_conv1d(x, self.weight[:, 0], self.bias, state)


class Mamba1Mixer(nn.Module):
    """Selective SSM (Gu & Dao 2023): in_proj -> x, z; conv1d + SiLU; x_proj -> dt, B, C; dt_proj; scan; out_proj."""

    def __init__(self, ssm: SSMConfig, hidden_size: int):
        super().__init__()
        self.ssm = ssm
        inner, rank, n = ssm.inner_size, ssm.time_step_rank, ssm.state_size
        self.in_proj = nn.Linear(hidden_size, 2 * inner, bias=ssm.proj_bias)
        self.conv1d = CausalConv1d(inner, ssm.conv_kernel, ssm.conv_bias)
        self.x_proj = nn.Linear(inner, rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, n))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, hidden_size, bias=ssm.proj_bias)

    def forward(self, hidden: torch.Tensor, state: StateStore | None) -> torch.Tensor:
        ssm = self.ssm
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, T, inner) each
        x, conv_state = self.conv1d(x, None if state is None else state.conv)
        dt, B, C = self.x_proj(x).split([ssm.time_step_rank, ssm.state_size, ssm.state_size], dim=-1)
        if ssm.dt_b_c_rms:
            dt, B, C = (weightless_rms_norm(t, ssm.mixer_rms_eps) for t in (dt, B, C))
        dt = self.dt_proj(dt)  # (B, T, inner), before softplus
        A = -torch.exp(self.A_log.float())  # (inner, N): negative, so the state decays
        y, ssm_state = kernels.selective_scan(x, dt, A, B, C, self.D.float(), z, None,
                                              None if state is None else state.ssm)
        if state is not None:
            state.write(conv_state, ssm_state)
        return self.out_proj(y)


class GatedRMSNorm(nn.Module):
    """Mamba-2's norm(y * SiLU(z)), normalised per group of channels as mamba_ssm and llama.cpp do."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return kernels.gated_rms_norm(y, z, self.weight, self.eps, self.group_size)


class Mamba2Mixer(nn.Module):
    """SSD (Dao & Gu 2024): in_proj -> z, xBC, dt; conv1d + SiLU over xBC; per-head scan; gated norm; out_proj."""

    def __init__(self, ssm: SSMConfig, hidden_size: int, eps: float):
        super().__init__()
        self.ssm = ssm
        inner, heads = ssm.inner_size, ssm.num_heads
        self.in_proj = nn.Linear(hidden_size, inner + ssm.conv_channels + heads, bias=ssm.proj_bias)
        self.conv1d = CausalConv1d(ssm.conv_channels, ssm.conv_kernel, ssm.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.D = nn.Parameter(torch.empty(heads))
        self.norm = GatedRMSNorm(inner, inner // ssm.n_groups, eps)
        self.out_proj = nn.Linear(inner, hidden_size, bias=ssm.proj_bias)

    def forward(self, hidden: torch.Tensor, state: StateStore | None) -> torch.Tensor:
        ssm = self.ssm
        batch, length, _ = hidden.shape
        groups_width = ssm.n_groups * ssm.state_size
        z, xBC, dt = self.in_proj(hidden).split([ssm.inner_size, ssm.conv_channels, ssm.num_heads], dim=-1)
        xBC, conv_state = self.conv1d(xBC, None if state is None else state.conv)
        x, B, C = xBC.split([ssm.inner_size, groups_width, groups_width], dim=-1)
        A = -torch.exp(self.A_log.float())  # (H,)
        y, ssm_state = kernels.ssd_scan(
            x.reshape(batch, length, ssm.num_heads, ssm.head_dim),  # (B, T, H, P)
            dt,  # (B, T, H), before bias and softplus
            A,
            B.reshape(batch, length, ssm.n_groups, ssm.state_size),  # (B, T, G, N)
            C.reshape(batch, length, ssm.n_groups, ssm.state_size),
            self.D.float(),
            self.dt_bias.float(),
            None if state is None else state.ssm,
            dt_limit=ssm.time_step_limit,
        )
        if state is not None:
            state.write(conv_state, ssm_state)
        return self.out_proj(self.norm(y.reshape(batch, length, ssm.inner_size), z))

# Linear layers that see the same input share one set of calibration statistics.
LINEAR_GROUPS = {
    1: (("mixer.in_proj",), ("mixer.x_proj",), ("mixer.dt_proj",), ("mixer.out_proj",)),
    2: (("mixer.in_proj",), ("mixer.out_proj",)),
}


class MambaBlock(nn.Module):
    """Pre-norm residual block around one mixer."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        ssm = config.ssm
        self.layer = layer
        self.linear_groups = LINEAR_GROUPS[ssm.version]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if ssm.version == 1:
            self.mixer = Mamba1Mixer(ssm, config.hidden_size)
        else:
            self.mixer = Mamba2Mixer(ssm, config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, context: None, cache: Cache | None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H) in float32; `context` is unused (Mamba has no positions to encode)."""
        state = None if cache is None else cache.state(self.layer)
        return x.float() + self.mixer(self.norm(x.to(self.norm.weight.dtype)), state)


class MambaModel(nn.Module):
    """A Mamba-1 or Mamba-2 language model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.ssm is None:
            raise ValueError(f"{config.architecture}: a Mamba model needs the SSM sizes (config.ssm)")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.make_block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @staticmethod
    def make_block(config: ModelConfig, layer: int) -> MambaBlock:
        """Block `layer` of a model with `config` (calibration builds blocks one at a time)."""
        return MambaBlock(config, layer)

    @staticmethod
    def block_context(config: ModelConfig, start: int, length: int, device: torch.device) -> None:
        """What the blocks take besides hidden states and cache for positions start..start+length-1: nothing."""
        return None

    def prepare(self, device: torch.device) -> None:
        """Nothing to build after the weights are loaded."""

    def forward(
        self, input_ids: torch.Tensor, cache: Cache | None = None, *, last_logits_only: bool = False
    ) -> torch.Tensor:
        """Logits (B, T, V) in fp32 for input_ids (B, T), continuing from the state in `cache`."""
        if cache is not None:
            cache.check_room(input_ids.shape[1])
        x = self.embed_tokens(input_ids)  # (B, T, H)
        for layer in self.layers:
            x = layer(x, None, cache)
        if cache is not None:
            cache.commit_rows(input_ids)
        if last_logits_only:
            x = x[:, -1:]
        x = self.norm(x.to(self.norm.weight.dtype))
        if self.lm_head is not None:  # its own matrix, or a packed embedding's bytes (runtime.models.build_model)
            return self.lm_head(x).float()
        return F.linear(x, self.embed_tokens.weight).float()

    def new_cache(self, capacity: int, batch: int = 1, *, paged: bool = False, **kv_options) -> LayerCache:
        """The recurrent state of every layer for `batch` sequences of up to `capacity` tokens.

        A pure Mamba model has no keys or values: KV types (k_type, v_type) and `paged` are refused.
        """
        if paged:
            raise CacheTypeError(f"{self.config.architecture} has no attention layers to page; its cache is the "
                                 "float32 recurrent state")
        weight = self.norm.weight  # the model dtype and device (the embedding may be packed)
        return new_kv_cache(self.config, capacity, batch=batch, dtype=weight.dtype, device=weight.device, **kv_options)
