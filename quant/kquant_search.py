"""llama.cpp's scale searches for the K-quants, batched over groups and bit-exact with ggml-quants.c.

Each function takes float32 groups `x` of shape (groups, n) and returns what its C namesake returns for
every group at once: the chosen codes L (groups, n) and the scale (and min). Bit-exactness with the C
reference (compiled, as llama.cpp's reference build is, without fused multiply-adds) needs three things:
- every float32 operation in C's order: products and sums are separate float32 ops, written here in the same
  association as the C expressions (`w*l*x` is `(w*l)*x`);
- sums accumulated left to right, as C's loops do (`sequential_sum`), never torch's pairwise reductions;
- `nearest_int` is round-half-to-even (the 1.5 * 2^23 trick), which is torch.round on float32.
A group's search loops run for all groups at once; a group that C leaves early just stops changing here.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))


def f32(value: float) -> float:
    """`value` rounded to float32, as a C float literal or float expression is (0.1f, rdelta*is, ...)."""
    return float(np.float32(value))


def over(value: float, denominator: torch.Tensor) -> torch.Tensor:
    """value / denominator rounded as C's float division (torch's `scalar / tensor` multiplies by the
    reciprocal instead, which can differ in the last bit)."""
    return torch.full_like(denominator, value).div_(denominator)


def sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum (n, groups) float32 terms over dim 0, left to right in float32, as `for (i...) s += t[i]` does in C.

    The searches keep groups along the last dim so that each step of this loop reads one contiguous row."""
    total = terms[0].clone()
    for row in terms[1:]:
        total += row
    return total


