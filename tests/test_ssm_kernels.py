"""Mamba kernels: causal conv1d, the Mamba-1 selective scan, the Mamba-2 SSD scan and the gated RMSNorm.

Three layers of checks:
* the chunked torch references against the sequential oracles (plain loops over time in fp32), at realistic
  magnitudes (A = -exp(U(-1, 2)), raw dt ~ N(0, 1) - 2), with and without an initial state, T off the chunk;
* chaining: T tokens at once equal the same tokens fed in pieces, each piece starting from the last one's
  final state (prefix reuse and decode depend on it);
* the Triton kernels against the references, under the interpreter on the CPU (TRITON_INTERPRET=1, set in
  conftest.py without CUDA) and compiled on CUDA when there is one. Shapes are small: the interpreter is slow.

Tolerances are relative to the largest |value| of the reference. fp32: 1e-5 (summation order, and the log-depth
scans reassociate products of decays). fp16/bf16 outputs: a couple of ulp of the dtype, since both paths
compute in fp32 and round once at the end (the interpreter truncates to bf16; on CUDA the SSD products run in
TF32 for 16-bit inputs, which rounds the scores and the state operand to 10 bits, hence a looser state bound).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton.language` in this process

import pytest  # noqa: E402

import kilnlm.kernels as K  # noqa: E402
from kilnlm.kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_triton  # noqa: E402
from kilnlm.kernels.norm import _TRITON_IMPORT_ERROR, gated_rms_norm_ref, gated_rms_norm_triton  # noqa: E402
from kilnlm.kernels.selective_scan import (  # noqa: E402
    selective_scan_ref,
    selective_scan_sequential,
    selective_scan_triton,
)
from kilnlm.kernels.ssd import segsum, ssd_scan_ref, ssd_scan_sequential, ssd_scan_triton  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if _TRITON_IMPORT_ERROR is None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    import kilnlm.kernels.ssd as ssd_mod

    # As in test_triton_kernels.py: if triton was first imported in the other mode, this process cannot run the
    # kernels; the Triton cases skip and test_in_fresh_process reruns the file in a fresh interpreter.
    IN_PROCESS = all(isinstance(f, InterpretedFunction) == INTERPRET for f in (tl.sum, ssd_mod._ssd_chunk_kernel))
else:
    IN_PROCESS = False
_TRITON = [
    pytest.mark.skipif(_TRITON_IMPORT_ERROR is not None, reason="triton is not installed"),
    pytest.mark.skipif(_TRITON_IMPORT_ERROR is None and not IN_PROCESS,
                       reason="triton was imported in the wrong mode; see test_in_fresh_process"),
]
_NO_INTERPRETER = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")
_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is unavailable")
DEVICES = [pytest.param("cpu", marks=[*_TRITON, _NO_INTERPRETER]), pytest.param("cuda", marks=[*_TRITON, _NO_CUDA])]


@pytest.mark.skipif(_TRITON_IMPORT_ERROR is not None or IN_PROCESS,
                    reason="this process runs the kernels in the right mode")
def test_in_fresh_process():
    """Run this file in a fresh Python, where TRITON_INTERPRET is set before triton is first imported."""
    env = dict(os.environ, TRITON_INTERPRET="1" if INTERPRET else "0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "test_in_fresh_process" not in proc.stdout


def assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """|out - ref| <= rel * max|ref| everywhere (fp64 on the CPU), same shape and dtype."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    o, r = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(o).all()
    scale = max(r.abs().max().item(), 1e-3) if r.numel() else 1.0
    err = (o - r).abs().max().item() if r.numel() else 0.0
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} * {scale:.3g}"


def _seed(n: int) -> torch.Generator:
    return torch.Generator().manual_seed(n)


_OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # ~2 ulp of the dtype at the max


# ---------------------------------------------------------------------------------------------------------
# causal conv1d


