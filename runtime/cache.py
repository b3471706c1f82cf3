"""The cache interface every model uses, and its first implementation: a dense, preallocated KV cache.

A model asks the cache for "the keys and values of this layer, with these new ones appended"; the cache
decides the layout. The cache also remembers which token ids it holds, so that a new prompt sharing a
prefix with the previous one (the next turn of a chat) only runs the tokens after that prefix.
Later implementations (paged, sliding-window ring, quantized, Mamba state) keep this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from kilnlm.errors import ContextLengthError


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

    def commit(self, token_ids: Sequence[int]) -> None:
        """Record that every layer has stored the positions of `token_ids`; called once per forward pass."""
        self.token_ids.extend(int(t) for t in token_ids)

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
        self.truncate(shared)
        return shared

    def reset(self) -> None:
        """Empty the cache."""
        self.truncate(0)


class DenseKVCache(Cache):
    """Keys and values in preallocated (B, Hkv, capacity, D) buffers per layer, as gpt-fast keeps them."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__(capacity)
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values (B, Hkv, T, D) for positions length .. length+T-1; return all of the layer's so far."""
        start, end = self.length, self.length + keys.shape[2]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def nbytes(self) -> int:
        """Memory held by the buffers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
