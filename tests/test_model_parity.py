"""Logits of kilnlm's Llama-family model against HF transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model
from kilnlm.export.hf import open_hf_checkpoint
from kilnlm.runtime.models import build_model

transformers = pytest.importorskip("transformers")
TOL = 1e-4  # fp32: the only differences are summation order inside matmuls and SDPA

CASES = {
    "llama-gqa-llama3-rope": ("llama", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-mqa-linear-rope": ("llama", dict(num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-yarn-rope": ("llama", dict(rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-head-dim": ("llama", dict(head_dim=32)),
    "mistral-sliding-window": ("mistral", dict(sliding_window=7)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-bias-untied-window": ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
}


def _load_pair(tmp_path, arch, overrides):
    hf = make_hf_model(tmp_path, arch, **overrides)
    checkpoint = open_hf_checkpoint(tmp_path)
    return hf, build_model(checkpoint.config, checkpoint.tensors())


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_prefill_and_incremental_decode_match_hf(tmp_path, case):
    arch, overrides = CASES[case]
    hf, ours = _load_pair(tmp_path, arch, overrides)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    expected = hf(ids).logits
    assert (ours(ids) - expected).abs().max() <= TOL

    cache = ours.new_cache(64)
    steps = [ours(ids[:, :10], cache)] + [ours(ids[:, t : t + 1], cache) for t in range(10, 24)]
    assert (torch.cat(steps, dim=1) - expected).abs().max() <= TOL
    assert cache.length == 24


@torch.no_grad()
def test_sliding_window_actually_masks(tmp_path):
    """Guard against a window that is parsed but ignored: full attention must give other logits."""
    hf, ours = _load_pair(tmp_path, "mistral", dict(sliding_window=4))
    assert ours.config.window_for_layer(0) == 4
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    windowed = ours(ids)
    for layer in ours.layers:
        layer.self_attn.window = None
    assert (ours(ids) - windowed).abs().max() > 1e-2


@torch.no_grad()
def test_dynamic_rope_beyond_trained_length_matches_hf(tmp_path):
    hf, ours = _load_pair(tmp_path, "llama", dict(max_position_embeddings=16,
                                                 rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    assert (ours(ids) - hf(ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_precision_checkpoints_load_and_run(tmp_path, dtype):
    hf = make_hf_model(tmp_path, "llama", dtype=dtype)
    checkpoint = open_hf_checkpoint(tmp_path)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    # fp32 compute from half-precision weights equals HF's fp32 compute from the same rounded weights.
    ours32 = build_model(checkpoint.config, checkpoint.tensors(), dtype=torch.float32)
    hf_rounded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert (ours32(ids) - hf_rounded(ids).logits).abs().max() <= TOL
    # Half-precision compute stays close to fp32 (loose: 2 layers of fp16/bf16 rounding).
    ours_half = build_model(checkpoint.config, checkpoint.tensors(), dtype=dtype)
    assert ours_half.embed_tokens.weight.dtype == dtype
    assert (ours_half(ids) - ours32(ids)).abs().max() < 0.1 * ours32(ids).abs().max()
    del hf


@torch.no_grad()
def test_sharded_safetensors_load(tmp_path):
    hf = make_hf_model(tmp_path / "one", "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    checkpoint = open_hf_checkpoint(tmp_path / "sharded")
    assert len(checkpoint.weight_files) > 1
    ours = build_model(checkpoint.config, checkpoint.tensors())
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    assert (ours(ids) - hf(ids).logits).abs().max() <= TOL


@torch.no_grad()
def test_greedy_tokens_match_hf_generate(tmp_path):
    from kilnlm.runtime.cache import DenseKVCache  # noqa: F401  (the engine's default cache)
    from kilnlm.runtime.generate import GenerationParams, Generator
    from kilnlm.runtime.sampling import SamplingParams

    hf, ours = _load_pair(tmp_path, "qwen2", dict(tie_word_embeddings=True))
    prompt = [5, 17, 99, 3, 42]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()

    class NoText:  # token-level check: detokenisation is tested elsewhere
        eos_ids = ()

        def stream(self):
            return type("S", (), {"push": lambda self, t: "", "flush": lambda self: ""})()

    generator = Generator(ours, NoText(), ours.new_cache(64))
    list(generator.stream(prompt, GenerationParams(max_new_tokens=20, sampling=SamplingParams(temperature=0))))
    assert generator.stats.token_ids == expected
