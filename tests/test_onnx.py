"""ONNX export against onnxruntime (logits through GroupQueryAttention's past/present KV) and onnxruntime-genai
(greedy tokens), on tiny random Llama / Mistral / Qwen2 checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import TOKENIZER_VOCAB, add_tokenizer, make_hf_mamba, make_hf_model
from kilnlm.errors import CheckpointError, UnsupportedModelError
from kilnlm.export.hf import open_hf_checkpoint
from kilnlm.export.onnx import write_onnx
from kilnlm.runtime.models import build_model

ort = pytest.importorskip("onnxruntime")
TOL = 1e-4  # fp32: summation order in MatMul and GroupQueryAttention

CASES = {
    "llama3-rope": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral-window": ("mistral", dict(sliding_window=7)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "llama-head-8-unfused-rope": ("llama", dict(head_dim=8, rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def _export(tmp_path, tokenizer_files, arch: str, overrides: dict, **kwargs):
    make_hf_model(tmp_path / "hf", arch, vocab_size=TOKENIZER_VOCAB, **overrides)
    add_tokenizer(tmp_path / "hf", tokenizer_files)
    checkpoint = open_hf_checkpoint(tmp_path / "hf")
    write_onnx(checkpoint, tmp_path / "onnx", "f32", source_folder=tmp_path / "hf", **kwargs)
    return checkpoint, build_model(checkpoint.config, checkpoint.tensors())


def _run(session, ids: np.ndarray, past: dict, total: int, layers: int) -> dict:
    feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), np.int64), **past}
    if "position_ids" in {i.name for i in session.get_inputs()}:  # the unfused-RoPE graph
        feeds["position_ids"] = np.broadcast_to(np.arange(total - ids.shape[1], total), ids.shape).copy()
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feeds), strict=True))
    return out, {f"past_key_values.{i}.{kv}": out[f"present.{i}.{kv}"] for i in range(layers) for kv in ("key", "value")}


@pytest.mark.parametrize("case", CASES)
def test_onnxruntime_logits_match_kilnlm_through_the_kv_cache(tmp_path, sp_tokenizer_files, case):
    arch, overrides = CASES[case]
    checkpoint, ours = _export(tmp_path, sp_tokenizer_files, arch, overrides)
    config = checkpoint.config
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, TOKENIZER_VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(ids).numpy()
    empty = np.zeros((2, config.num_kv_heads, 0, config.head_dim), np.float32)
    past = {f"past_key_values.{i}.{kv}": empty for i in range(config.num_layers) for kv in ("key", "value")}
    out, past = _run(session, ids[:, :12].numpy(), past, 12, config.num_layers)
    logits = [out["logits"]]
    for t in range(12, 20):  # decode: one token at a time over the present KV of the steps before
        out, past = _run(session, ids[:, t : t + 1].numpy(), past, t + 1, config.num_layers)
        logits.append(out["logits"])
    assert np.abs(np.concatenate(logits, axis=1) - expected).max() <= TOL


def test_onnxruntime_genai_greedy_tokens_equal_kilnlm(tmp_path, shared_dir):
    og = pytest.importorskip("onnxruntime_genai")
    make_hf_model(tmp_path / "hf", "llama", vocab_size=32000)
    shutil.copyfile(shared_dir / "tokenizers/llama2-tokenizer.model", tmp_path / "hf" / "tokenizer.model")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "LlamaTokenizer", "add_bos_token": True}))
    checkpoint = open_hf_checkpoint(tmp_path / "hf")
    write_onnx(checkpoint, tmp_path / "onnx", "f32", source_folder=tmp_path / "hf", context_length=64)
    prompt = [1, 450, 4996, 17354, 1701]
    model = og.Model(str(tmp_path / "onnx"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 32, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = [int(t) for t in generator.get_sequence(0)][len(prompt):]

    ours = build_model(checkpoint.config, checkpoint.tensors())
    cache = ours.new_cache(64)
    with torch.no_grad():
        logits = ours(torch.tensor([prompt]), cache)[0, -1]
        mine = []
        for _ in range(32):
            mine.append(int(logits.argmax()))
            logits = ours(torch.tensor([[mine[-1]]]), cache)[0, -1]
    assert len(theirs) == 32 and theirs == mine


def test_genai_config_describes_the_graph(tmp_path, sp_tokenizer_files):
    checkpoint, _ = _export(tmp_path, sp_tokenizer_files, "llama", {}, ep="cuda", context_length=48)
    settings = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())
    decoder = settings["model"]["decoder"]
    assert decoder["num_key_value_heads"] == checkpoint.config.num_kv_heads and decoder["head_size"] == 16
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["session_options"]["provider_options"] == [{"cuda": {}}]
    assert settings["model"]["context_length"] == 48 and settings["search"]["max_length"] == 48
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [  # tokenizer.json written for genai
        "genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json"]


def test_unexportable_models_are_refused_before_writing(tmp_path):
    make_hf_model(tmp_path / "narrow", "qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1)
    with pytest.raises(UnsupportedModelError, match="per-layer sliding windows"):
        write_onnx(open_hf_checkpoint(tmp_path / "narrow"), tmp_path / "out", "f32")
    make_hf_mamba(tmp_path / "mamba", "mamba")
    with pytest.raises(UnsupportedModelError, match="mamba"):
        write_onnx(open_hf_checkpoint(tmp_path / "mamba"), tmp_path / "out", "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mamba", "narrow"]  # nothing written, no temp folder
    make_hf_model(tmp_path / "fine", "llama")
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        write_onnx(open_hf_checkpoint(tmp_path / "fine"), tmp_path / "out", "f32")


def test_cli_export_writes_a_folder_onnxruntime_loads(tmp_path, sp_tokenizer_files):
    from test_cli import run_kiln

    make_hf_model(tmp_path / "hf", "qwen2", tie_word_embeddings=True, vocab_size=TOKENIZER_VOCAB)
    add_tokenizer(tmp_path / "hf", sp_tokenizer_files)
    done = run_kiln("export", str(tmp_path / "hf"), "-o", str(tmp_path / "onnx"), "--type", "f16")
    assert done.returncode == 0, done.stderr
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].name == "logits"


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_matmul_nbits_holds_ggml_blocks_exactly(fmt):
    """An identity input makes every output a single product: MatMulNBits must return dequant(W)ᵀ bit for bit."""
    from onnx import TensorProto, helper

    from kilnlm.export.onnx import _Graph
    from kilnlm.quant.formats import QuantizedTensor

    weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(0)) * 0.1
    weight[3, :32] = 0.0  # an all-zero block (ggml stores d = -0.0 for Q4_0)
    packed = QuantizedTensor.from_float(weight, fmt)
    g = _Graph(np.float32, accuracy_level=0)
    out = g.linear("x", packed, "w")
    g.node("Identity", [out], ["y"])
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [96, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [96, 24])], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"x": np.eye(96, dtype=np.float32)})
    expected = packed.dequantize().t().numpy()
    if fmt == "q4_1":  # d * q and m come from two MatMuls: one rounding of their sum, as ggml's d * q + m
        assert np.abs(result - expected).max() <= 1e-6 * np.abs(expected).max()
    else:
        assert np.array_equal(result, expected)


def test_llm_int8_codes_and_outlier_columns(tmp_path):
    from onnx import TensorProto, helper

    from kilnlm.export.onnx import _Graph
    from kilnlm.quant.llm_int8 import quantize_llm_int8

    weight = torch.randn(16, 72, generator=torch.Generator().manual_seed(0))  # 72: a padded last block
    int8 = quantize_llm_int8(weight, torch.tensor([5, 40]), 6.0)
    g = _Graph(np.float32, accuracy_level=0)
    g.node("Identity", [g.linear("x", int8, "w")], ["y"])
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [72, 72])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [72, 16])], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"x": np.eye(72, dtype=np.float32)})
    assert np.array_equal(result, int8.dequantize().t().numpy())


def _logits_through(session, ids: np.ndarray, config) -> np.ndarray:
    empty = np.zeros((ids.shape[0], config.num_kv_heads, 0, config.head_dim), np.float32)
    past = {f"past_key_values.{i}.{kv}": empty for i in range(config.num_layers) for kv in ("key", "value")}
    out, _ = _run(session, ids, past, ids.shape[1], config.num_layers)
    return out["logits"]


@pytest.mark.parametrize("target", ["q8_0", "q4_0", "q4_1"])
def test_quantized_gguf_exports_with_its_blocks_unchanged(tmp_path, sp_tokenizer_files, target):
    from kilnlm.export.gguf import GGUFCheckpoint, write_gguf

    make_hf_model(tmp_path / "hf", "llama", vocab_size=TOKENIZER_VOCAB, intermediate_size=128)
    add_tokenizer(tmp_path / "hf", sp_tokenizer_files)
    gguf_path = tmp_path / f"model-{target}.gguf"
    write_gguf(open_hf_checkpoint(tmp_path / "hf"), gguf_path, target)
    checkpoint = GGUFCheckpoint(gguf_path)
    # The float target is ignored for the GGUF's block linears: they stay as stored.
    write_onnx(checkpoint, tmp_path / "onnx", "f32", accuracy_level=1)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in __import__("onnx").load(str(tmp_path / "onnx" / "model.onnx"),
                                                               load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    ours = build_model(checkpoint.config, checkpoint.tensors())  # the same blocks, dequantized
    ids = torch.randint(0, TOKENIZER_VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(ids).numpy()
    assert np.abs(_logits_through(session, ids.numpy(), checkpoint.config) - expected).max() <= TOL


def test_float_source_rounded_to_q4_0_like_the_gguf_writer(tmp_path, sp_tokenizer_files):
    from kilnlm.export.gguf import GGUFCheckpoint, write_gguf

    make_hf_model(tmp_path / "hf", "qwen2", vocab_size=TOKENIZER_VOCAB, intermediate_size=128, tie_word_embeddings=True)
    add_tokenizer(tmp_path / "hf", sp_tokenizer_files)
    hf = open_hf_checkpoint(tmp_path / "hf")
    write_onnx(hf, tmp_path / "onnx", "q4_0", accuracy_level=1)
    write_gguf(hf, tmp_path / "m.gguf", "q4_0")
    reference = GGUFCheckpoint(tmp_path / "m.gguf")
    ours = build_model(reference.config, reference.tensors())
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, TOKENIZER_VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours(ids).numpy()
    assert np.abs(_logits_through(session, ids.numpy(), hf.config) - expected).max() <= TOL


def test_llm_int8_gguf_exports_codes_and_outliers(tmp_path, sp_tokenizer_files):
    from kilnlm.export.gguf import GGUFCheckpoint, write_gguf
    from kilnlm.quant.llm_int8 import llm_int8_quantizer

    make_hf_model(tmp_path / "hf", "llama", vocab_size=TOKENIZER_VOCAB)
    add_tokenizer(tmp_path / "hf", sp_tokenizer_files)
    hf = open_hf_checkpoint(tmp_path / "hf")
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a little cat who liked to play.\n" * 60, encoding="utf-8")
    quantizer = llm_int8_quantizer(hf, calib_files=[str(calib)], nsamples=4, seqlen=32, threshold=0.5)
    write_gguf(hf, tmp_path / "int8.gguf", "f16", quantizer=quantizer)
    checkpoint = GGUFCheckpoint(tmp_path / "int8.gguf")
    assert any(len(cols) for cols in quantizer.outliers.values())
    write_onnx(checkpoint, tmp_path / "onnx", "f32", accuracy_level=1)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ours = build_model(checkpoint.config, checkpoint.tensors())  # float activations x dequantized int8 weights
    ids = torch.randint(0, TOKENIZER_VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours(ids).numpy()
    assert np.abs(_logits_through(session, ids.numpy(), checkpoint.config) - expected).max() <= TOL


def _genai_greedy(og, folder, prompt: list[int], steps: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]


@pytest.mark.parametrize("target", ["f32", "q8_0", "q4_0"])
def test_stories260k_unfused_rope_through_onnxruntime_genai(tmp_path, shared_dir, target):
    """A trained model with head size 8: RotaryEmbedding nodes and position_ids instead of GQA's fused RoPE."""
    og = pytest.importorskip("onnxruntime_genai")
    from kilnlm import Engine

    folder = shared_dir / "checkpoints/stories260K-hf"
    checkpoint = open_hf_checkpoint(folder)
    write_onnx(checkpoint, tmp_path / "onnx", target, source_folder=folder, context_length=128, accuracy_level=1)
    assert "position_ids" in json.loads((tmp_path / "onnx" / "genai_config.json").read_text())["model"]["decoder"][
        "inputs"]
    prompt = [1]
    theirs = _genai_greedy(og, tmp_path / "onnx", prompt, 32)
    source = folder
    if target != "f32":  # kilnlm on the same rounded weights
        from kilnlm.export.gguf import write_gguf

        source = tmp_path / "m.gguf"
        write_gguf(checkpoint, source, target)
    engine = Engine.load(source, progress=False)
    engine.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True)
    assert theirs == engine.last_stats.token_ids


