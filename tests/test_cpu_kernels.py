"""The compiled CPU kernels (kernels/cpu.c) against the format registry and the pure-torch references."""

from __future__ import annotations

import pytest
import torch

from kilnlm.kernels import cpu
from kilnlm.kernels.attention import attention_ref
from kilnlm.kernels.norm import rms_norm_ref
from kilnlm.kernels.rope import apply_rotary_ref
from kilnlm.kernels.cpu import CpuKernelError, CpuOptions, decode_attention, ggml_embedding, ggml_embedding_ref, \
    ggml_matmul, ggml_matmul_ref
from kilnlm.quant.formats import QuantizedTensor, get_format
from kilnlm.runtime.models.quantized_linear import cpu_matrix

FORMATS = ["f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k"]
INTEGER_FORMATS = [f for f in FORMATS if f not in ("f16", "bf16")]

needs_compiler = pytest.mark.skipif(not cpu.kernel_status().compiled,
                                    reason=f"no CPU kernels here: {cpu.kernel_status().detail}")


def _matrix(fmt: str, rows: int = 48, cols: int = 512, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(rows, cols, generator=generator) * 0.05
    weights[:, 7] *= 20  # an outlier column, as trained weights have
    tensor = QuantizedTensor.from_float(weights, get_format(fmt))
    return cpu_matrix(tensor), tensor.format.dequantize(tensor.data, tensor.shape)


@needs_compiler
@pytest.mark.parametrize("fmt", FORMATS)
def test_gathered_rows_are_the_registrys_values(fmt):
    matrix, dense = _matrix(fmt)
    ids = torch.tensor([[3, 0, 47], [3, 11, 29]])
    got = ggml_embedding(ids, matrix, CpuOptions(threads=2))
    assert got.shape == (2, 3, 512)
    # float32 products of exact codes and scales; d * q + m formats may fuse into one rounding (an FMA)
    torch.testing.assert_close(got, dense[ids], rtol=2e-7, atol=1e-9)
    torch.testing.assert_close(ggml_embedding_ref(ids, matrix), dense[ids], rtol=0, atol=0)


@needs_compiler
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 20, 40])  # decode, a batch, a short prompt, one past MAX_GEMV_ROWS
def test_float32_products_match_the_dequantised_matmul(fmt, rows):
    matrix, dense = _matrix(fmt)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(1))
    want = x @ dense.T
    got = ggml_matmul(x, matrix, CpuOptions(threads=2, activations="f32"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ggml_matmul_ref(x, matrix), want, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("fmt, cols", [("f16", 4096 + 40), ("bf16", 4096), ("q4_0", 4096 + 32), ("q6_k", 4096)])
def test_wide_rows_four_a_pass_match_the_dequantised_matmul(fmt, cols):
    """From 4096 columns one-row products read four weight rows a pass (cpu.c WIDE_X); 10 rows leave two over."""
    matrix, dense = _matrix(fmt, rows=10, cols=cols)
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(3))
    got = ggml_matmul(x, matrix, CpuOptions(threads=1, activations="f32"))
    torch.testing.assert_close(got, x @ dense.T, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("fmt", INTEGER_FORMATS)
@pytest.mark.parametrize("activations, tolerance", [("i16", 1e-4), ("i8", 2e-2)])
def test_integer_activations_stay_within_their_precision(fmt, activations, tolerance):
    cols = 768 if get_format(fmt).block_size == 256 else 800  # 25 groups of 32: three passes of eight and one left
    matrix, dense = _matrix(fmt, cols=cols)
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(2))
    x[:, 100] = 8.0  # an activation outlier sets its block's scale
    want = x @ dense.T
    options = CpuOptions(threads=1, activations=activations)
    got = torch.cat([ggml_matmul(row[None], matrix, options) for row in x])  # one row: a decode step
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert error < tolerance
    assert error > 1e-7  # the activations really were quantised (f32 products land near 1e-7)
    # several rows (a batch, a prompt) take float32 products whatever the option
    torch.testing.assert_close(ggml_matmul(x, matrix, options), want, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_threads_split_rows_without_changing_any_bit():
    matrix, _ = _matrix("q4_k", rows=300)
    x = torch.randn(2, 512)
    one = ggml_matmul(x, matrix, CpuOptions(threads=1))
    assert torch.equal(one, ggml_matmul(x, matrix, CpuOptions(threads=2)))
    assert torch.equal(one, ggml_matmul(x, matrix, CpuOptions(threads=7)))


@needs_compiler
def test_bf16_inputs_come_back_in_their_dtype():
    matrix, dense = _matrix("q8_0")
    x = torch.randn(1, 1, 512).bfloat16()
    got = ggml_matmul(x, matrix, CpuOptions())
    assert got.dtype == torch.bfloat16 and got.shape == (1, 1, 48)
    torch.testing.assert_close(got.float(), (x.float() @ dense.T), rtol=2e-2, atol=2e-2)


def test_bad_options_and_shapes_are_refused():
    with pytest.raises(CpuKernelError, match="activations"):
        CpuOptions(activations="fp8")
    with pytest.raises(CpuKernelError, match="threads"):
        CpuOptions(threads=0)
    matrix, _ = _matrix("q4_0")
    if cpu.kernel_status().compiled:
        with pytest.raises(CpuKernelError, match="does not fit"):
            ggml_matmul(torch.randn(1, 256), matrix, CpuOptions())
    with pytest.raises(CpuKernelError, match="no CPU kernel"):
        cpu.GGMLMatrix(2, (4, 48), torch.zeros(4, 27, dtype=torch.uint8), lambda d: d)  # 48 columns: no whole block


@needs_compiler
@pytest.mark.parametrize("heads, kv_heads, keys, window", [(8, 8, 70, None), (8, 2, 300, None), (6, 3, 90, 33),
                                                          (4, 1, 5, None), (4, 2, 9, 0)])
def test_decode_attention_matches_the_reference(heads, kv_heads, keys, window):
    generator = torch.Generator().manual_seed(heads * keys)
    # a cache's buffers: room for more positions than are filled, so heads are strided
    k_buffer = torch.randn(2, kv_heads, keys + 40, 64, generator=generator) * 2
    v_buffer = torch.randn(2, kv_heads, keys + 40, 64, generator=generator)
    k, v = k_buffer[:, :, :keys], v_buffer[:, :, :keys]
    q = torch.randn(2, heads, 1, 64, generator=generator) * 2
    got = decode_attention(q, k, v, window, threads=2)
    torch.testing.assert_close(got, attention_ref(q, k, v, window), rtol=1e-4, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_reads_a_16_bit_cache_as_stored(dtype):
    generator = torch.Generator().manual_seed(3)
    k_buffer = torch.randn(1, 2, 150, 64, generator=generator).to(dtype)
    v_buffer = torch.randn(1, 2, 150, 64, generator=generator).to(dtype)
    k, v = k_buffer[:, :, :100], v_buffer[:, :, :100]
    q = torch.randn(1, 8, 1, 64, generator=generator)
    got = decode_attention(q, k, v, None, threads=2)
    torch.testing.assert_close(got, attention_ref(q, k.float(), v.float(), None), rtol=1e-4, atol=1e-5)


@needs_compiler
def test_decode_attention_declines_what_it_does_not_handle():
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 4, 10, 64)
    assert decode_attention(q.half(), k.half(), k.half(), None, 1) is None  # a float16 model: the reference runs
    assert decode_attention(q, k.half(), k.bfloat16(), None, 1) is None  # keys and values of different types
    assert decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, None, 1) is None  # column-major
    assert decode_attention(torch.randn(1, 4, 1, 40), torch.randn(1, 4, 10, 40), torch.randn(1, 4, 10, 40),
                            None, 1) is None  # head size not a multiple of 16


def test_a_missing_compiler_is_reported_not_hidden(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu._build.cache_clear()
    try:
        status = cpu.kernel_status()
        assert not status.compiled and "no C compiler" in status.detail
        matrix, dense = _matrix("q4_0")
        x = torch.randn(1, 512)
        torch.testing.assert_close(ggml_matmul(x, matrix, CpuOptions()), x @ dense.T, rtol=1e-5, atol=1e-5)
    finally:
        cpu._build.cache_clear()


def test_a_compiler_error_names_the_compiler(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cpu.c:1: error: this compiler is broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu._build.cache_clear()
    try:
        status = cpu.kernel_status()
        assert not status.compiled and "this compiler is broken" in status.detail and str(fake) in status.detail
    finally:
        cpu._build.cache_clear()


@needs_compiler
@pytest.mark.parametrize("rows, dim", [(1, 1024), (3, 72), (300, 512)])
def test_rms_norm_matches_the_reference(rows, dim):
    generator = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, dim, generator=generator) * 3, torch.randn(dim, generator=generator)
    got = cpu.rms_norm(x, weight, 1e-5, threads=2)
    torch.testing.assert_close(got, rms_norm_ref(x, weight, 1e-5), rtol=1e-5, atol=1e-6)
    assert cpu.rms_norm(x.half(), weight.half(), 1e-5, 1) is None  # 16-bit models keep the reference's rounding


@needs_compiler
@pytest.mark.parametrize("per_sequence", [False, True])
def test_rotary_matches_the_reference_on_projection_views(per_sequence):
    generator = torch.Generator().manual_seed(int(per_sequence))
    batch, length, heads, kv_heads, dim = 2, 3, 4, 2, 32
    # q and k as the attention layer has them: transposed views of one projection output
    qkv = torch.randn(batch, length, (heads + 2 * kv_heads) * dim, generator=generator)
    q = qkv[..., :heads * dim].view(batch, length, heads, dim).transpose(1, 2)
    k = qkv[..., heads * dim:(heads + kv_heads) * dim].view(batch, length, kv_heads, dim).transpose(1, 2)
    table = (batch, length, dim) if per_sequence else (length, dim)
    cos, sin = torch.rand(table, generator=generator), torch.rand(table, generator=generator)
    got_q, got_k = cpu.apply_rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary_ref(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)
    assert got_q.is_contiguous() and got_q.data_ptr() != q.data_ptr()  # new tensors: the projection stays as it was


@needs_compiler
def test_autograd_gets_the_references_it_can_differentiate():
    x, weight = torch.randn(2, 64, requires_grad=True), torch.ones(64, requires_grad=True)
    assert cpu.rms_norm(x, weight, 1e-5, 1) is None
    with torch.no_grad():
        assert cpu.rms_norm(x, weight, 1e-5, 1) is not None
    from kilnlm import kernels

    kernels.rms_norm(x, weight, 1e-5).sum().backward()  # quant.tune trains norms through the model
    assert weight.grad is not None and x.grad is not None
