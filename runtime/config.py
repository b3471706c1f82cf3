"""ModelConfig: the one description of a model's shape that every reader produces and every model consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, with the parameter names Hugging Face configs use."""

    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama.cpp's rope_freqs tensor: each frequency is divided by its factor after the scaling above.
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ValueError(f"unknown rope scaling type {self.type!r}; supported: {', '.join(ROPE_TYPES)}")


@dataclass(frozen=True)
class SSMConfig:
    """Sizes of a Mamba mixer, named as llama.cpp's `{arch}.ssm.*` keys name them.

    Mamba-1 (version 1): in_proj -> x, z; conv1d; x_proj -> dt (time_step_rank wide), B, C; dt_proj.
    Mamba-2 (version 2): in_proj -> z, xBC, dt (one per head); heads of head_dim channels share B and C
    within each of n_groups groups; a gated RMSNorm per group before out_proj.
    """

    version: int
    inner_size: int  # d_inner: channels of x and z
    state_size: int  # N: state per channel (Mamba-1) or per head channel (Mamba-2)
    conv_kernel: int
    time_step_rank: int  # Mamba-1: width of the low-rank dt; Mamba-2: the number of heads (as llama.cpp stores it)
    n_groups: int = 1
    dt_b_c_rms: bool = False  # Falcon-Mamba: weightless RMSNorm on dt, B and C
    mixer_rms_eps: float = 1e-6
    conv_bias: bool = True
    proj_bias: bool = False  # biases on in_proj and out_proj
    time_step_limit: tuple[float, float] = (0.0, math.inf)  # Mamba-2 clamps softplus(dt) to this range
    chunk_size: int = 256  # Mamba-2's SSD chunk length (a kernel tiling choice; the result does not depend on it)

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"unknown Mamba version {self.version}")
        if self.version == 2 and (self.inner_size % self.time_step_rank or self.time_step_rank % self.n_groups):
            raise ValueError(f"inner size {self.inner_size} must split into {self.time_step_rank} heads, "
                             f"and the heads into {self.n_groups} groups")

    @property
    def num_heads(self) -> int:
        """Mamba-2 heads (each of head_dim channels with its own dt and A)."""
        return self.time_step_rank

    @property
    def head_dim(self) -> int:
        """Channels per Mamba-2 head."""
        return self.inner_size // self.time_step_rank

    @property
    def state_shape(self) -> tuple[int, ...]:
        """The SSM state of one sequence: (inner, state) for Mamba-1, (heads, head_dim, state) for Mamba-2."""
        if self.version == 1:
            return (self.inner_size, self.state_size)
        return (self.num_heads, self.head_dim, self.state_size)

    @property
    def conv_channels(self) -> int:
        """Channels through the causal conv: x (Mamba-1), or x, B and C (Mamba-2)."""
        if self.version == 1:
            return self.inner_size
        return self.inner_size + 2 * self.n_groups * self.state_size


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and sizes of a decoder-only language model: a transformer (Llama family) or Mamba."""

    architecture: str  # "llama", "mistral", "qwen2", "mamba" or "mamba2": the family file is chosen from this
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # None means full attention; otherwise a query at position p sees keys at p - window + 1 .. p.
    sliding_window: int | None = None
    # Which layers use the sliding window (Qwen2 can restrict it to upper layers); empty means all layers.
    sliding_window_layers: tuple[bool, ...] = ()
    attention_bias: bool = False  # Qwen2: biases on q, k and v projections
    tie_word_embeddings: bool = False
    ssm: SSMConfig | None = None  # the mixer of Mamba layers (attention sizes are 0 for a pure Mamba model)
    # Hybrids: "attention" or "mamba" for each layer. Empty: every layer is Mamba when `ssm` is set, else attention.
    layer_types: tuple[str, ...] = ()
    use_rope: bool = True  # False: attention without position encoding (Granite-4.0-H's "nope")
    attention_scale: float | None = None  # scores are q.k x this; None: 1 / sqrt(head_dim)
    # muP-style multipliers (Granite): embeddings x e, each block's output x r before the residual add, logits / s.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.sliding_window_layers and len(self.sliding_window_layers) != self.num_layers:
            raise ValueError("sliding_window_layers must have one entry per layer")
        if self.layer_types and (len(self.layer_types) != self.num_layers
                                 or not set(self.layer_types) <= {"attention", "mamba"}):
            raise ValueError("layer_types must name 'attention' or 'mamba' for each layer")
        if "mamba" in self.layer_kinds() and self.ssm is None:
            raise ValueError("Mamba layers need the SSM sizes (ssm)")

    def layer_kind(self, layer: int) -> str:
        """'attention' or 'mamba': what mixes the tokens in `layer`."""
        if self.layer_types:
            return self.layer_types[layer]
        return "mamba" if self.ssm is not None else "attention"

    def layer_kinds(self) -> tuple[str, ...]:
        """layer_kind of every layer."""
        return tuple(self.layer_kind(i) for i in range(self.num_layers))

    def window_for_layer(self, layer: int) -> int | None:
        """The attention window of `layer`, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers and not self.sliding_window_layers[layer]:
            return None
        return self.sliding_window