# --------------------------------------------------------------------------------------------- runtime


def test_engine_runs_an_onnx_folder_like_the_torch_model(tmp_path, sp_tokenizer_files):
    from kilnlm import Engine
    from kilnlm.runtime.perplexity import perplexity

    _export(tmp_path, sp_tokenizer_files, "llama", {})
    torch_engine = Engine.load(tmp_path / "hf", progress=False)
    onnx_engine = Engine.load(tmp_path / "onnx", progress=False)
    prompt = "Once upon a time there was a little cat"
    expected = torch_engine.generate(prompt, max_tokens=20, temperature=0, ignore_eos=True)
    assert onnx_engine.generate(prompt, max_tokens=20, temperature=0, ignore_eos=True) == expected

    # The next turn runs only its new tokens (the KV arrays are cut back to the shared prefix) and agrees.
    ids = onnx_engine.tokenizer.encode(prompt, add_bos=True) + onnx_engine.last_stats.token_ids
    follow = ids + onnx_engine.tokenizer.encode(" who liked", add_bos=False)
    answer = onnx_engine.generate(follow, max_tokens=10, temperature=0, ignore_eos=True)
    assert onnx_engine.last_stats.reused_tokens == len(ids) - 1
    assert answer == torch_engine.generate(follow, max_tokens=10, temperature=0, ignore_eos=True)

    text = "Once upon a time there was a little cat who liked to play in the garden. " * 20
    ours = perplexity(torch_engine.model, torch_engine.tokenizer, text, ctx=32, chunks=4)
    theirs = perplexity(onnx_engine.model, onnx_engine.tokenizer, text, ctx=32, chunks=4)
    assert abs(theirs.ppl / ours.ppl - 1) < 1e-4