def _conv_inputs(batch: int, seq: int, channels: int, width: int, g: torch.Generator):
    x = torch.randn(batch, seq, channels, generator=g)
    weight = torch.randn(channels, width, generator=g) * 0.5
    bias = torch.randn(channels, generator=g)
    state = torch.randn(batch, channels, width - 1, generator=g)
    return x, weight, bias, state


@pytest.mark.parametrize("seq", [1, 2, 3, 9])
def test_conv_ref_is_the_padded_conv(seq):
    """From a zero state: F.conv1d(padding=K-1, groups=C)[..., :T]; the new state is the last K-1 inputs."""
    x, weight, bias, _ = _conv_inputs(2, seq, 6, 4, _seed(0))
    y, state = causal_conv1d_ref(x, weight, bias, torch.zeros(2, 6, 3), activation=False)
    conv = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=3, groups=6)[..., :seq].transpose(1, 2)
    assert_close(y, conv, 1e-6)
    y_act, _ = causal_conv1d_ref(x, weight, bias, None)
    assert_close(y_act, F.silu(conv), 1e-6)
    padded = torch.cat([torch.zeros(2, 6, 3), x.transpose(1, 2)], dim=2)  # (B, C, K-1+T)
    assert torch.equal(state, padded[:, :, -3:])  # also for T < K-1: part of the old (zero) state remains


def test_conv_chaining_and_inputs_untouched():
    """Prefill in pieces (including pieces shorter than K-1, and decode steps) equals the whole at once."""
    x, weight, bias, state = _conv_inputs(2, 11, 5, 4, _seed(1))
    x0, s0 = x.clone(), state.clone()
    whole, whole_state = causal_conv1d_ref(x, weight, bias, state)
    assert torch.equal(x, x0) and torch.equal(state, s0)
    pieces, s = [], state
    for lo, hi in [(0, 2), (2, 3), (3, 8), (8, 9), (9, 10), (10, 11)]:
        y, s = causal_conv1d_ref(x[:, lo:hi], weight, bias, s)
        pieces.append(y)
    assert_close(torch.cat(pieces, dim=1), whole, 1e-6)
    assert torch.equal(s, whole_state)


def test_conv_ref_dtypes():
    """fp16 x and weight: computed in fp32, y in fp16, state fp32."""
    x, weight, bias, state = _conv_inputs(1, 5, 4, 3, _seed(2))
    y, s = causal_conv1d_ref(x.half(), weight.half(), bias.half(), state)
    y32, s32 = causal_conv1d_ref(x.half().float(), weight.half().float(), bias.half().float(), state)
    assert y.dtype == torch.float16 and s.dtype == torch.float32
    assert torch.equal(y, y32.half()) and torch.equal(s, s32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq,width,with_state,with_bias", [(1, 4, True, True), (2, 4, True, False),
                                                            (37, 4, True, True), (5, 4, False, True),
                                                            (6, 2, True, True)])
def test_conv_triton_matches_reference(device, dtype, seq, width, with_state, with_bias):
    x, weight, bias, state = _conv_inputs(2, seq, 150, width, _seed(3))  # 150 channels: two blocks, ragged
    x = x.to(dtype).to(device)
    weight, bias, state = weight.to(device), bias.to(device), state.to(device)
    bias = bias if with_bias else None
    state = state if with_state else None
    for activation in (True, False):
        y, new_state = causal_conv1d_triton(x, weight, bias, state, activation)
        ref_y, ref_state = causal_conv1d_ref(x, weight, bias, state, activation)
        assert_close(y, ref_y, _OUT_TOL[dtype])
        assert torch.equal(new_state, ref_state)  # a copy of inputs, no arithmetic


