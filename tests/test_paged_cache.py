"""Paged KV cache: pages shared between sequences by chained prefix hashes, reference counts, LRU reuse."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model
from kilnlm.errors import ContextLengthError
from kilnlm.export.hf import open_hf_checkpoint
from kilnlm.runtime.models import build_model
from kilnlm.runtime.paged_cache import KVPagePool, PagedKVCache, chain_hash

TOL = 1e-4
PAGE = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_hf_model(folder, "llama", head_dim=32, max_position_embeddings=256)
    checkpoint = open_hf_checkpoint(folder)
    return build_model(checkpoint.config, checkpoint.tensors())


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _run(model, cache, tokens: list[int], chunk: int = 8) -> torch.Tensor:
    """Logits of `tokens` run after the cache's positions: chunks of `chunk`, then the last one alone."""
    pieces = [model(torch.tensor([tokens[i : i + chunk]]), cache) for i in range(0, len(tokens) - 1, chunk)]
    return torch.cat(pieces, dim=1)


def test_second_sequence_takes_the_first_ones_full_pages_and_gets_the_same_logits(model):
    pool = KVPagePool(model.config, 12, page=PAGE)
    first, second = PagedKVCache(pool, 256), PagedKVCache(pool, 256)
    prompt = _ids(40, 1)
    _run(model, first, prompt + [0])
    assert len(first._hashes) == 2  # two full pages of 16 registered
    extended = prompt + _ids(9, 2)
    assert second.reuse_prefix(extended) == 32  # the full pages only; the partial third is not shared
    assert second.table[:2] == first.table[:2] and [pool.pages[p].refs for p in first.table[:2]] == [2, 2]
    with torch.no_grad():
        logits = model(torch.tensor([extended[32:]]), second)
        expected = model(torch.tensor([extended]))[:, 32:]
    assert (logits - expected).abs().max() <= TOL


def test_unused_pages_stay_cached_until_the_pool_needs_them(model):
    pool = KVPagePool(model.config, 4, page=PAGE)
    cache = PagedKVCache(pool, 64)
    prompt = _ids(33, 3)
    _run(model, cache, prompt + [0])
    pages = list(cache.table)  # 3 pages: two full (hashed), one partial
    cache.reset()
    assert pool.pages[pages[2]].hash is None and list(pool._free)[-1] == pages[2]  # partial page: blank again
    other = PagedKVCache(pool, 64)
    assert other.reuse_prefix(prompt[:32] + [7]) == 32 and other.table == pages[:2]  # found by hash after a reset
    other.reset()
    # New content takes the blank pages first, then the least recently used cached page.
    third = PagedKVCache(pool, 64)
    _run(model, third, _ids(49, 4) + [0])
    assert pool.take(chain_hash(None, prompt[:16])) is None  # the oldest cached page was evicted
    with pytest.raises(ContextLengthError, match="KV page pool is full"):
        PagedKVCache(pool, 64)._rows(0, 17)


def test_rolling_back_into_a_shared_page_resumes_at_its_start(model):
    pool = KVPagePool(model.config, 8, page=PAGE)
    cache = PagedKVCache(pool, 128)
    prompt = _ids(40, 5)
    _run(model, cache, prompt + [0])
    # Going back to 20 positions would write into page 1, which is full and registered: resume at 16.
    changed = prompt[:20] + _ids(6, 6)
    assert cache.reuse_prefix(changed) == 16
    with torch.no_grad():
        logits = model(torch.tensor([changed[16:]]), cache)
        expected = model(torch.tensor([changed]))[:, 16:]
    assert (logits - expected).abs().max() <= TOL


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_quantized_pages_decode_like_the_dense_quantized_cache(model, kv_type):
    tokens = _ids(37, 7)
    paged = model.new_cache(64, paged=True, k_type=kv_type, v_type=kv_type)
    dense = model.new_cache(64, k_type=kv_type, v_type=kv_type)
    with torch.no_grad():
        a = torch.cat([model(torch.tensor([[t]]), paged) for t in tokens], dim=1)
        b = torch.cat([model(torch.tensor([[t]]), dense) for t in tokens], dim=1)
    assert (a - b).abs().max() <= 1e-4
    assert paged.nbytes() < dense.nbytes()  # 3 pages of 16 held, against 64 preallocated positions


@pytest.mark.parametrize("kv_type", [None, "q8_0"])
def test_a_batch_of_sequences_at_different_lengths_decodes_like_each_alone(model, kv_type):
    """Rows of one forward pass continue sequences of 37, 20 and 5 positions (own rotary positions, own lengths)."""
    from kilnlm.runtime.paged_cache import PagedBatch

    pool = KVPagePool(model.config, 24, page=PAGE, k_type=kv_type, v_type=kv_type)
    prompts = [_ids(37, 10), _ids(20, 11), _ids(5, 12)]
    sequences = [PagedKVCache(pool, 128) for _ in prompts]
    alone = []
    with torch.no_grad():
        for seq, prompt in zip(sequences, prompts):  # prefill each on its own (different prompt lengths)
            model(torch.tensor([prompt[:-1]]), seq)
        batch = PagedBatch(sequences)
        steps = torch.tensor([[p[-1]] for p in prompts])
        together = [model(steps, batch)]  # (3, 1, V): one decode step for all three
        nexts = together[0][:, -1].argmax(-1, keepdim=True)
        together.append(model(nexts, batch))  # and a second one
        for prompt, step in zip(prompts, nexts.tolist()):
            fresh = model.new_cache(128, k_type=kv_type, v_type=kv_type)
            model(torch.tensor([prompt[:-1]]), fresh)
            alone.append(torch.cat([model(torch.tensor([prompt[-1:]]), fresh), model(torch.tensor([step]), fresh)], 1))
    assert [seq.length for seq in sequences] == [38, 21, 6]
    assert (torch.cat(together, dim=1) - torch.cat(alone, dim=0)).abs().max() <= TOL


def test_batch_stacks_equal_sequences_and_resets_all(model):
    """update() stacks equally long sequences and refuses ragged ones; reset() empties every sequence."""
    from kilnlm.runtime.paged_cache import PagedBatch

    pool = KVPagePool(model.config, 8, page=PAGE)
    sequences = [PagedKVCache(pool, 64) for _ in range(2)]
    batch = PagedBatch(sequences)
    keys = torch.randn(2, model.config.num_kv_heads, 3, model.config.head_dim)
    k, v = batch.update(0, keys, keys)
    assert k.shape == (2, model.config.num_kv_heads, 3, model.config.head_dim) and torch.allclose(k, keys)
    sequences[0].commit([1, 2, 3])
    with pytest.raises(ValueError, match=r"hold \[1, 4\] positions"):
        batch.update(0, keys[:, :, :1], keys[:, :, :1])
    with pytest.raises(ValueError, match="call reuse_prefix on each sequence"):
        batch.reuse_prefix([1, 2])
    batch.reset()
    assert [seq.length for seq in sequences] == [0, 0] and all(p.refs == 0 for p in pool.pages)