def test_cli_generate_and_bench_on_an_onnx_folder(tmp_path, sp_tokenizer_files):
    from test_cli import run_kiln

    _export(tmp_path, sp_tokenizer_files, "qwen2", dict(tie_word_embeddings=True))
    generated = run_kiln("generate", str(tmp_path / "onnx"), "-p", "Once upon a time", "-n", "8", "--temperature", "0")
    assert generated.returncode == 0 and generated.stdout, generated.stderr
    bench = run_kiln("bench", str(tmp_path / "onnx"), "--prompt-tokens", "16", "--new-tokens", "4")
    assert bench.returncode == 0 and "decode" in bench.stdout, bench.stderr
    refused = run_kiln("generate", str(tmp_path / "onnx"), "-p", "x", "--cache-type-k", "q8_0")
    assert refused.returncode != 0 and "graph's own type" in refused.stderr


# --------------------------------------------------------------------------------------------- tokenizer.json


SAMPLES = ["Once upon a time", "ROMEO:\nWhat light through yonder window breaks?", "  leading and  double spaces ",
           "tabs\tand\nnewlines", "ünïcödé 日本語 🎉", "digits 12345", ""]  # special-token text in prompts: see note


def test_tokenizer_json_for_sentencepiece_encodes_and_decodes_as_kilnlm():
    from tokenizers import Tokenizer as FastTokenizer

    from kilnlm.export.tokenizer_json import tokenizer_json
    from kilnlm.runtime.engine import demo_model_path
    from kilnlm.runtime.tokenizer import Tokenizer

    ours = Tokenizer.from_hf_folder(demo_model_path())
    fast = FastTokenizer.from_str(tokenizer_json(ours))
    text = (demo_model_path() / "TRAINING.md").read_text(encoding="utf-8")
    # Text that spells a special token ("<s>") is left out: around one, tokenizers and SentencePiece place the
    # "▁" of the next word differently (a known edge, not a model difference).
    for sample in SAMPLES + [line for line in text.splitlines() if "<" not in line]:
        ids = ours.encode(sample, add_bos=False)
        assert fast.encode(sample, add_special_tokens=False).ids == ids, sample
        assert fast.decode(ids) == ours.decode(ids)