@pytest.mark.parametrize("device", DEVICES)
def test_conv_triton_reads_strided_views(device):
    """x as a column slice of a projection (row stride > C), weight as a (C, 1, K) parameter's view."""
    g = _seed(4)
    proj = torch.randn(2, 7, 40, generator=g).to(device)
    x = proj[:, :, 8:32]  # (B, T, 24), strides (280, 40, 1)
    weight = torch.randn(24, 1, 4, generator=g).to(device)[:, 0]  # (C, K)
    state = torch.randn(2, 4, 24, generator=g).to(device).transpose(1, 2)[..., :3]  # (B, C, 3) strided
    y, s = causal_conv1d_triton(x, weight, None, state)
    ref_y, ref_s = causal_conv1d_ref(x.contiguous(), weight.contiguous(), None, state.contiguous())
    assert_close(y, ref_y, 1e-5)
    assert torch.equal(s, ref_s)


# ---------------------------------------------------------------------------------------------------------
# Mamba-1 selective scan


def _mamba1_inputs(batch: int, seq: int, dim: int, n: int, g: torch.Generator, *, z: bool = True,
                   bias: bool = True, state: bool = True) -> dict:
    return dict(
        x=torch.randn(batch, seq, dim, generator=g),
        dt=torch.randn(batch, seq, dim, generator=g) - 2,
        A=-torch.exp(torch.empty(dim, n).uniform_(-1, 2, generator=g)),
        B=torch.randn(batch, seq, n, generator=g),
        C=torch.randn(batch, seq, n, generator=g),
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, seq, dim, generator=g) if z else None,
        dt_bias=torch.randn(dim, generator=g) * 0.5 if bias else None,
        state=torch.randn(batch, dim, n, generator=g) if state else None,
    )


def _slice_time(args: dict, lo: int, hi: int, state) -> dict:
    """The inputs of steps lo .. hi-1, starting from `state`."""
    timed = ("x", "dt", "B", "C", "z")
    return {k: (v[:, lo:hi] if k in timed and v is not None else v) for k, v in args.items()} | {"state": state}


@pytest.mark.parametrize("seq,chunk", [(1, 64), (37, 16), (64, 16), (130, 64)])
@pytest.mark.parametrize("variant", ["full", "no_state", "bare"])
def test_selective_scan_ref_matches_sequential(seq, chunk, variant):
    opts = dict(full={}, no_state=dict(state=False), bare=dict(z=False, bias=False, state=False))[variant]
    args = _mamba1_inputs(2, seq, 12, 16, _seed(10), **opts)
    y, h = selective_scan_ref(**args, chunk_size=chunk)
    y_seq, h_seq = selective_scan_sequential(**args)
    assert_close(y, y_seq, 1e-5)
    assert_close(h, h_seq, 1e-5)
    assert h.is_contiguous() and h.shape == (2, 12, 16)


def test_selective_scan_state_is_input_not_output():
    """The given state is read, not written; a different initial state changes the result."""
    args = _mamba1_inputs(1, 9, 8, 4, _seed(11))
    s0 = args["state"].clone()
    y, _ = selective_scan_ref(**args, chunk_size=4)
    assert torch.equal(args["state"], s0)
    y0, _ = selective_scan_ref(**(args | {"state": None}), chunk_size=4)
    assert (y - y0).abs().max() > 1e-3


def test_selective_scan_dtype_and_softplus_threshold():
    """fp16 in, fp16 y and fp32 state; raw dt above 20 is used as is (torch's softplus threshold)."""
    args = _mamba1_inputs(1, 5, 6, 4, _seed(12))
    args["dt"][0, 2, :3] = 25.0
    half = args | {k: args[k].half() for k in ("x", "dt", "B", "C", "z")}
    y, h = selective_scan_ref(**half)
    y32, h32 = selective_scan_sequential(**(half | {k: half[k].float() for k in ("x", "dt", "B", "C", "z")}))
    assert y.dtype == torch.float16 and h.dtype == torch.float32
    assert_close(y, y32.half(), 1e-3)
    assert_close(h, h32, 1e-5)


