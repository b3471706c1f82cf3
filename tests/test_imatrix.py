"""Importance matrices (quant/imatrix.py, `kiln imatrix`, `kiln quantize --imatrix`)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from kilnlm import Engine
from kilnlm.export.gguf import gguf_name
from kilnlm.quant.formats import QuantizationError, get_format
from kilnlm.quant.imatrix import ImatrixError, ImportanceMatrix, collect
from kilnlm.runtime.engine import demo_model_path

TEXT = " ".join(["ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."] * 40)


@pytest.fixture(scope="module")
def demo():
    return Engine.load(demo_model_path(), progress=False, context_length=64)


@pytest.fixture(scope="module")
def matrix(demo):
    tokens = demo.tokenizer.encode(TEXT, add_bos=False)
    return collect(demo.model, tokens, ctx=64, bos_id=demo.tokenizer.bos_id, source="text.txt",
                   gguf_name=lambda name: gguf_name(name, "llama"), max_chunks=4, progress=False)


def test_collect_sums_the_squared_inputs_of_every_block_linear(demo, matrix) -> None:
    layers = demo.config.num_layers
    assert len(matrix.sums) == 7 * layers and matrix.chunk_count == 4 and matrix.chunk_size == 64
    assert set(matrix.counts.values()) == {4 * 64}  # every token of every chunk
    # The input of layer 0's q/k/v is the normed embedding of the chunk, BOS first: recompute it directly.
    tokens = demo.tokenizer.encode(TEXT, add_bos=False)
    expected = torch.zeros(demo.config.hidden_size, dtype=torch.float64)
    for chunk in range(4):
        ids = tokens[chunk * 64:(chunk + 1) * 64]
        ids[0] = demo.tokenizer.bos_id
        x = demo.model.layers[0].input_layernorm(demo.model.embed_tokens(torch.tensor([ids]))).detach().double()
        expected += (x[0] ** 2).sum(0)
    for part in ("attn_q", "attn_k", "attn_v"):
        assert np.allclose(matrix.sums[f"blk.0.{part}.weight"], expected.numpy(), rtol=1e-6)
    assert matrix.importance("blk.0.attn_q.weight").shape == (demo.config.hidden_size,)
    assert matrix.importance("output.weight") is None  # llama-imatrix skips the output projection too


def test_gguf_and_legacy_files_read_back(matrix, tmp_path) -> None:
    path = tmp_path / "m.imatrix"
    matrix.save(path)
    loaded = ImportanceMatrix.load(path)
    assert loaded.datasets == ["text.txt"] and loaded.chunk_count == 4 and loaded.chunk_size == 64
    for name in matrix.sums:
        assert torch.allclose(loaded.importance(name), matrix.importance(name), rtol=1e-6)
    # llama-imatrix's legacy .dat: entries of (name, ncall, mean * ncall), then the chunk count and the dataset
    legacy = tmp_path / "m.dat"
    entries = sorted(matrix.sums)
    with legacy.open("wb") as out:
        out.write(struct.pack("<i", len(entries)))
        for name in entries:
            values = (matrix.importance(name).numpy() * 3).astype("<f4")
            out.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 3, values.size))
            out.write(values.tobytes())
        out.write(struct.pack("<i", 4) + struct.pack("<i", 8) + b"text.txt")
    old = ImportanceMatrix.load(legacy)
    assert old.chunk_count == 4 and old.datasets == ["text.txt"]
    for name in entries:
        assert torch.allclose(old.importance(name), matrix.importance(name), rtol=1e-6)


def test_bad_files_and_mismatched_entries_are_refused(tmp_path, matrix) -> None:
    bad = tmp_path / "bad.imatrix"
    bad.write_bytes(b"\x05\x00\x00\x00garbage")  # five entries claimed, then noise
    with pytest.raises(ImatrixError, match="not an importance matrix"):
        ImportanceMatrix.load(bad)
    short = tmp_path / "short.imatrix"
    short.write_bytes(struct.pack("<ii", 1, 4) + b"blk.")
    with pytest.raises(ImatrixError, match="ends before"):
        ImportanceMatrix.load(short)
    with pytest.raises(ImatrixError, match="cannot read"):
        ImportanceMatrix.load(tmp_path / "missing.imatrix")
    with pytest.raises(QuantizationError, match="256 values for 512 columns"):
        get_format("q4_k").quantize(torch.randn(2, 512), importance=matrix.importance("blk.0.attn_q.weight"))


def test_kiln_imatrix_then_quantize_with_it(tmp_path) -> None:
    import gguf

    from test_cli import run_kiln

    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    result = run_kiln("imatrix", str(demo_model_path()), "--text", str(text), "-o", str(tmp_path / "d.imatrix"),
                      "--ctx", "64", "--chunks", "3")
    assert result.returncode == 0, result.stderr
    assert "42 weights, 3 chunks of 64 tokens" in result.stdout
    out = tmp_path / "d.gguf"
    result = run_kiln("quantize", str(demo_model_path()), "-o", str(out), "--type", "q4_0", "--imatrix",
                      str(tmp_path / "d.imatrix"))
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(out)
    assert reader.fields["quantize.imatrix.chunks_count"].contents() == 3
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    # llama.cpp's rule with an imatrix: the first eighth of ffn_down layers of Q4_0 get Q4_1 (here F16 fallback)
    assert types["blk.1.attn_q.weight"] == "Q4_0"
    plain = tmp_path / "plain.gguf"
    assert run_kiln("quantize", str(demo_model_path()), "-o", str(plain), "--type", "q4_0").returncode == 0
    weighted = np.asarray([t for t in reader.tensors if t.name == "blk.1.attn_q.weight"][0].data)
    unweighted = np.asarray([t for t in gguf.GGUFReader(plain).tensors if t.name == "blk.1.attn_q.weight"][0].data)
    assert not np.array_equal(weighted, unweighted)  # the importance changed the rounding
    result = run_kiln("quantize", str(demo_model_path()), "-o", str(tmp_path / "g.gguf"), "--type", "q4_0",
                      "--imatrix", str(tmp_path / "d.imatrix"), "--method", "gptq")
    assert result.returncode != 0 and "--imatrix weights round-to-nearest" in result.stderr