def test_gguf_source_folder_gets_tokenizer_files_that_genai_and_kilnlm_agree_on(tmp_path, shared_dir):
    from kilnlm import Engine
    from kilnlm.export.gguf import GGUFCheckpoint

    source = shared_dir / "checkpoints/stories260K-llamacpp/stories260K-f32.gguf"
    write_onnx(GGUFCheckpoint(source), tmp_path / "onnx", "f32", context_length=128)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "onnx").iterdir()}
    onnx_engine, gguf_engine = Engine.load(tmp_path / "onnx", progress=False), Engine.load(source, progress=False)
    for sample in SAMPLES:
        assert onnx_engine.tokenizer.encode(sample) == gguf_engine.tokenizer.encode(sample), sample
    assert (onnx_engine.generate("Once upon a time", max_tokens=24, temperature=0)
            == gguf_engine.generate("Once upon a time", max_tokens=24, temperature=0))
    og = pytest.importorskip("onnxruntime_genai")
    genai = og.Tokenizer(og.Model(str(tmp_path / "onnx")))
    for sample in SAMPLES[:2]:
        assert [int(t) for t in genai.encode(sample)] == gguf_engine.tokenizer.encode(sample, add_bos=False)


def test_gptq_file_export_keeps_its_perplexity_and_greedy_tokens(tmp_path, shared_dir):
    """A GPTQ Q4_0 GGUF exported to ONNX: perplexity within 0.1% of the GGUF's and genai's greedy tokens equal."""
    from kilnlm import Engine
    from kilnlm.export.gguf import GGUFCheckpoint, write_gguf
    from kilnlm.quant.gptq import gptq_quantizer
    from kilnlm.runtime.perplexity import perplexity

    folder = shared_dir / "checkpoints/stories260K-hf"
    text = (shared_dir / "text/calibration/tiny.txt").read_text(encoding="utf-8")
    calib = tmp_path / "calib.txt"
    calib.write_text(text[:20_000], encoding="utf-8")
    hf = open_hf_checkpoint(folder)
    gguf_path = tmp_path / "gptq-q4_0.gguf"
    write_gguf(hf, gguf_path, "q4_0", quantizer=gptq_quantizer(hf, calib_files=[str(calib)], nsamples=8, seqlen=64))
    write_onnx(GGUFCheckpoint(gguf_path), tmp_path / "onnx", "f32", context_length=256, accuracy_level=1)
    gguf_engine, onnx_engine = Engine.load(gguf_path, progress=False), Engine.load(tmp_path / "onnx", progress=False)
    scored = text[-30_000:]
    ours = perplexity(gguf_engine.model, gguf_engine.tokenizer, scored, ctx=128, chunks=6, batch=2)
    theirs = perplexity(onnx_engine.model, onnx_engine.tokenizer, scored, ctx=128, chunks=6, batch=2)
    assert abs(theirs.ppl / ours.ppl - 1) < 1e-3
    og = pytest.importorskip("onnxruntime_genai")
    gguf_engine.generate([1], max_tokens=32, temperature=0, ignore_eos=True)
    assert _genai_greedy(og, tmp_path / "onnx", [1], 32) == gguf_engine.last_stats.token_ids


