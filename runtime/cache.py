"""The cache interface every model uses, and the cache built from one store per layer.

A model asks the cache for "the keys and values of this layer, with these new ones appended" (attention
layers) or for "this layer's recurrent state" (Mamba layers); the cache decides the layout. The cache also
remembers which token ids it holds, so that a new prompt sharing a prefix with the previous one (the next
turn of a chat) only runs the tokens after that prefix.

LayerCache holds one store per layer, so a model can mix kinds: full attention layers next to
sliding-window layers (Gemma-2/3 interleaving), each in f16/bf16/f32 or q8_0/q4_0 keys and values
(kv_stores.py), and recurrent-state layers (state_cache.py) for Mamba and hybrid models.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from kilnlm import kernels
from kilnlm.errors import ContextLengthError
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.kv_stores import CacheTypeError, FloatCodec, FullStore, LayerStore, WindowStore, kv_codec
from kilnlm.runtime.state_cache import CheckpointRing, StateStore

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

    def checkpoint(self) -> None:
        """Remember the state at this point (after a prompt, after an answer) so a later prompt can resume here.

        Only recurrent layers need it; keys and values can be cut back to any earlier position on their own.
        """

    def state_nbytes(self) -> int:
        """Memory held by recurrent state (none here: a KV cache only)."""
        return 0

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


class LayerCache(Cache):
    """One store per layer: keys and values (full or sliding window, any KV type) or a recurrent state."""

    def __init__(self, stores: Sequence[LayerStore | StateStore], capacity: int):
        super().__init__(capacity)
        self.stores = list(stores)
        self.state_stores = [store for store in self.stores if isinstance(store, StateStore)]
        self.kv_stores = [store for store in self.stores if not isinstance(store, StateStore)]
        self.checkpoints = CheckpointRing()
        self._told_recompute = False
        # Set while a forward pass is updating recurrent states, cleared when it commits its tokens: a pass that
        # was interrupted (Ctrl-C in a chat) leaves some layers a step ahead, so that live state is unusable.
        self._states_in_flight = False

    def state(self, layer: int) -> StateStore:
        """The recurrent state of a Mamba layer (the layer reads it and writes the state after its tokens)."""
        self._states_in_flight = True
        return self.stores[layer]

    def commit(self, token_ids: Sequence[int]) -> None:
        """Record that every layer has stored the positions of `token_ids` (recurrent states included)."""
        super().commit(token_ids)
        self._states_in_flight = False

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
        """`length` if every KV store can continue from there, else 0 (recompute), said once on stderr."""
        if all(store.resumable(length) for store in self.kv_stores):
            return length
        self._say_recompute(f"the sliding-window cache no longer holds the positions before {length}")
        return 0

    def checkpoint(self) -> None:
        """Snapshot the recurrent layers' state after the tokens held now (a no-op without such layers)."""
        if self.state_stores and not self._states_in_flight:
            self.checkpoints.save(self.token_ids, self.state_stores)

    def reuse_prefix(self, token_ids: Sequence[int]) -> int:
        """Keep the longest cached prefix of `token_ids`; recurrent layers go back to their newest checkpoint
        that `token_ids` starts with, since their state cannot be cut back to an arbitrary position."""
        if not self.state_stores:
            return super().reuse_prefix(token_ids)
        limit = len(token_ids) - 1
        shared = 0
        while shared < min(self.length, limit) and self.token_ids[shared] == token_ids[shared]:
            shared += 1
        # The live state is where this prompt continues, unless a pass over more tokens was cut short.
        live = shared if shared == self.length and not self._states_in_flight else None
        # Attention layers hold this prompt's keys only up to `shared`; pure recurrent models have no such bound.
        found = self.checkpoints.newest_prefix_of(token_ids, shared if self.kv_stores else limit)
        if found is not None and len(found.tokens) > (live or 0) and self.resume_point(len(found.tokens)):
            for store, snapshot in zip(self.state_stores, found.states, strict=True):
                store.restore(snapshot)
            self.token_ids = list(found.tokens)
            return len(found.tokens)
        if live is not None:
            return live
        self._say_recompute("no saved state of the recurrent layers is a prefix of this prompt")
        self.reset()
        return 0

    def reset(self) -> None:
        """Empty the cache (recurrent states back to zero; checkpoints stay for later prompts)."""
        super().reset()
        for store in self.state_stores:
            store.clear()
        self._states_in_flight = False

    def _say_recompute(self, why: str) -> None:
        if not self._told_recompute:
            print(f"kilnlm: {why}; running the whole prompt again", file=sys.stderr)
            self._told_recompute = True

    def nbytes(self) -> int:
        """Memory held by the stores (checkpoints of recurrent states not included: see checkpoints.nbytes)."""
        return sum(store.nbytes() for store in self.stores)

    def state_nbytes(self) -> int:
        """The part of nbytes() that is recurrent state (a constant: it does not grow with the context)."""
        return sum(store.nbytes() for store in self.state_stores)


class DenseKVCache(LayerCache):
    """Every layer's keys and values in preallocated (B, Hkv, capacity, D) buffers, as gpt-fast keeps them."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, *, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        codec = FloatCodec(str(dtype), dtype)
        stores = [FullStore(capacity, codec, codec, batch, num_kv_heads, head_dim, dtype, device)
                  for _ in range(num_layers)]
        super().__init__(stores, capacity)


def new_kv_cache(config: ModelConfig, capacity: int, *, batch: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", k_type: str | None = None, v_type: str | None = None,
                 rotate: bool = True, chunk: int = PREFILL_CHUNK) -> LayerCache:
    """The cache of a model, one store per layer: a float32 recurrent state for each Mamba layer, a sliding-window
    KV store for each windowed attention layer whose window (plus `chunk`, the longest run of tokens per forward
    pass) is shorter than the context, a full KV store for every other attention layer.

    k_type / v_type: None (the model's dtype), "f32", "f16", "bf16", "q8_0" or "q4_0"; `rotate` applies the
    Hadamard rotation to quantized types. A model without attention layers takes no KV type.
    """
    kinds = config.layer_kinds()
    if "attention" not in kinds and (k_type or v_type):
        raise CacheTypeError(f"{config.architecture} has no attention layers, so KV cache types do not apply; "
                             "its cache is the float32 recurrent state")
    stores: list[LayerStore | StateStore] = []
    if "attention" in kinds:
        head_dim = config.head_dim
        k_codec = kv_codec(k_type, dtype, head_dim, rotate)
        v_codec = kv_codec(v_type, dtype, head_dim, rotate)
        shape = (k_codec, v_codec, batch, config.num_kv_heads, head_dim, dtype, device)
    for layer, kind in enumerate(kinds):
        window = config.window_for_layer(layer)
        if kind == "mamba":
            ssm = config.ssm
            stores.append(StateStore(batch, ssm.conv_channels, ssm.conv_kernel, ssm.state_shape, device))
        elif window is not None and window - 1 + ROLLBACK_MARGIN + chunk < capacity:
            stores.append(WindowStore(window, chunk, ROLLBACK_MARGIN, *shape))
        else:
            stores.append(FullStore(capacity, *shape))
    return LayerCache(stores, capacity)
