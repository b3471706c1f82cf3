"""How one layer keeps its keys and values: the element type (codec) and the layout (store).

Element types, named as llama.cpp's --cache-type-k/-v name them:
- "f32", "f16", "bf16": plain tensors in that dtype (None: the model's dtype).
- "q8_0", "q4_0": ggml's 32-value blocks along head_dim with an fp16 scale, packed by the one format
  registry (quant.formats), optionally after a Hadamard rotation (kernels.hadamard) that spreads outlier
  channels over the block so that 4-bit keys keep their small values.

Layouts:
- FullStore: every position of the context, preallocated.
- WindowStore: a sliding-window layer keeps only the last window - 1 positions (plus a rollback margin)
  and the chunk being run, so its memory is O(window), not O(context).

Stores return the layer's keys/values in the model's dtype, unrotated, for the reference attention; for a
quantized type that is a dequantised copy (the decode kernels read the packed blocks directly). A float cache
goes to kernels.attention as stored, so a float16 cache of a float32 model is read as float16 at decode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kilnlm import kernels
from kilnlm.errors import KilnError
from kilnlm.kernels.attention import one_page_per_sequence
from kilnlm.quant.formats import get_format

FLOAT_KV_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
BLOCK_KV_TYPES = ("q8_0", "q4_0")
KV_TYPES = (*FLOAT_KV_TYPES, *BLOCK_KV_TYPES)


class CacheTypeError(KilnError):
    """An unknown KV cache type, or one the model's head size cannot use."""


# --------------------------------------------------------------------------------------------- codecs


