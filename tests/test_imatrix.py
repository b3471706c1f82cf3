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


def test_llama_cpp_reads_the_imatrix_file_as_its_loader_does(matrix, tmp_path) -> None:
    """ggml's own GGUF parser (libggml-base from llama-cpp-python, an optional oracle) accepts the file, with the
    key types and tensor pairs common/imatrix-loader.cpp requires, and reads back the same sums and counts."""
    import ctypes
    from pathlib import Path

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional oracle")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    for name, restype in (("gguf_find_key", ctypes.c_int64), ("gguf_get_kv_type", ctypes.c_int),
                          ("gguf_get_arr_type", ctypes.c_int), ("gguf_get_val_u32", ctypes.c_uint32),
                          ("gguf_get_n_tensors", ctypes.c_int64), ("gguf_get_tensor_name", ctypes.c_char_p),
                          ("gguf_get_tensor_type", ctypes.c_int), ("gguf_get_tensor_offset", ctypes.c_size_t),
                          ("gguf_get_tensor_size", ctypes.c_size_t), ("gguf_get_data_offset", ctypes.c_size_t)):
        getattr(lib, name).restype = restype
    path = tmp_path / "m.imatrix"
    matrix.save(path)
    ctx = lib.gguf_init_from_file(str(path).encode(), InitParams(True, None))
    assert ctx, "ggml could not parse the file"
    ctx = ctypes.c_void_p(ctx)
    uint32, string, array = 4, 8, 9  # enum gguf_type
    datasets = lib.gguf_find_key(ctx, b"imatrix.datasets")
    assert lib.gguf_get_kv_type(ctx, datasets) == array and lib.gguf_get_arr_type(ctx, datasets) == string
    for key, value in ((b"imatrix.chunk_count", 4), (b"imatrix.chunk_size", 64)):
        index = lib.gguf_find_key(ctx, key)
        assert lib.gguf_get_kv_type(ctx, index) == uint32 and lib.gguf_get_val_u32(ctx, index) == value
    data, base = path.read_bytes(), lib.gguf_get_data_offset(ctx)
    read: dict[str, np.ndarray] = {}
    for i in range(lib.gguf_get_n_tensors(ctx)):
        name = lib.gguf_get_tensor_name(ctx, i).decode()
        assert lib.gguf_get_tensor_type(ctx, i) == 0  # GGML_TYPE_F32
        start = base + lib.gguf_get_tensor_offset(ctx, i)
        read[name] = np.frombuffer(data[start:start + lib.gguf_get_tensor_size(ctx, i)], dtype="<f4")
    lib.gguf_free(ctx)
    assert set(read) == {f"{n}.{part}" for n in matrix.sums for part in ("in_sum2", "counts")}
    for name, sums in matrix.sums.items():
        assert np.allclose(read[f"{name}.in_sum2"], sums, rtol=1e-6)
        assert read[f"{name}.counts"].tolist() == [float(matrix.counts[name])]


def test_an_output_folder_that_does_not_exist_is_refused_before_any_work(tmp_path) -> None:
    from test_cli import run_kiln

    result = run_kiln("imatrix", str(demo_model_path()), "--text", str(tmp_path / "missing.txt"), "-o",
                      str(tmp_path / "nowhere" / "m.imatrix"))
    assert result.returncode != 0 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ImatrixError, match="does not exist"):
        ImportanceMatrix().save(tmp_path / "nowhere" / "m.imatrix")
