"""Dequant-matmul (Q4_0 / Q4_1 / Q8_0): registry -> repack -> Triton kernel, pinned to ggml's layout.

Without CUDA the kernels run under the Triton interpreter on the CPU (set before triton is imported).
With CUDA they run compiled on the GPU and the CPU cases skip (the interpreter is process-wide).

Tolerances (`_bound`) are first-order error bounds, elementwise, with S = |x| @ |W|ᵀ and y = the
reference output; u32 = 2^-24:
* both sides accumulate the same fp32 products in different orders: each sum is within K·u32·S of the
  exact one, so they differ by at most 2K·u32·S; a GPU may fuse q4_1's d·q + m into an FMA (u32·|w|
  per weight) and x·w products round once more (u32·S): (2K + 3)·u32·S in all;
* prefill casts the dequantised W tile to x's dtype for tl.dot: + u_w·S with u_w = 2^-11 (fp16),
  2^-7 (bf16: the interpreter truncates fp32 -> bf16, one whole ulp; the GPU rounds, half of that);
* fp16 / bf16 outputs are each rounded once to x's dtype: + 2·u_out·|y|, same u as u_w.
A wrong layout moves outputs by about sqrt(K)·|x||w|, far above these (test_tolerance_rejects_...).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (torch does not import it)

import pytest
from kilnlm.errors import KilnError
from kilnlm.kernels import dequant_matmul as dm
from kilnlm.kernels.dequant_matmul import (
    DecodeConfig,
    DequantMatmulError,
    PackedWeight,
    PrefillConfig,
    dequant_matmul,
    dequant_matmul_ref,
    dequantize_packed,
    pack_for_kernel,
)
from kilnlm.quant.formats import get_format

FORMATS = ["q4_0", "q4_1", "q8_0"]
K_FORMATS = ["q4_k", "q5_k", "q6_k"]  # rows of 256; the group scales multiplied out into float32 planes
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _INTERPRETED, reason="CPU runs need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        _INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA without the interpreter")),
]
# Small tiles so the interpreter covers several N/M tiles, ragged edges, grouping and split-K quickly.
SMALL_DECODE = DecodeConfig(block_n=16, block_k=32, split_k=1)
SMALL_PREFILL = PrefillConfig(block_m=16, block_n=16, block_k=32, group_m=2)
_U = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}


def _weight(fmt: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, PackedWeight]:
    """ggml-packed random weights (with a zero row and a large row) and their kernel repack."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0] = 0.0  # all-zero blocks: Q4_0 stores d = -0.0
    if n > 2:
        w[2] *= 1000.0
    packed = get_format(fmt).quantize(w)
    return packed, pack_for_kernel(packed, fmt, (n, k))


def _x(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _bound(x: torch.Tensor, pw: PackedWeight, y_ref: torch.Tensor, prefill: bool) -> torch.Tensor:
    """Elementwise tolerance between kernel and reference (derivation in the module docstring)."""
    k = pw.shape[1]
    s = x.float().abs().reshape(-1, k) @ dequantize_packed(pw).abs().t()
    u = _U[x.dtype]
    tol = ((2 * k + 3) * 2.0**-24 + (u if prefill else 0.0)) * s + 2 * u * y_ref.float().abs().reshape(s.shape)
    return tol.reshape(y_ref.shape)


def _assert_within(y: torch.Tensor, y_ref: torch.Tensor, tol: torch.Tensor) -> None:
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    err = (y.float() - y_ref.float()).abs()
    assert torch.isfinite(y.float()).all()
    worst = int((err - tol).argmax())
    assert bool((err <= tol).all()), (
        f"max excess at flat index {worst}: |err| {err.flatten()[worst]:.3g} > tol {tol.flatten()[worst]:.3g}"
    )


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    if request.param == "cpu":  # the kernels must have been decorated under the interpreter
        assert type(dm._decode_kernel).__name__ == "InterpretedFunction", (
            "kilnlm.kernels.dequant_matmul was imported before TRITON_INTERPRET=1 was set"
        )
    return request.param


# ---------------------------------------------------------------------------------------------
# Repack: bit-exact against the registry, documented planes


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_packed_matches_registry_bit_for_bit(fmt):
    packed, pw = _weight(fmt, 8, 96)
    expected = get_format(fmt).dequantize(packed, (8, 96))
    got = dequantize_packed(pw)
    assert got.dtype == torch.float32 and got.shape == (8, 96)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))  # signed zeros included