def first_abs_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max): the largest |x| per group (row of x) and the signed value where it first occurs (C's
    `ax > amax`)."""
    index = x.abs().argmax(dim=-1, keepdim=True)  # argmax returns the first of equal maxima
    signed = x.gather(-1, index).squeeze(-1)
    return signed.abs(), signed


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes 0..nmax with a scale and a min per group (row of x), searched over nstep + 1 scale candidates
    weighted by `weights`. Returns (L uint8 (groups, n), scale (groups,), the_min (groups,), the min as a
    positive offset)."""
    low = start_low = x.amin(dim=-1).clamp(max=0)  # C: if (min > 0) min = 0
    high = x.amax(dim=-1)
    x, weights = x.t().contiguous(), weights.t().contiguous()  # (n, groups): see sequential_sum
    sum_w = sequential_sum(weights)
    sum_x = sequential_sum(weights * x)
    flat = high == low
    span = torch.where(flat, torch.ones_like(high), high - low)
    iscale = over(nmax, span)
    scale = over(1, iscale)
    codes = _codes(iscale * (x - low), 0, nmax)
    best = _weighted_error(scale, codes, low, x, weights, use_mad)
    for step in range(nstep + 1 if nstep >= 1 else 0):
        # C's loop reads `min` as the search has updated it, in the span and in the offset alike
        span = torch.where(flat, torch.ones_like(high), high - low)
        trial = _codes(over(f32(f32(rmin + f32(rdelta * step)) + nmax), span) * (x - low), 0, nmax)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = sequential_sum(wl), sequential_sum(wl * trial), sequential_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        solvable = det > 0
        safe_det = torch.where(solvable, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        clipped = this_min > 0
        this_scale = torch.where(clipped, sum_xl / sum_l2, this_scale)
        this_min = torch.where(clipped, torch.zeros_like(this_min), this_min)
        error = _weighted_error(this_scale, trial, this_min, x, weights, use_mad)
        better = solvable & (error < best)
        codes = torch.where(better, trial, codes)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    low = torch.where(flat, start_low, low)
    return codes.t().to(torch.uint8), scale, -low


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed codes -nmax..nmax-1 (stored + nmax) and one scale per group (row of x): C's make_qx_quants with
    rmse_type 1, weighted by `weights` (groups, n) or, without them, by x^2; it tries 18 scales around
    nmax / max|x|. Returns (L uint8 (groups, n), scale (groups,))."""
    amax, peak = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    x = x.t().contiguous()
    w = x * x if weights is None else weights.t().contiguous()
    codes, sum_lx, sum_l2 = _qx_trial(x, w, over(-nmax, peak), nmax)
    scale = torch.where(sum_l2 != 0, sum_lx / torch.where(sum_l2 != 0, sum_l2, 1), torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for step in [s for s in range(-9, 10) if s != 0]:
        trial, trial_lx, trial_l2 = _qx_trial(x, w, over(-f32(nmax + f32(f32(0.1) * step)), peak), nmax)
        better = (trial_l2 > 0) & (trial_lx * trial_lx > best * trial_l2)
        codes = torch.where(better, trial, codes)
        scale = torch.where(better, trial_lx / torch.where(better, trial_l2, 1), scale)
        best = torch.where(better, scale * trial_lx, best)
    codes = torch.where(zero, torch.zeros_like(codes), codes + nmax)
    return codes.t().to(torch.uint8), torch.where(zero, torch.zeros_like(scale), scale)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed codes -nmax..nmax-1 (stored + nmax) and a scale per group (row of x): C's make_q3_quants with
    do_rmse, a least-squares start refined one code at a time for up to 5 passes. Returns (L uint8, scale)."""
    amax, peak = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    x = x.t().contiguous()
    w = x * x
    wx = w * x
    codes = _codes(over(-nmax, peak) * x, -nmax, nmax - 1)
    sum_lx = sequential_sum(wx * codes)
    sum_l2 = sequential_sum(w * codes * codes)
    for _ in range(5):
        for i in range(x.shape[0]):
            old = codes[i]
            slx = sum_lx - wx[i] * old
            sl2 = sum_l2 - w[i] * old * old
            positive = slx > 0
            new = _codes(x[i] * sl2 / torch.where(positive, slx, 1), -nmax, nmax - 1)
            slx = slx + wx[i] * new
            sl2 = sl2 + w[i] * new * new
            accept = positive & (new != old) & (sl2 > 0) & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            codes[i] = torch.where(accept, new, old)
            sum_lx = torch.where(accept, slx, sum_lx)
            sum_l2 = torch.where(accept, sl2, sum_l2)
    scale = torch.where(sum_l2 > 0, sum_lx / torch.where(sum_l2 > 0, sum_l2, 1), torch.zeros_like(sum_l2))
    codes = torch.where(zero, torch.zeros_like(codes), codes + nmax)
    return codes.t().to(torch.uint8), torch.where(zero, torch.zeros_like(scale), scale)


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..nmax and one scale for non-negative values (a block's group scales or mins): C's make_qp_quants,
    nine scale candidates, then up to 5 passes refining one code at a time. Returns (L uint8, scale).

    As in C, L is a uint8 array: a negative code (only from a negative input) wraps, and the refinement reads
    the wrapped value."""
    top = x.clamp(min=0).amax(dim=-1)  # MAX(max, x[i]) from 0
    zero = top < GROUP_MAX_EPS
    top = torch.where(zero, torch.ones_like(top), top)
    x, w = x.t().contiguous(), weights.t().contiguous()
    iscale = over(nmax, top)
    scale = over(1, iscale)
    first = torch.remainder(torch.round(iscale * x), 256)  # L[i] = nearest_int(...) into uint8
    best = _weighted_square_error(x, scale * first, w)
    for step in [s for s in range(-4, 5) if s != 0]:
        trial_iscale = over(f32(f32(f32(0.1) * step) + nmax), top)
        trial = torch.round(trial_iscale * x).clamp_(max=nmax)
        error = _weighted_square_error(x, over(1, trial_iscale) * trial, w)
        better = error < best
        best = torch.where(better, error, best)
        iscale = torch.where(better, trial_iscale, iscale)
    codes = torch.round(iscale * x).clamp_(max=nmax)
    sum_lx, sum_l2 = sequential_sum(w * x * codes), sequential_sum(w * codes * codes)
    stored = torch.remainder(codes, 256)
    wx = w * x
    for _ in range(5):
        for i in range(x.shape[0]):
            old = stored[i]
            slx = sum_lx - wx[i] * old
            sl2 = sum_l2 - w[i] * old * old
            usable = (slx > 0) & (sl2 > 0)
            new = torch.round(x[i] * sl2 / torch.where(usable, slx, 1)).clamp_(max=nmax)
            slx = slx + wx[i] * new
            sl2 = sl2 + w[i] * new * new
            accept = usable & (new != old) & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            stored[i] = torch.where(accept, torch.remainder(new, 256), old)
            sum_lx = torch.where(accept, slx, sum_lx)
            sum_l2 = torch.where(accept, sl2, sum_l2)
    scale = torch.where(sum_l2 > 0, sum_lx / torch.where(sum_l2 > 0, sum_l2, 1), torch.zeros_like(sum_l2))
    stored = torch.where(zero, torch.zeros_like(stored), stored)
    return stored.t().to(torch.uint8), torch.where(zero, torch.zeros_like(scale), scale)


def _weighted_square_error(x: torch.Tensor, approx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    diff = x - approx
    return sequential_sum(w * diff * diff)  # C: w*diff*diff, that is (w*diff)*diff


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """C's nearest_int: round half to even, as an int32 tensor."""
    return torch.round(x).to(torch.int32)


def _codes(scaled: torch.Tensor, lowest: int, highest: int) -> torch.Tensor:
    """nearest_int then clamp, kept as float32 codes (they enter float sums as C's int -> float does)."""
    return torch.round(scaled).clamp_(lowest, highest)


def _weighted_error(scale: torch.Tensor, codes: torch.Tensor, low: torch.Tensor, x: torch.Tensor,
                    weights: torch.Tensor, use_mad: bool) -> torch.Tensor:
    diff = scale * codes + low - x
    return sequential_sum(weights * (diff.abs() if use_mad else diff * diff))


def _qx_trial(x: torch.Tensor, w: torch.Tensor, iscale: torch.Tensor, nmax: int):
    codes = _codes(iscale * x, -nmax, nmax - 1)
    return codes, sequential_sum(w * x * codes), sequential_sum(w * codes * codes)
