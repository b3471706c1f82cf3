"""ModelConfig: the one description of a model's shape that every reader produces and every model consumes."""

from __future__ import annotations

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
class ModelConfig:
    """Architecture and sizes of a decoder-only transformer (Llama family)."""

    architecture: str  # "llama", "mistral" or "qwen2": the family file is chosen from this
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

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.sliding_window_layers and len(self.sliding_window_layers) != self.num_layers:
            raise ValueError("sliding_window_layers must have one entry per layer")

    def window_for_layer(self, layer: int) -> int | None:
        """The attention window of `layer`, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers and not self.sliding_window_layers[layer]:
            return None
        return self.sliding_window