@pytest.mark.parametrize("fmt", FORMATS)
def test_planes_have_documented_shapes(fmt):
    _, pw = _weight(fmt, 5, 64)
    q_shape, q_dtype = ((5, 64), torch.int8) if fmt == "q8_0" else ((5, 8), torch.int32)
    assert (pw.fmt, pw.shape) == (fmt, (5, 64))
    assert pw.qweight.shape == q_shape and pw.qweight.dtype == q_dtype and pw.qweight.is_contiguous()
    assert pw.scales.shape == (5, 2) and pw.scales.dtype == torch.float16 and pw.scales.is_contiguous()
    if fmt == "q4_1":
        assert pw.mins.shape == (5, 2) and pw.mins.dtype == torch.float16 and pw.mins.is_contiguous()
    else:
        assert pw.mins is None


@pytest.mark.parametrize("fmt", FORMATS + K_FORMATS)
def test_planes_are_exact_and_kernel_bytes_counts_them(fmt):
    k = 512
    packed, pw = _weight(fmt, 6, k)
    expected = get_format(fmt).dequantize(packed, (6, k))
    assert torch.equal(dequantize_packed(pw).view(torch.int32), expected.view(torch.int32))
    planes = [pw.qweight, pw.scales] + ([pw.mins] if pw.mins is not None else [])
    assert dm.kernel_bytes(fmt, (6, k)) == sum(p.numel() * p.element_size() for p in planes)
    assert pw.group == (16 if fmt == "q6_k" else 32)


def test_q4_nibbles_are_in_natural_order():
    # One Q4_0 block: d = 1.0, byte i holds code i (element i) low and 15 - i (element 16 + i) high.
    block = torch.cat([torch.tensor([0x00, 0x3C], dtype=torch.uint8),  # fp16 1.0, little-endian
                       torch.tensor([i | ((15 - i) << 4) for i in range(16)], dtype=torch.uint8)])
    pw = pack_for_kernel(block.reshape(1, 18), "q4_0", (1, 32))
    codes = list(range(16)) + [15 - i for i in range(16)]
    words = [sum(codes[8 * w + j] << (4 * j) for j in range(8)) for w in range(4)]
    assert pw.qweight.view(torch.uint32).flatten().tolist() == words
    assert dequantize_packed(pw).flatten().tolist() == [c - 8.0 for c in codes]


# ---------------------------------------------------------------------------------------------
# Reference pinned to the registry


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_equals_registry_matmul(fmt, dtype):
    packed, pw = _weight(fmt, 40, 96)
    x = _x((3, 96), dtype)
    expected = (x.float() @ get_format(fmt).dequantize(packed, (40, 96)).t()).to(dtype)
    got = dequant_matmul_ref(x, pw)
    assert got.dtype == dtype and torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------
# Kernels against the reference


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 40, 64), (3, 72, 160), (16, 40, 96)])
def test_decode_matches_reference(device, fmt, dtype, m, n, k):
    _, pw = _weight(fmt, n, k)
    pw, x = pw.to(device), _x((m, k), dtype).to(device)
    y_ref = dequant_matmul_ref(x, pw)
    for cfg in (SMALL_DECODE, DecodeConfig()):  # several ragged tiles; the defaults (one ragged K chunk)
        _assert_within(dequant_matmul(x, pw, decode=cfg), y_ref, _bound(x, pw, y_ref, prefill=False))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("split_k", [2, 3, 8])
def test_decode_split_k_matches_reference(device, fmt, split_k):
    _, pw = _weight(fmt, 40, 160)  # 5 chunks of 32: splits of 3+2, 2+2+1, and 5 x 1 (8 clamps to 5)
    pw, x = pw.to(device), _x((3, 160), torch.float16).to(device)
    y_ref = dequant_matmul_ref(x, pw)
    cfg = DecodeConfig(block_n=16, block_k=32, split_k=split_k)
    _assert_within(dequant_matmul(x, pw, decode=cfg), y_ref, _bound(x, pw, y_ref, prefill=False))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k", [(33, 40, 64), (17, 72, 160)])
def test_prefill_matches_reference(device, fmt, dtype, m, n, k):
    _, pw = _weight(fmt, n, k)
    pw, x = pw.to(device), _x((m, k), dtype).to(device)
    y_ref = dequant_matmul_ref(x, pw)
    for cfg in (SMALL_PREFILL, PrefillConfig()):
        _assert_within(dequant_matmul(x, pw, prefill=cfg), y_ref, _bound(x, pw, y_ref, prefill=True))


