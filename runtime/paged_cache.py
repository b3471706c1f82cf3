"""Paged KV cache: a pool of fixed-size pages shared by sequences, and prefix reuse by chained block hashes.

Every layer's keys and values live in one pool of pages (num_pages, Hkv, PAGE, row), row in any KV type of
kv_stores (f16/bf16/f32, or packed q8_0/q4_0). A sequence (PagedKVCache, one Cache) holds a block table:
the pages of its positions in order. A page that is full is identified by the hash of its tokens chained
to its parent page's hash, so equal hashes mean equal prefixes; pages are reference-counted, and a page no
sequence uses keeps its hash in an LRU list until the pool needs it back. A prompt that starts like any
cached sequence (the next chat turn, the same system prompt in another request) takes those pages instead
of running their tokens again. Only full pages are shared, so a sequence only ever writes into a page of
its own: stepping back into a shared page resumes at that page's start.

Attention reads the pages directly through the block table (kernels.paged_attention: split-K decode for one
query, FlashAttention for a prefill chunk, both dequantising packed pages in registers). Sliding windows are
applied by masking here (the window store of kv_stores is the memory-saving kind).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kilnlm.errors import ContextLengthError
from kilnlm.runtime.cache import Cache
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.kv_stores import KVCodec, attend_pages, kv_codec

DEFAULT_PAGE = 16


@dataclass
class _Page:
    refs: int = 0
    hash: bytes | None = None  # set once the page is full and its tokens are known


def chain_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The identity of a full page: its tokens and everything before them (through the parent's hash)."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens))
    return digest.digest()


class KVPagePool:
    """Pages of every layer's keys and values, with reference counts, hashes and an LRU of unused pages."""

    def __init__(self, config: ModelConfig, num_pages: int, *, page: int = DEFAULT_PAGE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 k_type: str | None = None, v_type: str | None = None, rotate: bool = True):
        self.page, self.num_pages, self.dtype = page, num_pages, dtype
        self.head_dim = config.head_dim
        self.k_codec: KVCodec = kv_codec(k_type, dtype, config.head_dim, rotate)
        self.v_codec: KVCodec = kv_codec(v_type, dtype, config.head_dim, rotate)
        shape = (num_pages, config.num_kv_heads, page, config.head_dim, device)
        self.keys = [self.k_codec.empty(*shape) for _ in range(config.num_layers)]
        self.values = [self.v_codec.empty(*shape) for _ in range(config.num_layers)]
        self.pages = [_Page() for _ in range(num_pages)]
        self._free = deque(range(num_pages))  # pages without content worth keeping: handed out first
        self._unused: OrderedDict[bytes, int] = OrderedDict()  # hash -> page with no user, oldest first
        self._by_hash: dict[bytes, int] = {}

    def allocate(self) -> int:
        """A page for new tokens: a blank one if any, else the least recently used cached one."""
        if self._free:
            page = self._free.popleft()
        elif self._unused:
            digest, page = self._unused.popitem(last=False)
            del self._by_hash[digest]
            self.pages[page].hash = None
        else:
            raise ContextLengthError(f"the KV page pool is full ({self.num_pages} pages of {self.page} positions "
                                     "in use); load with a larger context or run fewer sequences at once")
        self.pages[page].refs = 1
        return page

    def take(self, digest: bytes) -> int | None:
        """The page holding the prefix with this hash, now with one more user; None if not cached."""
        page = self._by_hash.get(digest)
        if page is not None:
            if self.pages[page].refs == 0:
                del self._unused[digest]
            self.pages[page].refs += 1
        return page

    def release(self, page: int) -> None:
        """One user fewer; an unused page keeps its content (if hashed) until the pool needs it."""
        entry = self.pages[page]
        entry.refs -= 1
        if entry.refs == 0:
            if entry.hash is None:
                self._free.append(page)
            else:
                self._unused[entry.hash] = page

    def register(self, page: int, digest: bytes) -> None:
        """Mark a full page as holding the prefix `digest` (the first page registered for a hash keeps it)."""
        if digest not in self._by_hash:
            self._by_hash[digest] = page
            self.pages[page].hash = digest

    def shared(self, page: int) -> bool:
        """Whether writing into the page could change what another sequence (or a later one) reads."""
        return self.pages[page].refs > 1 or self.pages[page].hash is not None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PagedKVCache(Cache):
    """One sequence's view of a KVPagePool: its block table, behind the Cache interface (batch 1)."""

    def __init__(self, pool: KVPagePool, capacity: int):
        super().__init__(capacity)
        self.pool = pool
        self.table: list[int] = []
        self._hashes: list[bytes] = []  # chain hash of each full page of the table, in order
        # The placement of the positions being run, built once per forward pass and reused by every layer:
        # (start, end, table, device) -> (pages, slots, block table, lengths) as device tensors.
        self._placement: tuple[tuple, tuple[torch.Tensor, ...]] | None = None

    # ------------------------------------------------------------------------------------------ writing

    def _rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page ids, slots) of positions start .. end-1, allocating pages as needed."""
        page = self.pool.page
        while len(self.table) * page < end:
            self.table.append(self.pool.allocate())
        positions = torch.arange(start, end)
        table = torch.tensor(self.table)
        return table[positions // page], positions % page

    def _place(self, end: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(pages, slots) of positions length .. end-1 and the (1, n) block table and (1,) length tensors,
        on `device`; computed by the first layer of a forward pass, then reused."""
        key = (self.length, end, tuple(self.table), str(device))
        if self._placement is None or self._placement[0] != key:
            pages, slots = self._rows(self.length, end)  # may allocate pages: the key is taken again
            placed = (pages.to(device), slots.to(device),
                      torch.tensor([self.table], dtype=torch.int32, device=device),
                      torch.tensor([end], dtype=torch.int32, device=device))
            self._placement = ((self.length, end, tuple(self.table), str(device)), placed)
        return self._placement[1]

    def _write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Store keys/values (1, Hkv, T, D) at the next positions; return the end position."""
        if keys.shape[0] != 1:
            raise ValueError("PagedKVCache holds one sequence; give each sequence of a batch its own cache")
        end = self.length + keys.shape[2]
        pages, slots, _, _ = self._place(end, self.pool.keys[layer].device)
        self.pool.keys[layer][pages, :, slots] = self.pool.k_codec.encode(keys)[0].transpose(0, 1)
        self.pool.values[layer][pages, :, slots] = self.pool.v_codec.encode(values)[0].transpose(0, 1)
        return end

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions; return keys/values (1, Hkv, S, D) of every position so far."""
        end = self._write(layer, keys, values)
        pages, slots = self._rows(0, end)
        device = self.pool.keys[layer].device
        pages, slots = pages.to(device), slots.to(device)

        def rows(pool: torch.Tensor, codec: KVCodec) -> torch.Tensor:
            return codec.decode(pool[pages, :, slots].transpose(0, 1)[None], keys.dtype)

        return rows(self.pool.keys[layer], self.pool.k_codec), rows(self.pool.values[layer], self.pool.v_codec)

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               window: int | None) -> torch.Tensor:
        """Attention that reads the pages through the block table (decode and prefill kernels alike)."""
        end = self._write(layer, keys, values)
        _, _, table, lengths = self._place(end, self.pool.keys[layer].device)
        return attend_pages(q, self.pool.keys[layer], self.pool.values[layer], table, lengths, self.pool.k_codec,
                            self.pool.v_codec, window)

    # ------------------------------------------------------------------------------------------ bookkeeping

    def commit(self, token_ids: Sequence[int]) -> None:
        """Record the tokens; every page that became full gets its chained hash, for other sequences to find."""
        super().commit(token_ids)
        page = self.pool.page
        while len(self._hashes) < self.length // page:
            index = len(self._hashes)
            digest = chain_hash(self._hashes[-1] if self._hashes else None,
                                self.token_ids[index * page : (index + 1) * page])
            self._hashes.append(digest)
            self.pool.register(self.table[index], digest)

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on, giving back the pages wholly past it."""
        super().truncate(length)
        keep = math.ceil(length / self.pool.page)
        for page in self.table[keep:]:
            self.pool.release(page)
        del self.table[keep:]
        del self._hashes[length // self.pool.page :]

    def resume_point(self, length: int) -> int:
        """A page that others share (or that holds a registered prefix) is never written: resume at its start."""
        page = self.pool.page
        index = length // page
        if length % page and index < len(self.table) and self.pool.shared(self.table[index]):
            return index * page
        return length

    def reuse_prefix(self, token_ids: Sequence[int]) -> int:
        """Keep the cached prefix of `token_ids`, then take further full pages from the pool by hash."""
        shared = super().reuse_prefix(token_ids)
        page = self.pool.page
        if shared % page:
            return shared
        # Take cached pages while a whole page of the prompt matches one and a token is left to run.
        while (len(self.table) + 1) * page <= len(token_ids) - 1:
            index = len(self.table)
            block = list(token_ids[index * page : (index + 1) * page])
            digest = chain_hash(self._hashes[-1] if self._hashes else None, block)
            found = self.pool.take(digest)
            if found is None:
                break
            self.table.append(found)
            self._hashes.append(digest)
            self.token_ids.extend(int(t) for t in block)
        return self.length

    def nbytes(self) -> int:
        """Memory of the pages this sequence holds."""
        return self.pool.nbytes() * len(self.table) // self.pool.num_pages


class PagedBatch(Cache):
    """Several sequences of a page pool, each at its own length, run together: row b of a forward pass
    continues sequences[b] (its rotary positions and its attention use that sequence's length)."""

    def __init__(self, sequences: Sequence[PagedKVCache]):
        pools = {id(seq.pool) for seq in sequences}
        if not sequences or len(pools) != 1:
            raise ValueError("a PagedBatch needs at least one sequence, all on one page pool")
        super().__init__(min(seq.capacity for seq in sequences))
        self.sequences = list(sequences)
        self.pool = sequences[0].pool
        self._tables: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # per forward pass, as _place

    def offsets(self) -> torch.Tensor:
        return torch.tensor([seq.length for seq in self.sequences])

    def check_room(self, num_new: int) -> None:
        for seq in self.sequences:
            seq.check_room(num_new)

    def update(self, layer, keys, values):
        """Every sequence's keys/values stacked (B, Hkv, S, D); only possible when the sequences are equally long
        (attend() handles different lengths)."""
        rows = [seq.update(layer, keys[b : b + 1], values[b : b + 1]) for b, seq in enumerate(self.sequences)]
        lengths = {k.shape[2] for k, _ in rows}
        if len(lengths) > 1:
            raise ValueError(f"the sequences hold {sorted(lengths)} positions; stacked keys need equal lengths, "
                             "attend() reads them as they are")
        return torch.cat([k for k, _ in rows]), torch.cat([v for _, v in rows])

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               window: int | None) -> torch.Tensor:
        """Write each row into its sequence's pages, then attend over every sequence's own length."""
        if q.shape[0] != len(self.sequences):
            raise ValueError(f"a batch of {q.shape[0]} rows for {len(self.sequences)} sequences")
        lengths = [seq._write(layer, keys[b : b + 1], values[b : b + 1]) for b, seq in enumerate(self.sequences)]
        table, lengths = self._block_table(lengths, self.pool.keys[layer].device)
        return attend_pages(q, self.pool.keys[layer], self.pool.values[layer], table, lengths, self.pool.k_codec,
                            self.pool.v_codec, window)

    def _block_table(self, lengths: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded (B, max pages) block table and (B,) lengths on `device`, built once per forward pass."""
        key = (tuple(lengths), tuple(tuple(seq.table) for seq in self.sequences), str(device))
        if self._tables is None or self._tables[0] != key:
            table = torch.zeros((len(self.sequences), max(len(seq.table) for seq in self.sequences)),
                                dtype=torch.int32)
            for b, seq in enumerate(self.sequences):
                table[b, : len(seq.table)] = torch.tensor(seq.table, dtype=torch.int32)
            self._tables = (key, (table.to(device), torch.tensor(lengths, dtype=torch.int32, device=device)))
        return self._tables[1]

    def commit_rows(self, input_ids: torch.Tensor) -> None:
        for seq, row in zip(self.sequences, input_ids.tolist(), strict=True):
            seq.commit(row)

    def truncate(self, length: int) -> None:
        """Cut every sequence longer than `length` back to it (truncate(0), i.e. reset(), empties them all)."""
        for seq in self.sequences:
            seq.truncate(min(seq.length, length))

    def reuse_prefix(self, token_ids: Sequence[int]) -> int:
        raise ValueError("a PagedBatch holds several prompts: call reuse_prefix on each sequence before batching")

    def nbytes(self) -> int:
        return sum(seq.nbytes() for seq in self.sequences)


def new_paged_cache(config: ModelConfig, capacity: int, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", k_type: str | None = None, v_type: str | None = None,
                    rotate: bool = True, page: int = DEFAULT_PAGE, pool: KVPagePool | None = None) -> PagedKVCache:
    """A paged cache for one sequence of up to `capacity` positions, on its own pool unless one is given."""
    if pool is None:
        pool = KVPagePool(config, math.ceil(capacity / page), page=page, dtype=dtype, device=device, k_type=k_type,
                          v_type=v_type, rotate=rotate)
    return PagedKVCache(pool, capacity)
