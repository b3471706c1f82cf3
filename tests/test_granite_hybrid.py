"""Granite-4.0-H (dense GraniteMoeHybridForCausalLM) against HF transformers: logits, greedy tokens, the hybrid
cache (keys and values for attention layers, recurrent state for Mamba layers), GGUF both ways."""

from __future__ import annotations

import pytest
import torch

from conftest import TOKENIZER_VOCAB, add_tokenizer, make_hf_granite_hybrid
from kilnlm import Engine
from kilnlm.errors import UnsupportedModelError
from kilnlm.export.gguf import GGUFCheckpoint, write_gguf
from kilnlm.export.gguf_file import GGUFFile
from kilnlm.export.hf import open_hf_checkpoint
from kilnlm.runtime.kv_stores import FullStore
from kilnlm.runtime.models import build_model
from kilnlm.runtime.state_cache import StateStore

transformers = pytest.importorskip("transformers")
TOL = 1e-4

CASES = {
    "nope": {},
    "rope": dict(position_embedding_type="rope"),
    "two-groups-tied": dict(layer_types=["attention", "mamba", "attention", "mamba"], mamba_n_groups=2,
                            tie_word_embeddings=True),
}


def _load(folder, **overrides):
    hf = make_hf_granite_hybrid(folder, **overrides)
    checkpoint = open_hf_checkpoint(folder)
    return hf, checkpoint, build_model(checkpoint.config, checkpoint.tensors())


def _ids(batch: int, length: int, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_prefill_and_decode_match_hf(tmp_path, case):
    hf, checkpoint, ours = _load(tmp_path, **CASES[case])
    ids = _ids(2, 21)
    expected = hf(ids).logits
    assert (ours(ids) - expected).abs().max() <= TOL
    cache = ours.new_cache(64, batch=2)
    kinds = checkpoint.config.layer_kinds()
    assert [isinstance(store, StateStore) for store in cache.stores] == [k == "mamba" for k in kinds]
    assert all(isinstance(store, FullStore) for store, k in zip(cache.stores, kinds, strict=True) if k == "attention")
    steps = [ours(ids[:, :9], cache)] + [ours(ids[:, t : t + 1], cache) for t in range(9, 21)]
    assert (torch.cat(steps, dim=1) - expected).abs().max() <= TOL


@torch.no_grad()
def test_multipliers_are_applied(tmp_path):
    """Guard: the model with every Granite multiplier reset to 1 must give other logits."""
    _, checkpoint, ours = _load(tmp_path)
    ids = _ids(1, 12)
    reference = ours(ids)
    plain = build_model(type(checkpoint.config)(**{**checkpoint.config.__dict__, "embedding_multiplier": 1.0}),
                        checkpoint.tensors())
    assert (plain(ids) - reference).abs().max() > 1e-3


@torch.no_grad()
def test_greedy_tokens_equal_hf_generate(tmp_path):
    hf, _, ours = _load(tmp_path)
    prompt = _ids(1, 5, seed=3)
    expected = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, 5:].tolist()
    cache = ours.new_cache(64)
    logits = ours(prompt, cache)[0, -1]
    tokens = []
    for _ in range(32):
        tokens.append(int(logits.argmax()))
        logits = ours(torch.tensor([[tokens[-1]]]), cache)[0, -1]
    assert tokens == expected


