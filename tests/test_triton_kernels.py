"""Triton kernels against their pure-torch references: RMSNorm (+ residual), RoPE (in place), SwiGLU, INT8 GEMM.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, numpy on the CPU); with CUDA
they are compiled, the "cpu" cases skip and the "cuda" ones run. Shapes are small (the interpreter is slow)
and ragged: every size is off the block size so the masks are exercised.

Tolerances, in units in the last place (ulp) of the output dtype:
* RMSNorm: the kernel rounds where the reference rounds (normed -> x dtype, then × weight -> out dtype), and a
  product of two fp16/bf16 values is exact in fp32, so the only difference is the fp32 statistic (summation
  order, sqrt): a few fp32 ulp in `normed`, which can flip one rounding to the dtype. We assert ≤ 1 ulp and
  that ≥ 97% of the elements are bit-identical (a missing intermediate rounding breaks the second bound in
  fp16/bf16); fp32 outputs: ≤ 4 ulp (fp32 summation-order error of a 100-term mean, halved by the sqrt).
* SwiGLU: same structure (silu rounded to the dtype, then × up); exp differs by ≤ 1 fp32 ulp: ≤ 1 ulp,
  ≥ 97% identical; fp32 ≤ 4 ulp.
* RoPE: the same per-op roundings as the reference and no reduction: bit-identical under the interpreter; on
  CUDA ≤ 1 ulp (fp32 multiply-add may be contracted to an FMA).
* INT8 GEMM: integers, exact against an int64 matmul. int8_linear_triton: the int32 result is the same and
  every float op after it is the reference's own torch op, so it equals int8_linear_forward bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton.language` in this process

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import kilnlm.kernels.norm as norm_mod  # noqa: E402
from kilnlm.kernels.activation import silu_mul_ref, silu_mul_triton  # noqa: E402
from kilnlm.kernels.attention import (  # noqa: E402
    attention_ref,
    attention_triton,
    paged_attention_ref,
    paged_attention_triton,
)
from kilnlm.kernels.decode_attention import decode_attention_ref, decode_attention_triton  # noqa: E402
from kilnlm.kernels.kv_quant import quantize_kv_triton  # noqa: E402
from kilnlm.quant.formats import get_format  # noqa: E402
from kilnlm.kernels.int8_matmul import MAX_K, int8_linear_triton, int8_matmul_triton  # noqa: E402
from kilnlm.kernels.norm import rms_norm_ref, rms_norm_triton  # noqa: E402
from kilnlm.kernels.rope import apply_rotary_ref, apply_rotary_triton  # noqa: E402
from kilnlm.quant.llm_int8 import int8_linear_forward, quantize_llm_int8  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton picks interpreted or compiled when each @triton.jit runs, triton.language's own functions included, and
# cannot be re-imported. If an earlier test module imported kilnlm.kernels (hence triton) before the variable was
# set, this process cannot interpret the kernels: the cases below skip and one test reruns this file in a fresh
# interpreter instead. (Setting TRITON_INTERPRET=1 in conftest.py when CUDA is absent avoids the detour.)
IN_PROCESS = all(isinstance(f, InterpretedFunction) == INTERPRET for f in (tl.sum, norm_mod._rms_norm_kernel))
_RERUN = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported in the wrong mode; see test_in_fresh_process")


@pytest.mark.skipif(IN_PROCESS, reason="this process already runs the kernels in the right mode")
def test_in_fresh_process():
    """Run this file in a fresh Python, where TRITON_INTERPRET is set before triton is first imported."""
    env = dict(os.environ, TRITON_INTERPRET="1" if INTERPRET else "0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "test_in_fresh_process" not in proc.stdout


DEVICES = [
    pytest.param("cpu", marks=[_RERUN, pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")]),
    pytest.param("cuda", marks=[_RERUN, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is unavailable")]),
]
FLOATS = [torch.float16, torch.bfloat16, torch.float32]
_MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}


def ulp_diff(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out - ref| in units of the last place of ref's dtype at |ref| (float64, elementwise)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    r = ref.double().cpu()
    tiny = torch.finfo(ref.dtype).tiny
    ulp = torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(tiny))) - _MANTISSA[ref.dtype])
    return (out.double().cpu() - r).abs() / ulp


def assert_close_ulp(out: torch.Tensor, ref: torch.Tensor, max_ulp: float, min_identical: float) -> None:
    """Every element within max_ulp of ref, and at least a min_identical fraction bit-identical."""
    d = ulp_diff(out, ref)
    assert torch.isfinite(d).all()
    assert d.max().item() <= max_ulp, f"max {d.max().item()} ulp"
    same = (out == ref).double().mean().item()
    assert same >= min_identical, f"only {same:.4f} identical"


def _seed(n: int) -> torch.Generator:
    return torch.Generator().manual_seed(n)


# ---------------------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 16), (3, 100), (2, 3, 33)])
def test_rms_norm_matches_reference(device, dtype, shape):
    g = _seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    w = (1 + torch.randn(shape[-1], generator=g) * 0.5).to(dtype).to(device)
    out = rms_norm_triton(x, w, 1e-5)
    ref = rms_norm_ref(x, w, 1e-5)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if dtype == torch.float32:
        assert_close_ulp(out, ref, 4, 0.0)
    else:
        assert_close_ulp(out, ref, 1, 0.97)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_promotes_like_reference(device):
    """An fp16 x with an fp32 weight gives fp32 out, the product of the fp16-rounded normed value and the weight."""
    g = _seed(1)
    x = torch.randn(4, 40, generator=g).half().to(device)
    w = torch.randn(40, generator=g).to(device)
    out = rms_norm_triton(x, w, 1e-6)
    ref = rms_norm_ref(x, w, 1e-6)
    assert out.dtype == torch.float32
    # normed differs from the reference by ≤ 1 fp16 ulp; the fp32 product keeps that relative error (2**-11).
    torch.testing.assert_close(out, ref, rtol=2**-10, atol=0)
    assert (out == ref).double().mean().item() >= 0.97


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_rms_norm_fused_residual(device, dtype):
    g = _seed(2)
    x = (torch.randn(5, 72, generator=g) * 2).to(dtype).to(device)
    residual = (torch.randn(5, 72, generator=g) * 2).to(dtype).to(device)
    w = torch.randn(72, generator=g).to(dtype).to(device)
    x0, r0 = x.clone(), residual.clone()
    out, h = rms_norm_triton(x, w, 1e-6, residual=residual)
    assert torch.equal(h, x + residual)  # one rounding of an exact fp32 sum, as torch's add
    assert torch.equal(x, x0) and torch.equal(residual, r0)  # inputs untouched
    ref = rms_norm_ref(x + residual, w, 1e-6)
    assert_close_ulp(out, ref, 4 if dtype == torch.float32 else 1, 0.0 if dtype == torch.float32 else 0.97)
    # The statistics are over h, not x: a kernel that normalised x alone would miss by far more than an ulp.
    assert ulp_diff(out, rms_norm_ref(x, w, 1e-6)).max().item() > 100


# ---------------------------------------------------------------------------------------------------------
# RoPE


def _rope_tables(seq: int, dim: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (D/2,)
    ang = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat([ang, ang], dim=-1)  # (T, D)
    return emb.cos() * scale, emb.sin() * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("hq,hkv,seq,dim", [(4, 2, 5, 24), (3, 1, 1, 16), (2, 2, 7, 10)])
def test_rope_in_place_matches_reference(device, dtype, hq, hkv, seq, dim):
    g = _seed(3)
    q = torch.randn(2, hq, seq, dim, generator=g).to(dtype).to(device)
    k = torch.randn(2, hkv, seq, dim, generator=g).to(dtype).to(device)
    cos, sin = (t.to(device) for t in _rope_tables(seq, dim, scale=1.1))  # a folded-in attention factor
    ref_q, ref_k = apply_rotary_ref(q, k, cos, sin)
    assert not torch.equal(ref_q, q) and not torch.equal(ref_k, k)  # the rotation moves them: in place is visible
    q_ptr, k_ptr = q.data_ptr(), k.data_ptr()
    out_q, out_k = apply_rotary_triton(q, k, cos, sin)
    assert out_q is q and out_k is k and q.data_ptr() == q_ptr and k.data_ptr() == k_ptr
    if INTERPRET:
        assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    else:
        assert_close_ulp(q, ref_q, 1, 0.9)
        assert_close_ulp(k, ref_k, 1, 0.9)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_with_one_table_per_sequence(device):
    """A batch of sequences at different positions: (B, T, D) tables, row b rotated by its own."""
    g = _seed(5)
    q = torch.randn(3, 4, 2, 16, generator=g).half().to(device)
    k = torch.randn(3, 2, 2, 16, generator=g).half().to(device)
    tables = [_rope_tables(40, 16) for _ in range(3)]
    starts = (0, 17, 31)  # each sequence's next position
    cos = torch.stack([c[s : s + 2] for (c, _), s in zip(tables, starts)]).to(device)
    sin = torch.stack([t[s : s + 2] for (_, t), s in zip(tables, starts)]).to(device)
    ref_q, ref_k = apply_rotary_ref(q.clone(), k.clone(), cos, sin)
    for b in range(3):  # the batched reference is the per-sequence one
        one_q, _ = apply_rotary_ref(q[b : b + 1], k[b : b + 1], cos[b], sin[b])
        assert torch.equal(one_q, ref_q[b : b + 1])
    apply_rotary_triton(q, k, cos, sin)
    tol = dict(max_ulp=0 if INTERPRET else 1, min_identical=1.0 if INTERPRET else 0.9)
    assert_close_ulp(q, ref_q, **tol)
    assert_close_ulp(k, ref_k, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_writes_through_transposed_view(device):
    """q as (B, T, H, D).transpose(1, 2), the projection's natural layout, beside a contiguous k: each is read and
    written through its own strides, and the rotation lands in q's base tensor."""
    g = _seed(4)
    base_q = torch.randn(2, 6, 4, 16, generator=g).half().to(device)  # (B, T, Hq, D)
    q = base_q.transpose(1, 2)  # (B, Hq, T, D) view, head stride D
    k = torch.randn(2, 2, 6, 16, generator=g).half().to(device)  # (B, Hkv, T, D), head stride T·D
    cos, sin = (t.to(device) for t in _rope_tables(6, 16))
    ref_q, ref_k = apply_rotary_ref(q.contiguous(), k.clone(), cos, sin)
    apply_rotary_triton(q, k, cos, sin)
    tol = dict(max_ulp=0 if INTERPRET else 1, min_identical=1.0 if INTERPRET else 0.9)
    assert_close_ulp(base_q.transpose(1, 2), ref_q, **tol)
    assert_close_ulp(k, ref_k, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_refuses_views_it_cannot_rotate_in_place(device):
    cos, sin = (t.to(device) for t in _rope_tables(4, 8))
    k = torch.randn(1, 1, 4, 8, device=device)
    q_strided = torch.randn(1, 2, 4, 16, device=device)[..., ::2]  # stride 2 along D
    with pytest.raises(ValueError, match="unit"):
        apply_rotary_triton(q_strided, k, cos, sin)
    q_expanded = torch.randn(1, 1, 4, 8, device=device).expand(1, 3, 4, 8)  # three heads share memory
    with pytest.raises(ValueError, match="overlapping"):
        apply_rotary_triton(q_expanded, k, cos, sin)
    with pytest.raises(ValueError, match="cos"):
        apply_rotary_triton(torch.randn(1, 2, 4, 8, device=device), k, cos[:3], sin)


# ---------------------------------------------------------------------------------------------------------
# SwiGLU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(7,), (3, 1000)])
def test_silu_mul_matches_reference(device, dtype, shape):
    g = _seed(5)
    gate = (torch.randn(shape, generator=g) * 4).to(dtype).to(device)  # wide enough to reach silu's tails
    up = torch.randn(shape, generator=g).to(dtype).to(device)
    out = silu_mul_triton(gate, up, block=256)  # 3000 = 11 full blocks + a ragged one
    ref = silu_mul_ref(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape
    if dtype == torch.float32:
        assert_close_ulp(out, ref, 4, 0.0)
    else:
        assert_close_ulp(out, ref, 1, 0.97)


# ---------------------------------------------------------------------------------------------------------
# INT8 GEMM and the LLM.int8 linear


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k", [(1, 16, 16), (37, 45, 70), (5, 130, 33)])
def test_int8_matmul_exact(device, m, n, k):
    g = _seed(6)
    x_q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8).to(device)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    out = int8_matmul_triton(x_q, w, block_m=16, block_n=32, block_k=16)  # several tiles along every dim
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.cpu().long(), x_q.cpu().long() @ w.cpu().long().t())