@pytest.mark.parametrize("fmt", K_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 33])
def test_k_quant_kernels_match_reference(device, fmt, dtype, m):
    _, pw = _weight(fmt, 40, 256)
    pw, x = pw.to(device), _x((m, 256), dtype).to(device)
    y_ref = dequant_matmul_ref(x, pw)
    prefill = m > dm.DECODE_MAX_M
    for decode, gemm in ((SMALL_DECODE, SMALL_PREFILL), (DecodeConfig(), PrefillConfig())):
        y = dequant_matmul(x, pw, decode=decode, prefill=gemm)
        _assert_within(y, y_ref, _bound(x, pw, y_ref, prefill=prefill))


@pytest.mark.parametrize("fmt", FORMATS)
def test_tolerance_rejects_wrong_layout(device, fmt):
    # The plausible bug: ggml's in-block order (q4: low nibbles then high; q8: here reversed blocks).
    _, pw = _weight(fmt, 40, 96)
    pw = pw.to(device)
    x = _x((33, 96), torch.bfloat16).to(device)  # the loosest tolerance: bf16 prefill
    codes = dm._unpack_codes(pw).reshape(40, 3, 32)
    if fmt == "q8_0":
        wrong_q = codes.flip(-1).reshape(40, 96).to(torch.int8).contiguous()
    else:
        ggml = torch.cat([codes[..., 0::2], codes[..., 1::2]], dim=-1).reshape(40, 96)  # misread order
        pairs = (ggml[:, 0::2] | (ggml[:, 1::2] << 4)).to(torch.uint8)
        wrong_q = pairs.contiguous().view(torch.int32)
    wrong = PackedWeight(pw.fmt, pw.shape, wrong_q, pw.scales, pw.mins)
    y_ref = dequant_matmul_ref(x, pw)
    with pytest.raises(AssertionError, match="max excess"):
        _assert_within(dequant_matmul(x, wrong, prefill=SMALL_PREFILL), y_ref, _bound(x, pw, y_ref, True))


@pytest.mark.parametrize("m", [2, 17])  # batch 2 x seq: 4 rows (decode), 34 rows (prefill)
def test_3d_input(device, m):
    _, pw = _weight("q4_1", 40, 64)
    pw, x = pw.to(device), _x((2, m, 64), torch.float16).to(device)
    y = dequant_matmul(x, pw, decode=SMALL_DECODE, prefill=SMALL_PREFILL)
    y_ref = dequant_matmul_ref(x, pw)
    assert y.shape == (2, m, 40)
    _assert_within(y, y_ref, _bound(x, pw, y_ref, prefill=m * 2 > dm.DECODE_MAX_M))


def test_non_contiguous_input(device):
    _, pw = _weight("q8_0", 40, 64)
    pw = pw.to(device)
    x = _x((64, 3), torch.float16).to(device).t()  # (3, 64), stride (1, 3)
    y_ref = dequant_matmul_ref(x, pw)
    _assert_within(dequant_matmul(x, pw), y_ref, _bound(x, pw, y_ref, prefill=False))


# ---------------------------------------------------------------------------------------------
# Errors a caller can cause


def test_unsupported_format_raises():
    packed = get_format("f16").quantize(torch.randn(4, 32))
    with pytest.raises(DequantMatmulError, match="unsupported weight format 'f16'") as info:
        pack_for_kernel(packed, "f16", (4, 32))
    assert isinstance(info.value, KilnError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "shape, nbytes, match",
    [((4, 48), 4 * 18, "multiple of 32"), ((4, 64), 4 * 18, "packs into 144 bytes"), ((64,), 36, "out_features")],
)
def test_bad_pack_shapes_raise(shape, nbytes, match):
    with pytest.raises(DequantMatmulError, match=match):
        pack_for_kernel(torch.zeros(nbytes, dtype=torch.uint8), "q4_0", shape)


def test_bad_inputs_raise():
    _, pw = _weight("q4_0", 8, 64)
    with pytest.raises(DequantMatmulError, match="expects K = 64"):
        dequant_matmul(torch.zeros(2, 32), pw)
    with pytest.raises(DequantMatmulError, match="expects K = 64"):
        dequant_matmul_ref(torch.zeros(2, 32), pw)
    with pytest.raises(DequantMatmulError, match="float16, bfloat16 or float32"):
        dequant_matmul(torch.zeros(2, 64, dtype=torch.int32), pw)
    with pytest.raises(DequantMatmulError, match="split_k must be >= 1"):
        dequant_matmul(torch.zeros(2, 64), pw, decode=DecodeConfig(split_k=0))
    with pytest.raises(DequantMatmulError, match="block_k must be a power of two >= 32"):
        dequant_matmul(torch.zeros(20, 64), pw, prefill=PrefillConfig(block_k=48))
    with pytest.raises(DequantMatmulError, match="block_n must be a power of two >= 1"):
        dequant_matmul(torch.zeros(2, 64), pw, decode=DecodeConfig(block_n=24))
