"""KV cache kinds behind the one Cache interface: quantized keys/values, Hadamard rotation, sliding windows."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model
from kilnlm.export.hf import open_hf_checkpoint
from kilnlm.kernels.hadamard import hadamard_rotate_ref
from kilnlm.runtime.cache import ROLLBACK_MARGIN, new_kv_cache
from kilnlm.runtime.kv_stores import CacheTypeError, WindowStore
from kilnlm.runtime.models import build_model

TOL = 1e-4


def _sylvester(n: int) -> torch.Tensor:
    m = torch.ones(1, 1)
    while m.shape[0] < n:
        m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
    return m / n**0.5


@pytest.mark.parametrize(("dim", "block"), [(128, 128), (64, 64), (80, 16), (96, 32)])
def test_hadamard_is_the_orthonormal_sylvester_matrix(dim, block):
    x = torch.randn(3, 5, dim, generator=torch.Generator().manual_seed(0))
    matrix = torch.block_diag(*[_sylvester(block)] * (dim // block))
    assert (hadamard_rotate_ref(x) - x @ matrix).abs().max() < 1e-5
    assert (hadamard_rotate_ref(hadamard_rotate_ref(x)) - x).abs().max() < 1e-5  # its own inverse


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """A tiny Mistral (head_dim 32, window 7) and its kilnlm model."""
    folder = tmp_path_factory.mktemp("mistral")
    hf = make_hf_model(folder, "mistral", sliding_window=7, head_dim=32)
    checkpoint = open_hf_checkpoint(folder)
    return hf, build_model(checkpoint.config, checkpoint.tensors())


def _run_incrementally(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Logits of `ids` fed through the cache: chunks of `chunk` tokens for the first half, then one at a time."""
    half = ids.shape[1] // 2
    steps = [model(piece, cache) for piece in ids[:, :half].split(chunk, dim=1)]
    steps += [model(ids[:, t : t + 1], cache) for t in range(half, ids.shape[1])]
    return torch.cat(steps, dim=1)


@torch.no_grad()
def test_sliding_window_cache_memory_stays_bounded_and_logits_match_hf(mistral):
    """200 tokens through a window-7 cache: HF's logits, while each layer holds window - 1 + margin + chunk."""
    hf, ours = mistral
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(3))
    cache = ours.new_cache(1024, chunk=8)
    assert all(isinstance(store, WindowStore) for store in cache.stores)
    sizes = []
    logits = []
    for piece in [*ids[:, :100].split(8, dim=1), *ids[:, 100:].split(1, dim=1)]:
        logits.append(ours(piece, cache))
        sizes.append(cache.nbytes())
    assert (torch.cat(logits, dim=1) - hf(ids).logits).abs().max() <= TOL
    per_position = 2 * ours.config.num_layers * ours.config.num_kv_heads * ours.config.head_dim * 4
    assert max(sizes) == sizes[0] == (7 - 1 + ROLLBACK_MARGIN + 8) * per_position
    assert cache.stores[0].first > 100  # old positions really were dropped


@torch.no_grad()
def test_sliding_window_cache_rolls_back_within_the_margin_and_recomputes_beyond(mistral, capsys):
    hf, ours = mistral
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(4)).tolist()[0]
    cache = ours.new_cache(1024, chunk=8)
    for t in range(0, 120, 8):
        ours(torch.tensor([ids[t : t + 8]]), cache)
    # A new prompt that differs 5 positions from the end: resume there, and the logits are still HF's.
    prompt = ids[:115] + [1, 2, 3]
    assert cache.reuse_prefix(prompt) == 115
    tail = ours(torch.tensor([prompt[115:]]), cache)
    assert (tail - hf(torch.tensor([prompt])).logits[:, 115:]).abs().max() <= TOL
    # One that differs 100 positions back cannot be resumed: the cache starts over and says so once.
    assert cache.reuse_prefix(ids[:20] + [9] * 10) == 0
    assert cache.reuse_prefix(ids[:20] + [9] * 10) == 0
    assert capsys.readouterr().err.count("running the whole prompt again") == 1


# Relative RMS error of the logits of a random tiny model (trained models lose far less: see the note's
# perplexity figures); the bounds are ~1.5x what each type measures, so a broken codec fails them.
@pytest.mark.parametrize(("k_type", "v_type", "tol"), [("q8_0", "q8_0", 0.03), ("q4_0", "q4_0", 0.35),
                                                       ("q8_0", "q4_0", 0.25), ("f16", "bf16", 0.006)])
@torch.no_grad()
def test_quantized_cache_logits_stay_close(mistral, k_type, v_type, tol):
    """The cache path over quantized K/V stays near the float logits, with quantized K/V read back each step."""
    _, ours = mistral
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    exact = ours(ids)
    cache = ours.new_cache(64, k_type=k_type, v_type=v_type)
    logits = _run_incrementally(ours, ids, cache, chunk=8)
    assert (logits - exact).square().mean().sqrt() / exact.std() <= tol