def test_decode_benchmark_dry_run_reports_all_three_paths():
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "onnx_decode.py"), "--dry-run", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["decode_tokens_per_s"]) == {"kilnlm_torch", "onnxruntime", "onnxruntime_genai"}
    assert report["decode_tokens_per_s"]["onnxruntime"] > 0 and report["bandwidth_gb_per_s"] > 0


@pytest.mark.parametrize("target", ["q4_0", "q8_0"])
def test_quantized_token_embeddings_use_gather_block_quantized(tmp_path, sp_tokenizer_files, target):
    import onnx

    from kilnlm.export.gguf import GGUFCheckpoint, write_gguf

    make_hf_model(tmp_path / "hf", "llama", vocab_size=TOKENIZER_VOCAB, intermediate_size=128)  # untied embedding
    add_tokenizer(tmp_path / "hf", sp_tokenizer_files)
    write_gguf(open_hf_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", target)
    checkpoint = GGUFCheckpoint(tmp_path / "m.gguf")
    assert checkpoint.tensor_format("embed_tokens.weight").name == target
    write_onnx(checkpoint, tmp_path / "onnx", "f32", accuracy_level=1)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    assert "GatherBlockQuantized" in {node.op_type for node in graph.node}
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ours = build_model(checkpoint.config, checkpoint.tensors())
    ids = torch.randint(0, TOKENIZER_VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ours(ids).numpy()
    assert np.abs(_logits_through(session, ids.numpy(), checkpoint.config) - expected).max() <= TOL


def test_llm_int8_file_through_onnxruntime_genai(tmp_path, shared_dir):
    """LLM.int8 codes + fp16 outlier columns: genai's greedy tokens equal kilnlm's float-activation model on the
    same weights (kilnlm's own runtime quantizes activations to int8, which the ONNX graph does not)."""
    og = pytest.importorskip("onnxruntime_genai")
    from kilnlm.export.gguf import GGUFCheckpoint, write_gguf
    from kilnlm.quant.llm_int8 import llm_int8_quantizer

    folder = shared_dir / "checkpoints/stories260K-hf"
    calib = tmp_path / "calib.txt"
    calib.write_text((shared_dir / "text/calibration/tiny.txt").read_text(encoding="utf-8")[:20_000])
    hf = open_hf_checkpoint(folder)
    write_gguf(hf, tmp_path / "int8.gguf", "f16",
               quantizer=llm_int8_quantizer(hf, calib_files=[str(calib)], nsamples=8, seqlen=64))
    checkpoint = GGUFCheckpoint(tmp_path / "int8.gguf")
    write_onnx(checkpoint, tmp_path / "onnx", "f32", context_length=64, accuracy_level=1)
    ours = build_model(checkpoint.config, checkpoint.tensors())
    cache = ours.new_cache(64)
    tokens = []
    with torch.no_grad():
        logits = ours(torch.tensor([[1]]), cache)[0, -1]
        for _ in range(32):
            tokens.append(int(logits.argmax()))
            logits = ours(torch.tensor([[tokens[-1]]]), cache)[0, -1]
    assert _genai_greedy(og, tmp_path / "onnx", [1], 32) == tokens


def test_a_malformed_genai_config_is_a_clear_error(tmp_path):
    from kilnlm import Engine

    (tmp_path / "genai_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="genai_config.json: not readable JSON"):
        Engine.load(tmp_path, progress=False)
    (tmp_path / "genai_config.json").write_text('{"model": {}}')
    with pytest.raises(CheckpointError, match="model.onnx, which is missing"):
        Engine.load(tmp_path, progress=False)
