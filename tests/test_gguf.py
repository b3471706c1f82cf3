"""GGUF both ways: llama.cpp's real files load, our files match llama.cpp's conventions and re-load exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TOKENIZER_VOCAB, add_tokenizer, make_hf_model
from kilnlm.errors import CheckpointError
from kilnlm.export.checkpoint import open_checkpoint
from kilnlm.export.gguf import GGUFCheckpoint, permute_qk, unpermute_qk, write_gguf
from kilnlm.runtime.engine import Engine
from kilnlm.runtime.models import build_model

gguf = pytest.importorskip("gguf")

STORIES_GGUF = "checkpoints/stories260K-llamacpp/stories260K-f32.gguf"
STORIES_HF = "checkpoints/stories260K-hf"
EXPECTED = "checkpoints/stories260K-llamacpp/expected_greedy_t0.txt"


def _greedy_story(path) -> str:
    engine = Engine.load(path, progress=False)
    # llama2.c's 256 steps are 256 tokens after BOS; its printf adds the trailing newline.
    return engine.generate([engine.tokenizer.bos_id], max_tokens=256, temperature=0, ignore_eos=True) + "\n"


def test_llamacpp_written_stories260k_reproduces_published_text(shared_dir):
    assert _greedy_story(shared_dir / STORIES_GGUF) == (shared_dir / EXPECTED).read_text()


def test_stories260k_exported_as_f32_reproduces_published_text(shared_dir, tmp_path):
    out = tmp_path / "stories-f32.gguf"
    write_gguf(open_checkpoint(shared_dir / STORIES_HF), out, "f32")
    assert _greedy_story(out) == (shared_dir / EXPECTED).read_text()


def test_llamacpp_file_and_hf_folder_give_identical_logits(shared_dir):
    ours, theirs = open_checkpoint(shared_dir / STORIES_HF), GGUFCheckpoint(shared_dir / STORIES_GGUF)
    ids = torch.tensor([[1, 400, 20, 33, 77, 5, 300]])
    with torch.no_grad():
        a = build_model(ours.config, ours.tensors())(ids)
        b = build_model(theirs.config, theirs.tensors())(ids)
    assert torch.equal(a, b)


def test_qk_permutation_is_llamacpps_and_inverts():
    # For one head of dim 4, HF rows (r0, r1 | r2, r3) pair r0 with r2; llama.cpp interleaves (r0, r2, r1, r3).
    w = torch.arange(8.0).reshape(4, 2)
    assert permute_qk(w, 1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]
    w = torch.randn(32, 16)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)


MODELS = {
    "llama-gqa-llama3": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral-window": ("mistral", dict(sliding_window=7)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "llama-linear-yarn": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 16})),
}


def _hf_folder(tmp_path, sp_tokenizer_files, arch, overrides):
    folder = tmp_path / "hf"
    hf = make_hf_model(folder, arch, vocab_size=TOKENIZER_VOCAB, max_position_embeddings=64, **overrides)
    add_tokenizer(folder, sp_tokenizer_files)
    return hf, folder


@pytest.mark.parametrize("case", MODELS)
def test_f32_round_trip_gives_hf_logits(tmp_path, sp_tokenizer_files, case):
    arch, overrides = MODELS[case]
    hf, folder = _hf_folder(tmp_path, sp_tokenizer_files, arch, overrides)
    write_gguf(open_checkpoint(folder), tmp_path / "m.gguf", "f32")
    engine = Engine.load(tmp_path / "m.gguf", progress=False)
    ids = torch.randint(0, TOKENIZER_VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (engine.model(ids) - hf(ids).logits).abs().max() <= 1e-4
    assert engine.tokenizer.encode("Once upon a time") == Engine.load(folder, progress=False).tokenizer.encode(
        "Once upon a time")


def test_q8_0_logits_equal_the_ggml_rounded_model_and_stay_close(tmp_path, sp_tokenizer_files):
    hf, folder = _hf_folder(tmp_path, sp_tokenizer_files, "llama", {})
    ids = torch.randint(0, TOKENIZER_VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = hf(ids).logits
        write_gguf(open_checkpoint(folder), tmp_path / "m.gguf", "q8_0")
        got = Engine.load(tmp_path / "m.gguf", progress=False).model(ids)
        # The same HF model with every matrix rounded by ggml's reference Q8_0 must give the same logits.
        for param in hf.parameters():
            if param.dim() == 2:
                rounded = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                                 gguf.GGMLQuantizationType.Q8_0)
                param.copy_(torch.from_numpy(rounded))
        rounded_logits = hf(ids).logits
    assert (got - rounded_logits).abs().max() <= 1e-4
    # Q8_0 moves each weight by at most absmax/254 of its block (<0.4%). This random model's weights are
    # 10x larger than trained ones and it amplifies that into ~7% of the logit range (measured 6.8%);
    # on the trained stories260K the same export moves logits by 1.0% (test below).
    error = (got - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.15


@pytest.mark.parametrize("target", ["q4_0", "q4_1", "q8_0"])
def test_quantized_tensors_are_bit_exact_with_ggml_reference(tmp_path, sp_tokenizer_files, target):
    _, folder = _hf_folder(tmp_path, sp_tokenizer_files, "llama", {})
    source = open_checkpoint(folder)
    write_gguf(source, tmp_path / "m.gguf", target)
    written = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    weights = dict(source.tensors())
    qtype = gguf.GGMLQuantizationType[target.upper()]
    checks = {  # the file holds llama.cpp's permuted q rows, quantized exactly as ggml's reference does
        "blk.0.attn_q.weight": permute_qk(weights["layers.0.self_attn.q_proj.weight"], source.config.num_heads),
        "blk.1.ffn_down.weight": weights["layers.1.mlp.down_proj.weight"],
    }
    for name, weight in checks.items():
        assert written[name].tensor_type == qtype
        reference = gguf.quants.quantize(weight.numpy(), qtype)
        assert np.array_equal(np.asarray(written[name].data).reshape(-1), reference.reshape(-1)), name
    # Reading back dequantises bit for bit as ggml does.
    loaded = dict(GGUFCheckpoint(tmp_path / "m.gguf").tensors())["layers.1.mlp.down_proj.weight"]
    reference = gguf.quants.dequantize(gguf.quants.quantize(checks["blk.1.ffn_down.weight"].numpy(), qtype), qtype)
    assert np.array_equal(loaded.numpy(), reference)


def test_gguf_reader_sees_llamacpp_keys_and_names(tmp_path, sp_tokenizer_files):
    _, folder = _hf_folder(tmp_path, sp_tokenizer_files, "qwen2", dict(tie_word_embeddings=False))
    write_gguf(open_checkpoint(folder), tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    expected = {
        "general.architecture": "qwen2", "qwen2.context_length": 64, "qwen2.embedding_length": 64,
        "qwen2.block_count": 2, "qwen2.feed_forward_length": 96, "qwen2.attention.head_count": 4,
        "qwen2.attention.head_count_kv": 2, "qwen2.rope.dimension_count": 16, "qwen2.vocab_size": TOKENIZER_VOCAB,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0), "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True,
    }
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields["qwen2.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert len(fields["tokenizer.ggml.tokens"]) == TOKENIZER_VOCAB == len(fields["tokenizer.ggml.scores"])
    types = {t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors}
    assert types["token_embd.weight"] == ("Q8_0", [64, TOKENIZER_VOCAB])
    assert types["output.weight"] == ("Q8_0", [64, TOKENIZER_VOCAB])
    assert types["blk.0.attn_q.bias"] == ("F32", [64])
    assert types["blk.1.ffn_norm.weight"] == ("F32", [64])
    assert types["output_norm.weight"] == ("F32", [64])
    assert len(types) == 3 + 2 * 12


def test_type_rules_on_a_real_model(shared_dir, tmp_path):
    summary = write_gguf(open_checkpoint(shared_dir / STORIES_HF), tmp_path / "s.gguf", "q4_0")
    tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "s.gguf").tensors}
    assert tensors["blk.0.ffn_down.weight"] == "F16"  # 172 columns: not a multiple of 32
    assert tensors["blk.0.ffn_up.weight"] == "Q4_0"
    assert tensors["token_embd.weight"] == "Q8_0"  # tied: it is also the output projection
    assert tensors["blk.0.attn_norm.weight"] == "F32"
    assert summary.types == {"Q4_0": 30, "F16": 5, "Q8_0": 1, "F32": 11}


def test_q8_0_of_a_trained_model_keeps_logits_within_3_percent(shared_dir, tmp_path):
    write_gguf(open_checkpoint(shared_dir / STORIES_HF), tmp_path / "s.gguf", "q8_0")
    quantized, reference = Engine.load(tmp_path / "s.gguf", progress=False), Engine.load(shared_dir / STORIES_HF,
                                                                                         progress=False)
    ids = torch.tensor([reference.tokenizer.encode("Once upon a time, there was a little girl named Lily.")])
    with torch.no_grad():
        got, expected = quantized.model(ids), reference.model(ids)
    # Measured 0.97% of the logit range; each weight moves by at most 0.4% of its block's absmax.
    assert (got - expected).abs().max() / expected.abs().max() < 0.03
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_interrupted_export_leaves_nothing_behind(tmp_path, sp_tokenizer_files):
    _, folder = _hf_folder(tmp_path, sp_tokenizer_files, "llama", {})
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous content")

    def interrupt(name, ggml_type):
        if name.startswith("blk.1"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_gguf(open_checkpoint(folder), out, "q8_0", on_tensor=interrupt)
    assert out.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out.gguf"]


def _mutations(data: bytes, count: int, rng: np.random.Generator):
    for _ in range(count):
        kind = rng.integers(4)
        buf = bytearray(data)
        if kind == 0:
            yield bytes(buf[: rng.integers(0, len(buf))])  # truncated
        elif kind == 1:
            for pos in rng.integers(0, min(len(buf), 4096), size=rng.integers(1, 8)):
                buf[pos] = rng.integers(256)  # corrupted header bytes
            yield bytes(buf)
        elif kind == 2:
            pos = rng.integers(8, min(len(buf), 4096) - 8)  # a huge count or length somewhere in the header
            buf[pos : pos + 8] = int(rng.integers(1 << 40, 1 << 62)).to_bytes(8, "little")
            yield bytes(buf)
        else:
            for pos in rng.integers(0, len(buf), size=rng.integers(1, 64)):
                buf[pos] = rng.integers(256)  # anywhere, tensor data included
            yield bytes(buf)


def test_fuzzed_files_only_ever_raise_project_errors(tmp_path, sp_tokenizer_files):
    from kilnlm.errors import KilnError

    _, folder = _hf_folder(tmp_path, sp_tokenizer_files, "llama", {})
    write_gguf(open_checkpoint(folder), tmp_path / "good.gguf", "q4_0")
    data = (tmp_path / "good.gguf").read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"loaded": 0, "refused": 0}
    for i, mutated in enumerate(_mutations(data, 300, rng)):
        path = tmp_path / "fuzz.gguf"
        path.write_bytes(mutated)
        try:
            checkpoint = open_checkpoint(path)
            checkpoint.tokenizer()
            for _ in checkpoint.tensors():
                pass
            outcomes["loaded"] += 1
        except KilnError:
            outcomes["refused"] += 1
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutation {i} raised {type(err).__name__}: {err}")
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 10, outcomes


@pytest.mark.parametrize("payload, message", [
    (b"GGUF", "truncated"),
    (b"GGML\x03\x00\x00\x00" + bytes(16), "not a GGUF file"),
    (b"GGUF\x01\x00\x00\x00" + bytes(16), "version 1 is not supported"),
    (b"GGUF\x03\x00\x00\x00" + (1 << 50).to_bytes(8, "little") + bytes(8), "tensor count"),
    (b"GGUF\x03\x00\x00\x00" + bytes(8) + (1 << 50).to_bytes(8, "little"), "metadata count"),
])
def test_malformed_headers_are_refused_clearly(tmp_path, payload, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


def test_cli_quantize_inspect_tokenize(tmp_path, sp_tokenizer_files):
    _, folder = _hf_folder(tmp_path, sp_tokenizer_files, "llama", {})
    out = tmp_path / "m.gguf"
    kiln = [sys.executable, "-m", "kilnlm.cli"]
    result = subprocess.run([*kiln, "quantize", str(folder), "-o", str(out), "--type", "q4_0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "bits per weight" in result.stdout and "writing q4_0" in result.stderr
    info = json.loads(subprocess.run([*kiln, "inspect", str(out), "--json"], capture_output=True, text=True,
                                     timeout=120).stdout)
    assert info["metadata"]["general.architecture"] == "llama"
    assert {t["name"]: t["type"] for t in info["tensors"]}["blk.0.ffn_up.weight"] == "Q4_0"
    table = subprocess.run([*kiln, "inspect", str(out)], capture_output=True, text=True, timeout=120).stdout
    assert "blk.0.ffn_up.weight" in table and "bits per weight" in table
    ids = subprocess.run([*kiln, "tokenize", str(out), "--text", "Once upon a time"], capture_output=True,
                         text=True, timeout=120).stdout.split()
    assert [int(i) for i in ids] == Engine.load(folder, progress=False).tokenizer.encode("Once upon a time",
                                                                                          add_bos=False)
    generated = subprocess.run([*kiln, "generate", str(out), "-p", "Once", "-n", "5", "-t", "0"],
                               capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr


def test_llama_cpp_itself_agrees_on_greedy_tokens(tmp_path, shared_dir):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "stories-q8_0.gguf"
    write_gguf(open_checkpoint(shared_dir / STORIES_HF), out, "q8_0")
    engine = Engine.load(out, progress=False)
    engine.generate([engine.tokenizer.bos_id], max_tokens=40, temperature=0, ignore_eos=True)
    ours = engine.last_stats.token_ids
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, verbose=False)
    theirs = []
    for token in llm.generate([engine.tokenizer.bos_id], temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    assert theirs == ours


def test_export_into_a_missing_folder_is_a_clear_error(tmp_path, sp_tokenizer_files):
    _, folder = _hf_folder(tmp_path, sp_tokenizer_files, "llama", {})
    with pytest.raises(CheckpointError, match="does not exist"):
        write_gguf(open_checkpoint(folder), tmp_path / "missing" / "m.gguf", "q8_0")
    assert not (tmp_path / "missing").exists()
