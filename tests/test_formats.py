"""The weight-format registry: bit-exact parity with gguf's numpy reference (ggml's C rounding),
round-trip error bounds, edge cases and error messages, registry lookups."""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kilnlm.errors import KilnError
from kilnlm.quant import formats
from kilnlm.quant.formats import (
    QuantizationError,
    QuantizedTensor,
    WeightFormat,
    format_for_gguf_type,
    get_format,
    register,
    registered_formats,
)

QUANTIZABLE = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
K_QUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]  # checked against ggml's C code in test_kquants.py
INTEGER = ["i8", "i32"]  # raw integer storage (LLM.int8 codes and outlier indices)


def gguf_quantize(x: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """gguf's reference packing of float32 `x`, as raw uint8 of the same layout as ours."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = quants.quantize(x.astype(np.float32), fmt.gguf_type)
    return np.ascontiguousarray(out).view(np.uint8)


def gguf_dequantize(packed: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    with np.errstate(all="ignore"):
        return quants.dequantize(packed, fmt.gguf_type)


def assert_same_bytes(ours: torch.Tensor, ref: np.ndarray, fmt: WeightFormat) -> None:
    ours = ours.numpy()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    blocks_ours = ours.reshape(-1, fmt.bytes_per_block)
    blocks_ref = ref.reshape(-1, fmt.bytes_per_block)
    bad = np.nonzero((blocks_ours != blocks_ref).any(axis=1))[0]
    assert bad.size == 0, f"{fmt.name}: {bad.size} of {len(blocks_ref)} blocks differ, first {bad[:5]}"


def assert_same_floats(ours: torch.Tensor, ref: np.ndarray) -> None:
    """Bit-identical float32, except that any NaN matches any NaN (torch drops fp16 NaN payloads)."""
    ours = ours.numpy()
    assert ours.dtype == np.float32 and ref.dtype == np.float32 and ours.shape == ref.shape
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    assert same.all(), f"{(~same).sum()} values differ, first at {np.argwhere(~same)[0]}"


# ------------------------------------------------------------------------------------------
# Data: random and adversarial float32 matrices, each row a whole number of 256-weight blocks.


def _data(kind: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    if kind == "normal":
        return rng.standard_normal((32, 512)).astype(np.float32)
    if kind == "uniform":
        return rng.uniform(-3.0, 5.0, (32, 512)).astype(np.float32)
    if kind == "heavy_tailed":
        return (rng.standard_t(1.5, (32, 512)) * 0.02).astype(np.float32)
    if kind == "zero_blocks":
        x = rng.standard_normal((8, 256)).astype(np.float32)
        x[:, 32:64] = 0.0  # (blocks holding -0.0: test_signed_zeros_follow_ggml_c)
        x[:, 160:192] = np.where(np.arange(32) < 16, 0.0, rng.uniform(0.5, 1, 32))
        x[:, 224:256] = np.where(np.arange(32) < 16, 0.0, rng.uniform(-1, -0.5, 32))
        return x
    if kind == "one_huge_value":
        x = rng.standard_normal((16, 256)).astype(np.float32)
        x.reshape(-1, 32)[:, 7] = 1e4 * np.sign(rng.standard_normal(x.size // 32))
        return x
    if kind == "equal_magnitude_max":
        # Blocks whose largest |x| appears as both +a and -a, in either order (Q4_0 takes the first).
        x = rng.uniform(-1, 1, (16, 256)).astype(np.float32)
        blocks = x.reshape(-1, 32)
        blocks[0::2, 3], blocks[0::2, 20] = 2.5, -2.5
        blocks[1::2, 3], blocks[1::2, 20] = -2.5, 2.5
        return x
    if kind == "rounding_ties":
        # Values landing exactly on .5 after scaling: Q8_0 with d = 1 rounds ties away from zero.
        x = np.tile(np.arange(-16, 16, dtype=np.float32) + 0.5, (4, 8))
        x.reshape(-1, 32)[:, 0] = 127.0
        return x
    if kind == "fp16_subnormal_scales":
        # Scales in (and below) fp16's subnormal range: 6e-8 .. 6e-5.
        x = rng.standard_normal((16, 256)).astype(np.float32)
        return x * np.logspace(-9, -3, x.size // 32).astype(np.float32).repeat(32).reshape(x.shape)
    if kind == "constant_blocks":
        per_block = rng.choice(np.float32([0.75, -0.75, 3.0, -1e-3, 1.0]), 64).astype(np.float32)
        return per_block.repeat(32).reshape(8, 256)
    if kind == "many_rows":
        return rng.standard_normal((4096, 32)).astype(np.float32)
    raise AssertionError(kind)


DATA_KINDS = [
    "normal",
    "uniform",
    "heavy_tailed",
    "zero_blocks",
    "one_huge_value",
    "equal_magnitude_max",
    "rounding_ties",
    "fp16_subnormal_scales",
    "constant_blocks",
    "many_rows",
]


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantize_is_bit_exact_with_gguf(name: str, kind: str) -> None:
    fmt = get_format(name)
    x = _data(kind)
    ref = gguf_quantize(x, fmt)
    packed = fmt.quantize(torch.from_numpy(x))
    assert packed.dtype == torch.uint8
    assert_same_bytes(packed, ref, fmt)
    assert_same_floats(fmt.dequantize(packed, x.shape), gguf_dequantize(ref, fmt))


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1"])
def test_quantize_near_fp16_scale_limit_is_bit_exact(name: str) -> None:
    fmt = get_format(name)
    # The largest block value each format accepts before its fp16 scale overflows (65504).
    limit = {"q8_0": 127 * 65504.0, "q4_0": 8 * 65504.0, "q4_1": 65504.0}[name]
    x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    x.reshape(-1, 32)[:, 5] = limit
    if name == "q4_1":
        x.reshape(-1, 32)[:, 6] = -limit / 2
    assert_same_bytes(fmt.quantize(torch.from_numpy(x)), gguf_quantize(x, fmt), fmt)


def test_quantize_shapes_other_than_2d_and_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks so one tensor spans many, with a partial last chunk.
    monkeypatch.setattr(formats, "_CHUNK_WEIGHTS", 96)
    x = np.random.default_rng(4).standard_normal((3, 5, 160)).astype(np.float32)
    for name in QUANTIZABLE:
        fmt = get_format(name)
        packed = fmt.quantize(torch.from_numpy(x))
        assert tuple(packed.shape) == (3, 5, 160 // fmt.block_size * fmt.bytes_per_block)
        ref = gguf_quantize(x, fmt)
        assert_same_bytes(packed, ref, fmt)
        assert_same_floats(fmt.dequantize(packed, x.shape), gguf_dequantize(ref, fmt))
    vec = torch.from_numpy(x[0, 0])
    q4 = get_format("q4_0")
    assert_same_bytes(q4.quantize(vec), gguf_quantize(x[0, 0], q4), q4)


def test_quantize_accepts_half_precision_input_as_float32() -> None:
    x = torch.randn(4, 64).to(torch.bfloat16)
    for name in QUANTIZABLE:
        fmt = get_format(name)
        assert torch.equal(fmt.quantize(x), fmt.quantize(x.float()))


# ------------------------------------------------------------------------------------------
# Decided edge cases: fp16 scale overflow raises; scales too small to invert encode as zero.


@pytest.mark.parametrize(
    "name, big",
    [("q8_0", 1e7), ("q4_0", 6e5), ("q4_1", -7e4), ("f16", 7e4), ("bf16", 3.4028235e38)],
)
def test_overflowing_fp16_scale_raises_where_gguf_writes_inf(name: str, big: float) -> None:
    fmt = get_format(name)
    x = np.zeros((2, 64), np.float32)
    x[1, 40] = big
    x[1, 41] = big / 2
    # gguf (like ggml) silently stores an infinite scale, i.e. inf/NaN weights after loading.
    assert not np.isfinite(gguf_dequantize(gguf_quantize(x, fmt), fmt)).all()
    with pytest.raises(QuantizationError, match=r"bf16|f32") as err:
        fmt.quantize(torch.from_numpy(x))
    assert name in str(err.value)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1"])
def test_block_whose_scale_cannot_be_inverted_encodes_as_zero(name: str) -> None:
    # absmax ~1e-38: d = absmax / 127 is an f32 subnormal and 1/d overflows to inf; ggml then casts
    # inf/NaN to integers (undefined). We use id = 0 as for an all-zero block.
    fmt = get_format(name)
    x = np.random.default_rng(5).uniform(-1, 1, (2, 64)).astype(np.float32)
    x[0, :32] *= np.float32(1e-38)
    x[1, 32:] *= np.float32(1e-40)
    ours = fmt.quantize(torch.from_numpy(x)).numpy().reshape(-1, fmt.bytes_per_block)
    ref = gguf_quantize(x, fmt).reshape(-1, fmt.bytes_per_block)
    tiny = [0, 3]
    normal = [1, 2]
    header = {"q8_0": 2, "q4_0": 2, "q4_1": 4}[name]
    np.testing.assert_array_equal(ours[normal], ref[normal])
    np.testing.assert_array_equal(ours[tiny, :header], ref[tiny, :header])  # same fp16 scale (zero)
    zero_code = {"q8_0": 0, "q4_0": 0x88, "q4_1": 0}[name]
    assert (ours[tiny, header:] == zero_code).all()
    deq_ours = fmt.dequantize(torch.from_numpy(ours), x.shape).numpy()
    deq_ref = gguf_dequantize(ref.reshape(2, -1), fmt)
    assert (deq_ours == deq_ref).all()  # equal values (zero), whatever ggml's codes were


def c_reference(block: np.ndarray, name: str) -> bytes:
    """Scalar port of ggml's quantize_row_{q8_0,q4_0,q4_1}_ref for one block of 32 float32."""
    f32, fp16 = np.float32, lambda v: np.float16(v).tobytes()
    block = [f32(v) for v in block]
    if name == "q8_0":
        amax = f32(0.0)
        for v in block:
            amax = max(amax, abs(v))
        d = f32(amax / f32(127))
        inv = f32(1.0) / d if d else f32(0.0)
        # roundf in double: exact for a float32 input
        codes = [int(math.copysign(math.floor(abs(float(v * inv)) + 0.5), float(v * inv))) for v in block]
        return fp16(d) + np.array(codes, np.int8).tobytes()
    if name == "q4_0":
        amax, peak = f32(0.0), f32(0.0)
        for v in block:
            if amax < abs(v):
                amax, peak = abs(v), v
        d = f32(peak / f32(-8))
        inv = f32(1.0) / d if d else f32(0.0)
        codes = [min(15, int(f32(v * inv) + f32(8.5))) for v in block]
        return fp16(d) + bytes(codes[j] | (codes[j + 16] << 4) for j in range(16))
    lo, hi = f32(np.finfo(np.float32).max), f32(-np.finfo(np.float32).max)
    for v in block:
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    d = f32((hi - lo) / f32(15))
    inv = f32(1.0) / d if d else f32(0.0)
    codes = [min(15, int(f32(f32(v - lo) * inv) + f32(0.5))) for v in block]
    return fp16(d) + fp16(lo) + bytes(codes[j] | (codes[j + 16] << 4) for j in range(16))


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1"])
def test_signed_zeros_follow_ggml_c(name: str) -> None:
    # gguf's numpy and ggml's C disagree only on signs of zero: Q4_0 all-zero blocks starting with
    # -0.0 (C: d = +0.0 / -8 = -0.0), Q4_1 min/max among mixed +-0.0 (C: first; numpy: SIMD order).
    fmt = get_format(name)
    rng = np.random.default_rng(8)
    z = np.where(np.arange(32) % 3 == 0, -0.0, 0.0).astype(np.float32)
    blocks = [
        np.full(32, -0.0, np.float32),
        -z,
        z,
        np.where(np.arange(32) % 2 == 0, z, rng.uniform(0.5, 1, 32)).astype(np.float32),
        np.where(np.arange(32) % 2 == 1, -z, rng.uniform(-1, -0.5, 32)).astype(np.float32),
        # Random +-0.0 patterns: which zero a vectorised min/max returns depends on its lane order.
        *np.where(rng.random((8, 32)) < 0.3, 0.7, np.where(rng.random((8, 32)) < 0.5, 0.0, -0.0)),
        *np.where(rng.random((8, 32)) < 0.3, -0.7, np.where(rng.random((8, 32)) < 0.5, 0.0, -0.0)),
        *rng.standard_normal((4, 32)),  # ordinary blocks, last: there the port agrees with gguf
    ]
    x = np.stack(blocks).astype(np.float32)
    expected = b"".join(c_reference(b, name) for b in x)
    assert fmt.quantize(torch.from_numpy(x)).numpy().tobytes() == expected
    assert gguf_quantize(x[-4:], fmt).tobytes() == expected[-4 * fmt.bytes_per_block :]


# ------------------------------------------------------------------------------------------
# Dequantisation parity, K-quants included.


def _fp16_fields(name: str) -> list[int]:
    """Byte offsets of the fp16 scale fields inside one block."""
    return {
        "q8_0": [0],
        "q4_0": [0],
        "q4_1": [0, 2],
        "q2_k": [80, 82],
        "q3_k": [108],
        "q4_k": [0, 2],
        "q5_k": [0, 2],
        "q6_k": [208],
    }[name]


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", *K_QUANTS])
def test_dequantize_random_blocks_with_sane_scales_is_bit_exact(name: str) -> None:
    fmt = get_format(name)
    rng = np.random.default_rng(6)
    rows, blocks_per_row = 24, 4
    packed = rng.integers(0, 256, (rows, blocks_per_row, fmt.bytes_per_block), dtype=np.uint8)
    for offset in _fp16_fields(name):
        scales = rng.uniform(-0.1, 0.1, (rows, blocks_per_row)).astype(np.float16)
        scales[0, 0] = np.float16(6e-8)  # fp16 subnormal
        packed[:, :, offset : offset + 2] = scales.view(np.uint8).reshape(rows, blocks_per_row, 2)
    packed = packed.reshape(rows, -1)
    shape = (rows, blocks_per_row * fmt.block_size)
    ref = gguf_dequantize(packed, fmt)
    assert np.isfinite(ref).all()
    out = fmt.dequantize(torch.from_numpy(packed), shape)
    assert out.dtype == torch.float32 and tuple(out.shape) == shape
    assert_same_floats(out, ref)


@pytest.mark.parametrize("name", [*QUANTIZABLE, *K_QUANTS])
def test_dequantize_arbitrary_bytes_matches_gguf(name: str) -> None:
    # Every bit pattern, NaN and Inf scales included: a corrupt file must not decode differently.
    fmt = get_format(name)
    packed = np.random.default_rng(7).integers(0, 256, (16, 8 * fmt.bytes_per_block), dtype=np.uint8)
    out = fmt.dequantize(torch.from_numpy(packed).flatten(), (16, 8 * fmt.block_size))
    assert_same_floats(out, gguf_dequantize(packed, fmt))


def test_q4_0_nibble_order_is_ggml_order() -> None:
    # codes: element j -> j % 16 (d = 1 via max -8 at element 0); low nibbles hold 0..15, high 16..31.
    x = torch.tensor([float(j % 16 - 8) for j in range(32)])
    packed = get_format("q4_0").quantize(x)
    assert packed[:2].view(torch.float16).item() == 1.0
    assert packed[2:].tolist() == [(j % 16) | ((j % 16) << 4) for j in range(16)]
    y = torch.arange(32, dtype=torch.float32) - 16  # element 0 = -16 -> d = 2: trunc(j / 2 + 0.5)
    codes = [min(15, (j + 1) // 2) for j in range(32)]
    assert get_format("q4_0").quantize(y)[2:].tolist() == [codes[j] | (codes[j + 16] << 4) for j in range(16)]


# ------------------------------------------------------------------------------------------
# Round-trip error bounds, from the packed scales.


def _scales(packed: torch.Tensor, fmt: WeightFormat, offset: int) -> np.ndarray:
    blocks = packed.numpy().reshape(-1, fmt.bytes_per_block)
    return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float64)  # (n_blocks, 1)


@pytest.mark.parametrize("kind", ["normal", "heavy_tailed", "uniform"])
def test_round_trip_error_bounds(kind: str) -> None:
    x = _data(kind)
    blocks = x.reshape(-1, 32).astype(np.float64)
    amax = np.abs(blocks).max(axis=1, keepdims=True)

    fmt = get_format("q8_0")
    packed = fmt.quantize(torch.from_numpy(x))
    err = np.abs(fmt.dequantize(packed, x.shape).numpy().reshape(-1, 32) - blocks)
    d, d16 = amax / 127, _scales(packed, fmt, 0)
    # Half a step, plus the fp16 rounding of the scale applied to codes up to 127.
    assert (err <= d / 2 + 127 * np.abs(d - d16) + 1e-6 * amax).all()
    assert (err <= d16 * 0.57).all()  # 0.5 + 127 * 2**-11 (fp16 rounding of d)

    fmt = get_format("q4_0")
    packed = fmt.quantize(torch.from_numpy(x))
    err = np.abs(fmt.dequantize(packed, x.shape).numpy().reshape(-1, 32) - blocks)
    d, d16 = amax / 8, np.abs(_scales(packed, fmt, 0))
    slack = 8 * np.abs(d - d16) + 1e-6 * amax
    # Codes 0..15 are -8..7 steps from the peak's side: within half a step, except values beyond
    # 7.5 steps on the other side (the peak's mirror), which clip to 7 steps.
    assert (err <= d + slack).all()
    far = err > d / 2 + slack
    assert far.any(axis=1).mean() < 0.5
    assert (np.abs(blocks) >= 7.5 * d - slack)[far].all()

    fmt = get_format("q4_1")
    packed = fmt.quantize(torch.from_numpy(x))
    err = np.abs(fmt.dequantize(packed, x.shape).numpy().reshape(-1, 32) - blocks)
    d16, m16 = _scales(packed, fmt, 0), _scales(packed, fmt, 2)
    m_err = np.abs(m16 - blocks.min(axis=1, keepdims=True))
    d = (blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)) / 15
    assert (err <= d / 2 + 15 * np.abs(d - d16) + m_err + 1e-6 * amax).all()

    for name, rel in [("f32", 0.0), ("f16", 2.0**-11), ("bf16", 2.0**-8)]:
        fmt = get_format(name)
        y = x[np.abs(x).min(axis=1) > 0] if name == "f16" else x
        err = np.abs(fmt.dequantize(fmt.quantize(torch.from_numpy(y)), y.shape).numpy() - y)
        assert (err <= rel * np.abs(y) + (6e-8 if name == "f16" else 0)).all()


# ------------------------------------------------------------------------------------------
# Errors a user can cause.


@pytest.mark.parametrize("name", QUANTIZABLE)
@pytest.mark.parametrize("bad, word", [(math.nan, "NaN"), (math.inf, "Inf"), (-math.inf, "Inf")])
def test_quantize_rejects_non_finite(name: str, bad: float, word: str) -> None:
    x = torch.randn(4, 64)
    x[2, 33] = bad
    with pytest.raises(QuantizationError, match=word) as err:
        get_format(name).quantize(x)
    assert "(2, 33)" in str(err.value)
    assert isinstance(err.value, KilnError)


def test_quantize_rejects_non_finite_even_when_the_sum_overflows() -> None:
    x = torch.full((2, 64), 3e38)
    x[1, 5] = math.nan
    with pytest.raises(QuantizationError, match="1 NaN"):
        get_format("f32").quantize(x)
    get_format("f32").quantize(torch.full((2, 64), 3e38))  # finite, though its sum is inf


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1"])
def test_quantize_rejects_columns_not_a_multiple_of_the_block(name: str) -> None:
    with pytest.raises(QuantizationError, match=r"48.*multiple of the block size 32"):
        get_format(name).quantize(torch.randn(4, 48))


def test_bad_inputs_raise_clear_errors() -> None:
    q4 = get_format("q4_0")
    with pytest.raises(QuantizationError, match="floating-point"):
        q4.quantize(torch.ones(2, 32, dtype=torch.int32))
    with pytest.raises(QuantizationError, match="scalar"):
        q4.quantize(torch.tensor(1.0))
    with pytest.raises(QuantizationError, match="uint8"):
        q4.dequantize(torch.zeros(2, 18, dtype=torch.int8), (2, 32))
    with pytest.raises(QuantizationError, match="36 bytes"):
        q4.dequantize(torch.zeros(2, 17, dtype=torch.uint8), (2, 32))
    with pytest.raises(QuantizationError, match="multiple of the block size 256"):
        get_format("q6_k").dequantize(torch.zeros(210, dtype=torch.uint8), (1, 128))
    with pytest.raises(QuantizationError, match="needs uint8 data of shape"):
        QuantizedTensor(q4, (2, 64), torch.zeros(2, 18, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------
# Registry.


def test_registry_lookups_and_layouts() -> None:
    names = [f.name for f in registered_formats()]
    assert names == [*QUANTIZABLE, *K_QUANTS, *INTEGER]
    for fmt in registered_formats():
        assert get_format(fmt.name) is fmt
        assert get_format(fmt.name.upper()) is fmt
        assert format_for_gguf_type(fmt.gguf_type) is fmt
        assert format_for_gguf_type(int(fmt.gguf_type)) is fmt
        assert fmt.gguf_type.name.lower() == fmt.name
        assert (fmt.block_size, fmt.bytes_per_block) == GGML_QUANT_SIZES[fmt.gguf_type]
    bpw = {f.name: f.bits_per_weight for f in registered_formats()}
    assert bpw == {
        "f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0,
        "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "i8": 8.0, "i32": 32.0,
    }  # fmt: skip
    assert formats.Q4_0 is get_format("q4_0") and formats.Q6_K is get_format("q6_k")


def test_unknown_formats_raise() -> None:
    with pytest.raises(QuantizationError, match=r"unknown weight format 'q3_0'.*q4_0"):
        get_format("q3_0")
    with pytest.raises(QuantizationError, match="IQ2_XXS is not supported"):
        format_for_gguf_type(GGMLQuantizationType.IQ2_XXS)


def test_register_adds_formats_and_rejects_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "_FORMATS", dict(formats._FORMATS))

    class Int8Rows(WeightFormat):
        name = "int8_test"
        gguf_type = None
        block_size, bytes_per_block = 16, 16

        def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
            return blocks.round().clamp(-128, 127).to(torch.int8).view(torch.uint8)

        def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
            return blocks.view(torch.int8).to(torch.float32)

    fmt = register(Int8Rows())
    assert get_format("int8_test") is fmt and fmt.bits_per_weight == 8.0
    qt = QuantizedTensor.from_float(torch.arange(-16.0, 16.0).reshape(2, 16), "int8_test")
    assert torch.equal(qt.dequantize(), torch.arange(-16.0, 16.0).reshape(2, 16))
    with pytest.raises(ValueError, match="already registered"):
        register(Int8Rows())
    with pytest.raises(ValueError, match="Q4_0 already has"):
        register(type("Dup", (formats.Q4_0Format,), {"name": "q4_0_again"})())
    with pytest.raises(ValueError, match="GGML_QUANT_SIZES"):
        bad = type("Bad", (formats.Q8_0Format,), {"name": "q8_0_bad", "gguf_type": GGMLQuantizationType.IQ4_NL})
        register(bad())


def test_quantized_tensor_round_trip() -> None:
    w = torch.randn(8, 64)
    qt = QuantizedTensor.from_float(w, "q8_0")
    assert qt.format is get_format("q8_0") and qt.shape == (8, 64)
    assert tuple(qt.data.shape) == (8, 2 * 34) and qt.nbytes == 8 * 68
    assert torch.equal(qt.dequantize(), get_format("q8_0").dequantize(qt.data, (8, 64)))
    assert (qt.dequantize() - w).abs().max() <= w.abs().max() / 127
    vec = QuantizedTensor.from_float(torch.randn(64), formats.F32)
    assert vec.shape == (64,) and tuple(vec.data.shape) == (256,)


def test_integer_formats_store_exact_integers_and_refuse_anything_else() -> None:
    i8, i32 = get_format("i8"), get_format("i32")
    codes = torch.tensor([[-128.0, -1.0, 0.0, 127.0]])
    assert torch.equal(i8.quantize(codes).view(torch.int8), codes.to(torch.int8))
    assert torch.equal(i8.dequantize(i8.quantize(codes), (1, 4)), codes)
    assert torch.equal(i32.dequantize(i32.quantize(torch.tensor([3.0, 70000.0])), (2,)), torch.tensor([3.0, 70000.0]))
    for bad in (torch.tensor([0.5]), torch.tensor([128.0])):
        with pytest.raises(QuantizationError, match="integers"):
            i8.quantize(bad)
