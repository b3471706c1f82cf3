"""The cache interface every model uses, and the KV cache built from one store per layer.

A model asks the cache for "the keys and values of this layer, with these new ones appended"; the cache
decides the layout. The cache also remembers which token ids it holds, so that a new prompt sharing a
prefix with the previous one (the next turn of a chat) only runs the tokens after that prefix.

KVCache holds one LayerStore per layer (kv_stores.py), so a model can mix kinds: full layers next to
sliding-window layers (Gemma-2/3 interleaving), each in f16/bf16/f32 or q8_0/q4_0 keys and values.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from kilnlm import kernels
from kilnlm.errors import ContextLengthError
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.kv_stores import FloatCodec, FullStore, LayerStore, WindowStore, kv_codec

ROLLBACK_MARGIN = 32  # positions a sliding-window layer keeps beyond its window, so a chat can step back
PREFILL_CHUNK = 512  # the most tokens one forward pass runs; bounds (chunk x context) scores and window buffers


class Cache(ABC):
    """Per-layer state for positions 0 .. length-1 of one sequence batch, plus the token ids it holds."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.token_ids: list[int] = []

    @property
    def length(self) -> int:
        """Number of positions stored (and committed) so far."""
        return len(self.token_ids)

    @abstractmethod
    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values (B, Hkv, T, D) for positions length .. length+T-1; return all of the layer's so far."""

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               window: int | None) -> torch.Tensor:
        """Store the new keys/values, then attention of q (B, Hq, T, D) over the layer's positions so far.

        The cache knows its layout, so it picks the kernel that reads it (a quantized cache's decode kernel
        reads the packed blocks); this default attends over what update() returns.
        """
        return kernels.attention(q, *self.update(layer, keys, values), window=window)

    def commit(self, token_ids: Sequence[int]) -> None:
        """Record that every layer has stored the positions of `token_ids`; called once per forward pass."""
        self.token_ids.extend(int(t) for t in token_ids)

    def commit_rows(self, input_ids: torch.Tensor) -> None:
        """commit() for a forward pass over input_ids (B, T); the rows of a dense batch share one length."""
        self.commit(input_ids[0].tolist())

    def offsets(self) -> int | torch.Tensor:
        """The position of the next token: one int, or a (B,) tensor when each sequence has its own length."""
        return self.length

    def check_room(self, num_new: int) -> None:
        """Raise ContextLengthError if `num_new` more positions do not fit."""
        if self.length + num_new > self.capacity:
            raise ContextLengthError(
                f"{self.length + num_new} tokens do not fit the context of {self.capacity} tokens "
                f"({self.length} already in the cache, {num_new} new); load the model with a larger "
                "context length (--ctx / context_length=) or shorten the prompt"
            )

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (the stored values beyond it are simply overwritten later)."""
        del self.token_ids[length:]

    def reuse_prefix(self, token_ids: Sequence[int]) -> int:
        """Keep the longest cached prefix of `token_ids` (leaving at least one token to run); return its length."""
        limit = min(self.length, len(token_ids) - 1)
        shared = 0
        while shared < limit and self.token_ids[shared] == token_ids[shared]:
            shared += 1
        shared = self.resume_point(shared)
        self.truncate(shared)
        return shared

    def resume_point(self, length: int) -> int:
        """The longest prefix of at most `length` positions the cache can continue from."""
        return length

    def reset(self) -> None:
        """Empty the cache."""
        self.truncate(0)


class KVCache(Cache):
    """Keys and values of every layer, each layer in its own store (full or sliding window, any KV type)."""

    def __init__(self, stores: Sequence[LayerStore], capacity: int):
        super().__init__(capacity)
        self.stores = list(stores)
        self._told_recompute = False

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values (B, Hkv, T, D) for positions length .. length+T-1; return the layer's visible ones.

        A full layer returns positions 0 .. length+T-1; a sliding-window layer only its last positions, which
        still end at the last query (attention aligns queries to the end of the keys).
        """
        return self.stores[layer].append(self.length, keys, values)

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               window: int | None) -> torch.Tensor:
        """Attention over the layer's store, through the kernel that reads its layout."""
        return self.stores[layer].attend(self.length, q, keys, values, window)

    def resume_point(self, length: int) -> int:
        """`length` if every store can continue from there, else 0 (recompute), said once on stderr."""
        if all(store.resumable(length) for store in self.stores):
            return length
        if not self._told_recompute:
            print(f"kilnlm: the sliding-window cache no longer holds the positions before {length}; "
                  "running the whole prompt again", file=sys.stderr)
            self._told_recompute = True
        return 0

    def nbytes(self) -> int:
        """Memory held by the stores."""
        return sum(store.nbytes() for store in self.stores)


class DenseKVCache(KVCache):
    """Every layer's keys and values in preallocated (B, Hkv, capacity, D) buffers, as gpt-fast keeps them."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, *, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        codec = FloatCodec(str(dtype), dtype)
        stores = [FullStore(capacity, codec, codec, batch, num_kv_heads, head_dim, dtype, device)
                  for _ in range(num_layers)]
        super().__init__(stores, capacity)


def new_kv_cache(config: ModelConfig, capacity: int, *, batch: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", k_type: str | None = None, v_type: str | None = None,
                 rotate: bool = True, chunk: int = PREFILL_CHUNK) -> KVCache:
    """The KV cache of a model: a sliding-window store for each windowed layer whose window (plus `chunk`, the
    longest run of tokens per forward pass) is shorter than the context, a full store for every other layer.

    k_type / v_type: None (the model's dtype), "f32", "f16", "bf16", "q8_0" or "q4_0"; `rotate` applies the
    Hadamard rotation to quantized types.
    """
    head_dim = config.head_dim
    k_codec = kv_codec(k_type, dtype, head_dim, rotate)
    v_codec = kv_codec(v_type, dtype, head_dim, rotate)
    shape = (k_codec, v_codec, batch, config.num_kv_heads, head_dim, dtype, device)
    stores: list[LayerStore] = []
    for layer in range(config.num_layers):
        window = config.window_for_layer(layer)
        if window is not None and window - 1 + ROLLBACK_MARGIN + chunk < capacity:
            stores.append(WindowStore(window, chunk, ROLLBACK_MARGIN, *shape))
        else:
            stores.append(FullStore(capacity, *shape))
    return KVCache(stores, capacity)