class KVCodec(ABC):
    """Turns (B, H, T, D) keys or values into what a store keeps, and back."""

    name: str

    @abstractmethod
    def empty(self, batch: int, heads: int, positions: int, head_dim: int, device) -> torch.Tensor:
        """Storage for `positions` positions."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Stored form of x (B, H, T, D)."""

    @abstractmethod
    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x (B, H, T, D) in `dtype` from its stored form (a view when nothing needs converting)."""


class FloatCodec(KVCodec):
    """Plain tensors in one float dtype."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def empty(self, batch, heads, positions, head_dim, device) -> torch.Tensor:
        return torch.zeros((batch, heads, positions, head_dim), dtype=self.dtype, device=device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return stored.to(dtype)


class BlockCodec(KVCodec):
    """ggml block quantization along head_dim (q8_0, q4_0), after an optional Hadamard rotation."""

    def __init__(self, name: str, head_dim: int, rotate: bool):
        self.name, self.format, self.rotate = name, get_format(name), rotate
        self.head_dim = head_dim
        self.row_bytes = head_dim // self.format.block_size * self.format.bytes_per_block

    def empty(self, batch, heads, positions, head_dim, device) -> torch.Tensor:
        return torch.zeros((batch, heads, positions, self.row_bytes), dtype=torch.uint8, device=device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # kernels.quantize_kv packs exactly as the registry's format does, minus its host-side checks, which
        # would synchronise a GPU at every layer of every step.
        return kernels.quantize_kv(kernels.hadamard_rotate(x) if self.rotate else x, self.name)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = self.format.dequantize(stored, (*stored.shape[:-1], self.head_dim))
        return (kernels.hadamard_rotate(x) if self.rotate else x).to(dtype)


def attend_pages(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                 lengths: torch.Tensor, k_codec: KVCodec, v_codec: KVCodec, window: int | None) -> torch.Tensor:
    """kernels.paged_attention over pools kept by these codecs: with rotated keys the query is rotated instead
    ((qH)·(kH) = q·k), and with rotated values the output is rotated back (softmax-weighted rotated values
    are the rotated output)."""
    query = kernels.hadamard_rotate(q) if _rotated(k_codec) else q
    out = kernels.paged_attention(query, k_pool, v_pool, table, lengths, _block_format(k_codec),
                                  _block_format(v_codec), window)
    return (kernels.hadamard_rotate(out) if _rotated(v_codec) else out).to(q.dtype)


def _rotated(codec: KVCodec) -> bool:
    return isinstance(codec, BlockCodec) and codec.rotate


def _block_format(codec: KVCodec) -> str | None:
    return codec.name if isinstance(codec, BlockCodec) else None


def kv_codec(kv_type: str | None, model_dtype: torch.dtype, head_dim: int, rotate: bool = True) -> KVCodec:
    """The codec for a cache type name (None: the model's dtype); CacheTypeError names the valid ones."""
    if kv_type is None:
        return FloatCodec(str(model_dtype).removeprefix("torch."), model_dtype)
    if kv_type in FLOAT_KV_TYPES:
        return FloatCodec(kv_type, FLOAT_KV_TYPES[kv_type])
    if kv_type in BLOCK_KV_TYPES:
        if head_dim % 32:
            raise CacheTypeError(f"cache type {kv_type} packs blocks of 32 along the head, but this model's "
                                 f"head size is {head_dim}; use f16, bf16 or f32")
        return BlockCodec(kv_type, head_dim, rotate)
    raise CacheTypeError(f"unknown KV cache type {kv_type!r} (valid: {', '.join(KV_TYPES)})")


# --------------------------------------------------------------------------------------------- stores


class LayerStore(ABC):
    """One layer's keys and values for a contiguous run of positions ending at the cache's length."""

    def __init__(self, k_codec: KVCodec, v_codec: KVCodec, batch: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.k_codec, self.v_codec, self.dtype = k_codec, v_codec, dtype
        self._shape = (batch, heads, head_dim, device)

    def _buffers(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, head_dim, device = self._shape
        return (self.k_codec.empty(batch, heads, positions, head_dim, device),
                self.v_codec.empty(batch, heads, positions, head_dim, device))

    @abstractmethod
    def _store(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store positions start .. start+T-1; return the stored form of the last S positions kept."""

    def append(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store positions start .. start+T-1; return keys/values (B, H, S, D) of the last S positions kept."""
        stored_keys, stored_values = self._store(start, keys, values)
        return self.k_codec.decode(stored_keys, self.dtype), self.v_codec.decode(stored_values, self.dtype)

    def attend(self, start: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               window: int | None) -> torch.Tensor:
        """Store positions start .. start+T-1, then attention of q (B, Hq, T, D) over what a query may see."""
        if isinstance(self.k_codec, FloatCodec) and isinstance(self.v_codec, FloatCodec):
            # kernels.attention reads a float cache as stored (no per-step float32 copy of a float16 cache)
            return kernels.attention(q, *self._store(start, keys, values), window=window)
        return kernels.attention(q, *self.append(start, keys, values), window=window)

    @abstractmethod
    def resumable(self, length: int) -> bool:
        """Whether the cache can go back to `length` positions and continue from there."""

    @abstractmethod
    def nbytes(self) -> int:
        """Memory held."""


class FullStore(LayerStore):
    """Every position of the context in preallocated buffers."""

    def __init__(self, capacity: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys, self.values = self._buffers(capacity)

    def _write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Store positions start .. start+T-1; return the end position."""
        end = start + keys.shape[2]
        self.keys[:, :, start:end] = self.k_codec.encode(keys)
        self.values[:, :, start:end] = self.v_codec.encode(values)
        return end

    def _store(self, start, keys, values):
        end = self._write(start, keys, values)
        return self.keys[:, :, :end], self.values[:, :, :end]

    def attend(self, start, q, keys, values, window):
        """With packed blocks (and always on CUDA) the kernels read the buffers as one page per sequence."""
        packed = isinstance(self.k_codec, BlockCodec) or isinstance(self.v_codec, BlockCodec)
        if not (packed or q.is_cuda):
            return super().attend(start, q, keys, values, window)
        end = self._write(start, keys, values)
        table, lengths = one_page_per_sequence(self.keys[:, :, :end])
        return attend_pages(q, self.keys, self.values, table, lengths, self.k_codec, self.v_codec, window)

    def resumable(self, length: int) -> bool:
        return True

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class WindowStore(LayerStore):
    """A sliding-window layer: the positions a query of the next chunk can see, plus a rollback margin.

    A query at position p sees keys p-window+1 .. p, so running positions start .. start+T-1 needs keys from
    start-window+1 on. `margin` older positions are kept too, so that the cache can step back that far (a
    chat template re-tokenising the last answer) without recomputing. The buffer holds window - 1 + margin
    + chunk positions and only grows if a longer chunk arrives.
    """

    def __init__(self, window: int, chunk: int, margin: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.window, self.margin = window, margin
        self.first = 0  # absolute position of buffer slot 0
        self.count = 0  # positions held
        self.keys, self.values = self._buffers(window - 1 + margin + chunk)

    def _store(self, start, keys, values):
        if start < self.first:  # only a full reset (resumable(0)) goes back past the buffer
            self.first = 0
        self.count = start - self.first  # a rollback to `start` (checked resumable) drops what follows
        length = keys.shape[2]
        self._make_room(start, length)
        end = self.count + length
        self.keys[:, :, self.count:end] = self.k_codec.encode(keys)
        self.values[:, :, self.count:end] = self.v_codec.encode(values)
        self.count = end
        visible = max(0, start - self.window + 1 - self.first)  # older keys are outside every query's window
        return self.keys[:, :, visible:end], self.values[:, :, visible:end]

    def _make_room(self, start: int, length: int) -> None:
        """When the buffer is full, drop the positions no query from `start` on (nor a rollback) can see."""
        capacity = self.keys.shape[2]
        if self.count + length <= capacity:
            return
        drop = max(0, start - (self.window - 1) - self.margin - self.first)
        kept = self.count - drop
        if kept + length > capacity:  # a chunk longer than planned: grow rather than fail
            keys, values = self._buffers(kept + length)
        else:
            keys, values = self.keys, self.values
        # clone: source and destination overlap when the buffer is reused
        keys[:, :, :kept] = self.keys[:, :, drop:self.count].clone()
        values[:, :, :kept] = self.values[:, :, drop:self.count].clone()
        self.keys, self.values = keys, values
        self.first, self.count = self.first + drop, kept

    def resumable(self, length: int) -> bool:
        return length == 0 or (self.first <= max(0, length - self.window + 1) and length <= self.first + self.count)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))
