"""Compute kernels, each beside its pure-torch reference.

This module is the one dispatch point the models call. Today every op is the reference; the Triton
kernels (GPU issue) will be chosen here, by device, and nowhere else.
"""

from kilnlm.kernels.activation import silu_mul_ref as silu_mul
from kilnlm.kernels.attention import attention_ref as attention
from kilnlm.kernels.norm import rms_norm_ref as rms_norm
from kilnlm.kernels.rope import apply_rotary_ref as apply_rotary

__all__ = ["apply_rotary", "attention", "rms_norm", "silu_mul"]