@pytest.mark.parametrize("device", DEVICES)
def test_int8_matmul_extremes_and_strides(device):
    """All -128 codes (the largest products) over 300 terms: 4 915 200, exact; transposed inputs read by stride."""
    x_q = torch.full((3, 300), -128, dtype=torch.int8, device=device)
    w = torch.full((20, 300), -128, dtype=torch.int8, device=device)
    w[5] = 127
    out = int8_matmul_triton(x_q, w, block_m=16, block_n=16, block_k=64)
    assert torch.equal(out.cpu().long(), x_q.cpu().long() @ w.cpu().long().t())
    assert int(out[0, 0]) == 300 * 128 * 128
    g = _seed(7)
    xt = torch.randint(-128, 128, (40, 9), generator=g, dtype=torch.int8).to(device).t()  # (9, 40), strides (1, 9)
    wt = torch.randint(-128, 128, (40, 17), generator=g, dtype=torch.int8).to(device).t()  # (17, 40)
    out = int8_matmul_triton(xt, wt, block_m=16, block_n=16, block_k=16)
    assert torch.equal(out.cpu().long(), xt.cpu().long() @ wt.cpu().long().t())


def test_int8_matmul_refuses_bad_input():
    a = torch.zeros(2, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8"):
        int8_matmul_triton(a.float(), a)
    with pytest.raises(ValueError, match="overflow"):
        int8_matmul_triton(torch.zeros(1, MAX_K + 1, dtype=torch.int8), torch.zeros(1, MAX_K + 1, dtype=torch.int8))
    with pytest.raises(ValueError, match="power of two"):
        int8_matmul_triton(a, a, block_k=8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_linear_matches_reference_forward(device, dtype):
    """Stored outliers, a feature crossing the threshold only at run time, a bias, and leading batch dims."""
    g = _seed(8)
    out_f, in_f = 40, 72
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(2, 3, in_f, generator=g)
    x[..., [5, 60]] *= 20  # the calibrated outliers
    x[1, 2, 33] = 9.0  # over the threshold in one token only: a run-time outlier, not stored
    packed = quantize_llm_int8(weight, torch.tensor([5, 60]))
    packed = type(packed)(*(getattr(packed, f).to(device) for f in
                            ("weight_int8", "row_scale", "outlier_idx", "outlier_weight")), packed.threshold)
    bias = torch.randn(out_f, generator=g).to(dtype).to(device)
    x = x.to(dtype).to(device)
    out = int8_linear_triton(x, packed, bias, block_m=16, block_n=16, block_k=32)
    ref = int8_linear_forward(x, packed, bias)
    assert out.dtype == dtype and out.shape == (2, 3, out_f)
    assert torch.equal(out, ref)
    # Not a vacuous equality: dropping the run-time outlier (feature 33) changes the result.
    x2 = x.clone()
    x2[1, 2, 33] = 0
    assert not torch.equal(int8_linear_triton(x2, packed, bias, block_m=16, block_n=16, block_k=32), out)


# ---------------------------------------------------------------------------------------------------------
# FlashAttention prefill

# Against the fp32 reference on the same (rounded) inputs: the kernel accumulates in fp32 but rounds P to the
# K/V dtype before P·V and rounds the output once, so the error is a few ulp of the output dtype.
_ATTN_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
ATTENTION_CASES = [
    # batch, kv heads, group, T, S, head_dim, window
    (1, 2, 1, 19, 19, 64, None),  # plain causal prefill, T not a multiple of the tile
    (2, 2, 4, 19, 37, 80, None),  # GQA group 4 after 18 cached positions, head_dim 80 (padded tile)
    (1, 1, 8, 1, 37, 64, None),  # decode: one query, group 8
    (1, 2, 2, 21, 70, 64, 5),  # window smaller than S: most tiles skipped
    (1, 1, 4, 3, 40, 96, 100),  # window larger than S
    (1, 1, 1, 1, 50, 64, 1),  # window 1: each query sees only itself
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_flash_attention_matches_reference(device, dtype, case):
    batch, kv_heads, group, queries, keys, head_dim, window = case
    g = _seed(11)
    q = torch.randn(batch, kv_heads * group, queries, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, keys, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, keys, head_dim, generator=g).to(dtype)
    out = attention_triton(q.to(device), k.to(device), v.to(device), window)
    ref = attention_ref(q.float(), k.float(), v.float(), window)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float().cpu() - ref).abs().max().item() <= _ATTN_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attention_reads_strided_q_and_fully_masked_rows_are_zero(device):
    """q as the model makes it (a transposed view), and a window of 0 (no key visible): zeros, never NaN."""
    g = _seed(12)
    q = torch.randn(1, 7, 4, 64, generator=g).transpose(1, 2).to(device)  # (B, H, T, D) view, strided
    k = torch.randn(1, 2, 7, 64, generator=g).to(device)
    out = attention_triton(q, k, k, None)
    assert (out.cpu() - attention_ref(q.cpu(), k.cpu(), k.cpu())).abs().max() <= 1e-5
    zero = attention_triton(q, k, k, 0)
    assert torch.equal(zero.cpu(), torch.zeros_like(zero.cpu()))
    assert torch.equal(attention_ref(q.cpu(), k.cpu(), k.cpu(), 0), zero.cpu())


# ---------------------------------------------------------------------------------------------------------
# Decode attention over a paged, quantized pool


def _paged_pool(lengths, kv_heads, head_dim, page, fmt, dtype, g):
    """A pool with pages handed out in shuffled order (plus unused ones), its block table and lengths."""
    needed = [-(-n // page) for n in lengths]
    order = torch.randperm(sum(needed) + 3, generator=g)
    table = torch.zeros(len(lengths), max(needed), dtype=torch.int32)
    taken = 0
    for b, count in enumerate(needed):
        table[b, :count] = order[taken : taken + count]
        taken += count
    pool = torch.randn(len(order), kv_heads, page, head_dim, generator=g)
    pool = get_format(fmt).quantize(pool) if fmt else pool.to(dtype)
    return pool, table, torch.tensor(lengths, dtype=torch.int32)


DECODE_CASES = [
    # lengths, kv heads, group, head_dim, page, k format, v format, window, splits
    ([37, 5, 16], 2, 4, 64, 16, None, None, None, 3),  # ragged lengths, float pool
    ([50], 1, 1, 80, 16, None, None, 9, 2),  # head_dim 80, window
    ([70, 33, 1], 2, 2, 64, 32, "q8_0", "q8_0", None, 4),
    ([70, 33], 1, 8, 64, 16, "q4_0", "q4_0", None, 3),  # group 8
    ([100, 64], 2, 4, 128, 16, "q8_0", "q4_0", 20, 5),  # K8/V4, window inside the last split
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_attention_matches_reference(device, dtype, case):
    lengths, kv_heads, group, head_dim, page, k_fmt, v_fmt, window, splits = case
    g = _seed(13)
    k_pool, table, lens = _paged_pool(lengths, kv_heads, head_dim, page, k_fmt, dtype, g)
    v_pool, _, _ = _paged_pool(lengths, kv_heads, head_dim, page, v_fmt, dtype, _seed(13))
    v_pool = v_pool[torch.randperm(len(v_pool), generator=g)]  # V pages differ from K's
    q = torch.randn(len(lengths), kv_heads * group, head_dim, generator=g).to(dtype)
    out = decode_attention_triton(*(t.to(device) for t in (q, k_pool, v_pool, table, lens)), k_fmt, v_fmt, window,
                                  num_splits=splits)
    ref = decode_attention_ref(q.float(), k_pool, v_pool, table, lens, k_fmt, v_fmt, window)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float().cpu() - ref).abs().max().item() <= _ATTN_TOL[dtype]


PAGED_PREFILL_CASES = [
    # lengths, kv heads, group, queries, head_dim, page, k format, v format, window
    ([40, 19], 2, 4, 19, 64, 16, "q8_0", "q8_0", None),  # a chat's second turn over a quantized history
    ([70], 1, 2, 21, 64, 16, "q4_0", "q8_0", 9),  # window inside the history
    ([33, 50], 2, 1, 5, 80, 16, None, None, None),  # float pages, head_dim 80
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", PAGED_PREFILL_CASES)
def test_flash_attention_reads_paged_quantized_history(device, dtype, case):
    lengths, kv_heads, group, queries, head_dim, page, k_fmt, v_fmt, window = case
    g = _seed(14)
    k_pool, table, lens = _paged_pool(lengths, kv_heads, head_dim, page, k_fmt, dtype, g)
    v_pool, _, _ = _paged_pool(lengths, kv_heads, head_dim, page, v_fmt, dtype, _seed(15))
    q = torch.randn(len(lengths), kv_heads * group, queries, head_dim, generator=g).to(dtype)
    out = paged_attention_triton(*(t.to(device) for t in (q, k_pool, v_pool, table, lens)), k_fmt, v_fmt, window)
    ref = paged_attention_ref(q.float(), k_pool, v_pool, table, lens, k_fmt, v_fmt, window)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float().cpu() - ref).abs().max().item() <= _ATTN_TOL[dtype]


# ---------------------------------------------------------------------------------------------------------
# KV quantisation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_kv_quantise_kernel_packs_exactly_as_the_registry(device, dtype, fmt):
    """Zero blocks, ties of opposite sign, a block dominated by one value, a ragged block count."""
    x = torch.randn(3, 2, 7, 96, generator=_seed(16)) * 3
    x[0, 0, 0, :32] = 0
    x[0, 0, 1, 5] = -x[0, 0, 1, :32].abs().max()
    x[0, 0, 1, 20] = -x[0, 0, 1, 5]  # the first of two equal magnitudes decides the q4_0 sign
    x[1, 1, 2, :32] /= 1e3
    x[1, 1, 2, 3] = 2.5
    x = x.to(dtype)
    packed = quantize_kv_triton(x.to(device), fmt, blocks_per_program=8)
    assert torch.equal(packed.cpu(), get_format(fmt).quantize(x))


# ---------------------------------------------------------------------------------------------------------
# Failing loudly


def test_wrappers_fail_loudly_without_triton(monkeypatch):
    monkeypatch.setattr(norm_mod, "_TRITON_IMPORT_ERROR", ImportError("No module named 'triton'"))
    x = torch.zeros(2, 8)
    with pytest.raises(ImportError, match="rms_norm_triton needs the `triton` package"):
        rms_norm_triton(x, torch.ones(8), 1e-6)
    with pytest.raises(ImportError, match="silu_mul_triton"):
        silu_mul_triton(x, x)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        silu_mul_triton(torch.zeros(4), torch.zeros(4))