@pytest.mark.parametrize("splits", [(20,), (1, 2, 3), (17, 18, 19)])
def test_selective_scan_chaining(splits):
    """Running T tokens at once equals running them in pieces passing final_state along."""
    args = _mamba1_inputs(2, 29, 10, 8, _seed(13))
    whole_y, whole_h = selective_scan_ref(**args, chunk_size=8)
    ys, h, bounds = [], args["state"], (0, *splits, 29)
    for lo, hi in itertools.pairwise(bounds):
        y, h = selective_scan_ref(**_slice_time(args, lo, hi, h), chunk_size=8)
        ys.append(y)
    assert_close(torch.cat(ys, dim=1), whole_y, 1e-5)
    assert_close(h, whole_h, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seq,block_t,variant", [(1, None, "full"), (11, 4, "full"), (6, None, "bare")])
def test_selective_scan_triton_matches_reference(device, seq, block_t, variant):
    opts = dict(full={}, bare=dict(z=False, bias=False, state=False))[variant]
    args = {k: (v.to(device) if v is not None else None)
            for k, v in _mamba1_inputs(2, seq, 40, 16, _seed(14), **opts).items()}  # 40 channels: 2 blocks
    y, h = selective_scan_triton(**args, block_t=block_t, block_d=32)
    ref_y, ref_h = selective_scan_ref(**args)
    assert_close(y, ref_y, 1e-5)
    assert_close(h, ref_h, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_selective_scan_triton_half_strided_and_decode_chain(device):
    """fp16 x/dt/B/C/z as column slices of one projection (N = 5, padded to 8); then one decode step from the
    kernel's own final state equals the reference over all the tokens."""
    g = _seed(15)
    dim, n, seq = 12, 5, 7
    proj = torch.randn(1, seq + 1, 3 * dim + 2 * n, generator=g).half().to(device)
    x, z, dt = proj[..., :dim], proj[..., dim : 2 * dim], proj[..., 2 * dim : 3 * dim] - 2
    B, C = proj[..., 3 * dim : 3 * dim + n], proj[..., 3 * dim + n :]
    A = -torch.exp(torch.empty(dim, n).uniform_(-1, 2, generator=g)).to(device)
    D, dt_bias = torch.randn(dim, generator=g).to(device), torch.randn(dim, generator=g).to(device)
    full = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, state=None)
    ref_y, ref_h = selective_scan_ref(**full)
    y1, h1 = selective_scan_triton(**_slice_time(full, 0, seq, None))
    y2, h2 = selective_scan_triton(**_slice_time(full, seq, seq + 1, h1))
    assert y1.dtype == torch.float16 and h2.dtype == torch.float32
    assert_close(torch.cat([y1, y2], dim=1), ref_y, _OUT_TOL[torch.float16])
    assert_close(h2, ref_h, 1e-5)


# ---------------------------------------------------------------------------------------------------------
# Mamba-2 SSD


def _ssd_inputs(batch: int, seq: int, heads: int, head_dim: int, groups: int, n: int, g: torch.Generator, *,
                bias: bool = True, state: bool = True) -> dict:
    return dict(
        x=torch.randn(batch, seq, heads, head_dim, generator=g),
        dt=torch.randn(batch, seq, heads, generator=g) - 2,
        A=-torch.exp(torch.empty(heads).uniform_(-1, 2, generator=g)),
        B=torch.randn(batch, seq, groups, n, generator=g),
        C=torch.randn(batch, seq, groups, n, generator=g),
        D=torch.randn(heads, generator=g),
        dt_bias=torch.randn(heads, generator=g) * 0.5 if bias else None,
        state=torch.randn(batch, heads, head_dim, n, generator=g) if state else None,
    )


def test_segsum():
    a = torch.tensor([1.0, 2.0, 4.0])
    expected = torch.tensor([[0.0, -math.inf, -math.inf], [2.0, 0.0, -math.inf], [6.0, 4.0, 0.0]])
    assert torch.equal(segsum(a), expected)


@pytest.mark.parametrize("seq,chunk", [(1, 64), (37, 16), (64, 16), (70, 64)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_state", [True, False])
def test_ssd_ref_matches_sequential(seq, chunk, groups, with_state):
    args = _ssd_inputs(2, seq, 4, 6, groups, 8, _seed(20), state=with_state)
    y, h = ssd_scan_ref(**args, chunk_size=chunk)
    y_seq, h_seq = ssd_scan_sequential(**args)
    assert_close(y, y_seq, 1e-5)
    assert_close(h, h_seq, 1e-5)


def test_ssd_groups_and_dt_limit():
    """Head h reads group h // (H / G): G = 2 with H = 4 equals G = 4 with each group repeated; dt_limit clamps."""
    args = _ssd_inputs(1, 9, 4, 3, 2, 5, _seed(21), bias=False)
    y, h = ssd_scan_sequential(**args)
    wide = args | {"B": args["B"].repeat_interleave(2, dim=2), "C": args["C"].repeat_interleave(2, dim=2)}
    y4, h4 = ssd_scan_sequential(**wide)
    assert torch.equal(y, y4) and torch.equal(h, h4)
    limit = (0.05, 0.2)
    y_lim, h_lim = ssd_scan_ref(**args, dt_limit=limit, chunk_size=4)
    clamped = F.softplus(args["dt"]).clamp(*limit)
    y_pre, h_pre = ssd_scan_sequential(**(args | {"dt": torch.log(torch.expm1(clamped))}))  # softplus inverse
    assert_close(y_lim, y_pre, 1e-4)
    assert_close(h_lim, h_pre, 1e-4)
    assert (y_lim - y).abs().max() > 1e-2  # the clamp bites


@pytest.mark.parametrize("splits", [(30,), (1, 2, 3), (16, 17)])
def test_ssd_chaining(splits):
    args = _ssd_inputs(2, 33, 4, 4, 2, 8, _seed(22))
    whole_y, whole_h = ssd_scan_ref(**args, chunk_size=8)
    ys, h, bounds = [], args["state"], (0, *splits, 33)
    for lo, hi in itertools.pairwise(bounds):
        y, h = ssd_scan_ref(**_slice_time(args, lo, hi, h), chunk_size=8)
        ys.append(y)
    assert_close(torch.cat(ys, dim=1), whole_y, 1e-5)
    assert_close(h, whole_h, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seq,chunk,groups,head_dim,n,with_state", [
    (1, 64, 2, 20, 8, True),  # decode kernel, P over one 16-block, N under 16
    (1, 64, 1, 8, 16, False),
    (37, 16, 2, 20, 8, True),  # 3 chunks (ragged), 2 P-blocks of 16
    (23, 64, 1, 8, 16, False),  # one chunk lowered to 32
])
def test_ssd_triton_matches_reference(device, seq, chunk, groups, head_dim, n, with_state):
    args = {k: (v.to(device) if v is not None else None)
            for k, v in _ssd_inputs(2, seq, 4, head_dim, groups, n, _seed(23), state=with_state).items()}
    y, h = ssd_scan_triton(**args, chunk_size=chunk, block_p=16)
    ref_y, ref_h = ssd_scan_ref(**args)
    assert_close(y, ref_y, 1e-5)
    assert_close(h, ref_h, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ssd_triton_half_strided_dt_limit_and_decode_chain(device, dtype):
    """16-bit x/B/C as views of one projection, a dt_limit, prefill then one decode step from its final state."""
    g = _seed(24)
    batch, seq, heads, head_dim, groups, n = 2, 20, 4, 16, 2, 16
    inner = heads * head_dim
    proj = torch.randn(batch, seq + 1, inner + 2 * groups * n + heads, generator=g).to(dtype).to(device)
    x = proj[..., :inner].unflatten(-1, (heads, head_dim))  # (B, T, H, P) view, row stride > H*P
    B = proj[..., inner : inner + groups * n].unflatten(-1, (groups, n))
    C = proj[..., inner + groups * n : inner + 2 * groups * n].unflatten(-1, (groups, n))
    dt = proj[..., inner + 2 * groups * n :] - 2
    A = -torch.exp(torch.empty(heads).uniform_(-1, 2, generator=g)).to(device)
    D, dt_bias = torch.randn(heads, generator=g).to(device), torch.randn(heads, generator=g).to(device)
    full = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, state=None, dt_limit=(0.0, 1.0))
    ref_y, ref_h = ssd_scan_ref(**full)
    y1, h1 = ssd_scan_triton(**_slice_time(full, 0, seq, None), chunk_size=16)
    y2, h2 = ssd_scan_triton(**_slice_time(full, seq, seq + 1, h1))
    assert y1.dtype == dtype and h2.dtype == torch.float32
    assert_close(torch.cat([y1, y2], dim=1), ref_y, 2 * _OUT_TOL[dtype])
    assert_close(h2, ref_h, 1e-5 if INTERPRET else 3e-3)  # TF32 products on the GPU


# ---------------------------------------------------------------------------------------------------------
# gated RMSNorm


def test_gated_rms_norm_ref_matches_per_group_formula():
    g = _seed(30)
    x, z = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g)
    w = torch.randn(12, generator=g)
    out = gated_rms_norm_ref(x, z, w, 1e-6, 4)
    gated = x * F.silu(z)
    for k in range(3):
        part = gated[:, 4 * k : 4 * k + 4]
        expected = w[4 * k : 4 * k + 4] * part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + 1e-6)
        assert_close(out[:, 4 * k : 4 * k + 4], expected, 1e-6)
    # one group over all channels is rms_norm of the gated input
    assert_close(gated_rms_norm_ref(x, z, w, 1e-6, 12), K.rms_norm(gated, w, 1e-6), 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,group", [((2, 3, 48), 16), ((5, 40), 40), ((1, 24), 6)])
def test_gated_rms_norm_triton_matches_reference(device, dtype, shape, group):
    g = _seed(31)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).to(device)
    z = (torch.randn(shape, generator=g) * 2).to(dtype).to(device)
    w = (1 + torch.randn(shape[-1], generator=g) * 0.3).to(dtype).to(device)
    out = gated_rms_norm_triton(x, z, w, 1e-5, group)
    ref = gated_rms_norm_ref(x, z, w, 1e-5, group)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    # both round normed to the dtype, then the product: ≤ 1 ulp apart, mostly identical
    # (fp32: silu as z / (1 + exp(-z)) and the summation order move g by a few ulp)
    eps = torch.finfo(dtype).eps
    o, r = out.double().cpu(), ref.double().cpu()
    assert ((o - r).abs() <= (8 if dtype == torch.float32 else 1) * eps * r.abs()).all()
    if dtype != torch.float32:
        assert (out == ref).double().mean().item() >= 0.9


# ---------------------------------------------------------------------------------------------------------
# the dispatch in kilnlm.kernels


def test_dispatch_on_cpu_is_the_reference():
    for name in ("causal_conv1d", "selective_scan", "ssd_scan", "gated_rms_norm"):
        assert name in K.__all__ and callable(getattr(K, name))
    x, weight, bias, state = _conv_inputs(2, 5, 6, 4, _seed(40))
    for a, b in zip(K.causal_conv1d(x, weight, bias, state), causal_conv1d_ref(x, weight, bias, state), strict=True):
        assert torch.equal(a, b)
    args = _mamba1_inputs(1, 70, 6, 4, _seed(41))
    for a, b in zip(K.selective_scan(**args), selective_scan_ref(**args), strict=True):
        assert torch.equal(a, b)
    args = _ssd_inputs(1, 70, 4, 3, 2, 5, _seed(42))
    for a, b in zip(K.ssd_scan(**args, dt_limit=(0.0, 0.5)), ssd_scan_ref(**args, dt_limit=(0.0, 0.5)), strict=True):
        assert torch.equal(a, b)
    x, z, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    assert torch.equal(K.gated_rms_norm(x, z, w, 1e-5, 4), gated_rms_norm_ref(x, z, w, 1e-5, 4))