@torch.no_grad()
def test_rotation_reduces_q4_0_error_on_outlier_channels():
    """Keys with an outlier channel (as real models have): rotated q4_0 keys are closer to the originals."""
    from kilnlm.runtime.kv_stores import kv_codec

    keys = torch.randn(1, 2, 64, 128, generator=torch.Generator().manual_seed(6))
    keys[..., 7] *= 30
    errors = {}
    for rotate in (False, True):
        codec = kv_codec("q4_0", torch.float32, 128, rotate=rotate)
        errors[rotate] = (codec.decode(codec.encode(keys), torch.float32) - keys).square().mean()
    assert errors[True] < 0.5 * errors[False]


def test_cache_bytes_per_type(mistral):
    _, ours = mistral
    f16 = ours.new_cache(256, k_type="f16", v_type="f16").nbytes()
    assert ours.new_cache(256, k_type="q8_0", v_type="q8_0").nbytes() <= 0.55 * f16
    assert ours.new_cache(256, k_type="q4_0", v_type="q4_0").nbytes() <= 0.3 * f16


def test_bad_cache_types_are_clear_errors(mistral):
    _, ours = mistral
    with pytest.raises(CacheTypeError, match=r"unknown KV cache type 'q3_k' \(valid: f32, f16, bf16, q8_0, q4_0\)"):
        ours.new_cache(16, k_type="q3_k")
    config = ours.config.__class__(**{**ours.config.__dict__, "head_dim": 80})
    with pytest.raises(CacheTypeError, match="head size is 80"):
        new_kv_cache(config, 16, v_type="q4_0")


def test_perplexity_scores_through_the_quantized_cache():
    """kiln perplexity --cache-type-k/-v: attention reads the quantized K/V, and q8_0 costs almost nothing."""
    from kilnlm.runtime.engine import Engine, demo_model_path
    from kilnlm.runtime.perplexity import perplexity

    engine = Engine.load(demo_model_path(), progress=False)
    text = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
            "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name. ") * 6

    def ppl(**kv):
        return perplexity(engine.model, engine.tokenizer, text, ctx=64, chunks=3, kv_options=kv).ppl

    exact = ppl()
    q8, q4 = ppl(k_type="q8_0", v_type="q8_0"), ppl(k_type="q4_0", v_type="q4_0")
    assert q4 != exact and abs(q8 / exact - 1) < 0.005 and abs(q4 / exact - 1) < 0.05


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_decode_kernel_layouts_are_the_registry_layouts(fmt):
    """kernels.decode_attention restates ggml's block layouts (it may not import quant); pin them bit for bit."""
    from kilnlm.kernels.attention import dequantize_kv_ref
    from kilnlm.quant.formats import get_format

    x = torch.randn(3, 2, 5, 96, generator=torch.Generator().manual_seed(7)) * 3
    packed = get_format(fmt).quantize(x)
    assert torch.equal(dequantize_kv_ref(packed, fmt, 96), get_format(fmt).dequantize(packed, x.shape))


@torch.no_grad()
def test_mixed_window_and_full_layers_in_one_cache(tmp_path):
    """Qwen2 with windows only from max_window_layers on: per-layer stores of both kinds, HF's logits."""
    from kilnlm.runtime.kv_stores import FullStore

    hf = make_hf_model(tmp_path, "qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1)
    checkpoint = open_hf_checkpoint(tmp_path)
    ours = build_model(checkpoint.config, checkpoint.tensors())
    windows = [ours.config.window_for_layer(i) for i in range(ours.config.num_layers)]
    cache = ours.new_cache(1024, chunk=8)
    kinds = [type(store) for store in cache.stores]
    assert kinds == [WindowStore if w else FullStore for w in windows] and len(set(kinds)) == 2
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(8))
    logits = _run_incrementally(ours, ids, cache, chunk=8)
    assert (logits - hf(ids).logits).abs().max() <= TOL


@torch.no_grad()
def test_sliding_window_store_with_quantized_keys_and_values(mistral):
    """The window layout and the q8_0 element type compose: bounded bytes, logits near the float ones."""
    _, ours = mistral
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(9))
    exact = ours(ids)
    cache = ours.new_cache(1024, chunk=8, k_type="q8_0", v_type="q8_0")
    assert all(isinstance(store, WindowStore) for store in cache.stores)
    logits = _run_incrementally(ours, ids, cache, chunk=8)
    assert (logits - exact).square().mean().sqrt() / exact.std() <= 0.03
    assert cache.stores[0].keys.shape[2] == 7 - 1 + ROLLBACK_MARGIN + 8 and cache.stores[0].first > 0


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_quantise_reference_packs_exactly_as_the_registry(fmt, dtype):
    """The cache's sync-free packing equals quant.formats byte for byte, edge cases included."""
    from kilnlm.kernels.kv_quant import quantize_kv_ref
    from kilnlm.quant.formats import get_format

    x = torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(10)) * 4
    x[0, 0, 0, :32] = 0
    x[0, 1, 0, 7] = -x[0, 1, 0, :32].abs().max()
    x[0, 1, 0, 9] = -x[0, 1, 0, 7]
    x[1, 2, 4, 40:] *= 1e-6
    x = x.to(dtype)
    assert torch.equal(quantize_kv_ref(x, fmt), get_format(fmt).quantize(x))