@pytest.mark.parametrize("case", ["nope", "two-groups-tied"])
def test_gguf_round_trip(tmp_path, sp_tokenizer_files, case):
    hf, checkpoint, _ = _load(tmp_path / "hf", vocab_size=TOKENIZER_VOCAB, **CASES[case])
    add_tokenizer(tmp_path / "hf", sp_tokenizer_files)
    out = tmp_path / "hybrid.gguf"
    write_gguf(open_hf_checkpoint(tmp_path / "hf"), out, "f32")
    file = GGUFFile(out)
    meta = file.metadata
    assert meta["general.architecture"] == "granitehybrid"
    kinds = checkpoint.config.layer_kinds()
    assert list(meta["granitehybrid.attention.head_count_kv"]) == [2 if k == "attention" else 0 for k in kinds]
    assert meta["granitehybrid.rope.scaling.finetuned"] is False
    assert meta["granitehybrid.ssm.time_step_rank"] == 8 and meta["granitehybrid.ssm.inner_size"] == 128
    assert meta["granitehybrid.embedding_scale"] == pytest.approx(3.0)
    mamba_layer = kinds.index("mamba")
    attention_layer = kinds.index("attention")
    assert f"blk.{mamba_layer}.ssm_a" in file.tensors and f"blk.{mamba_layer}.ffn_gate.weight" in file.tensors
    assert f"blk.{attention_layer}.attn_q.weight" in file.tensors
    assert file.tensors[f"blk.{mamba_layer}.ffn_up.weight"].shape == (96, 64)  # the fused input_linear, split

    reread = GGUFCheckpoint(out)
    assert reread.config.layer_types == checkpoint.config.layer_types
    model = build_model(reread.config, reread.tensors())
    ids = _ids(1, 16, vocab=TOKENIZER_VOCAB)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= TOL


def test_engine_second_turn_reuses_the_prompt(tmp_path, sp_tokenizer_files):
    make_hf_granite_hybrid(tmp_path, vocab_size=TOKENIZER_VOCAB)
    add_tokenizer(tmp_path, sp_tokenizer_files)
    engine = Engine.load(tmp_path, progress=False, kv_type="f32")
    first = "Once upon a time there was a little dog"
    engine.generate(first, max_tokens=10, temperature=0, ignore_eos=True)
    prompt_ids = engine.tokenizer.encode(first, add_bos=True)
    second = prompt_ids + engine.last_stats.token_ids + engine.tokenizer.encode(" who liked", add_bos=False)
    follow_up = engine.generate(second, max_tokens=10, temperature=0, ignore_eos=True)
    assert engine.last_stats.reused_tokens >= len(prompt_ids)
    assert Engine.load(tmp_path, progress=False).generate(second, max_tokens=10, temperature=0,
                                                           ignore_eos=True) == follow_up


def test_moe_variant_is_refused(tmp_path):
    import json

    make_hf_granite_hybrid(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_local_experts"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="experts"):
        open_hf_checkpoint(tmp_path)


def test_gptq_walks_attention_and_mamba_blocks(tmp_path, sp_tokenizer_files):
    from kilnlm.quant.gptq import gptq_quantizer

    hf, _, _ = _load(tmp_path / "hf", vocab_size=TOKENIZER_VOCAB, hidden_size=64, shared_intermediate_size=64)
    add_tokenizer(tmp_path / "hf", sp_tokenizer_files)
    calib = tmp_path / "calib.txt"
    calib.write_text(("Once upon a time there was a little cat who liked to play. " * 4 + "\n") * 30, encoding="utf-8")
    checkpoint = open_hf_checkpoint(tmp_path / "hf")
    quantizer = gptq_quantizer(checkpoint, calib_files=[str(calib)], nsamples=4, seqlen=32, seed=0)
    out = tmp_path / "gptq.gguf"
    write_gguf(checkpoint, out, "q4_0", quantizer=quantizer)
    solved = {name.split(".", 2)[2] for name in quantizer.errors}
    assert {"mamba.in_proj.weight", "self_attn.q_proj.weight", "mlp.down_proj.weight"} <= solved
    types = {name: info.type_name for name, info in GGUFFile(out).tensors.items()}
    assert types["blk.0.ssm_in.weight"] == "Q4_0" and types["blk.1.attn_q.weight"] == "Q4_0"
    model = Engine.load(out, progress=False).model
    ids = _ids(1, 16, vocab=TOKENIZER_VOCAB)
    with torch.no_grad():
        expected = hf(ids).logits
        assert (model(ids) - expected).abs().max() / expected.abs().max() < 0.6
