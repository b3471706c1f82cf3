"""Memory plans: the largest context that fits a device, checked with injected free-memory figures (no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kilnlm import Engine
from kilnlm.runtime.bench import synthetic_config
from kilnlm.runtime.engine import demo_model_path
from kilnlm.runtime.plan import MiB, OutOfMemoryPlanError, fit_context, kv_bytes, make_plan, recurrent_bytes

CUDA = torch.device("cuda")
GIB = 1 << 30


def _weights(config, element: int = 2) -> int:
    from kilnlm.runtime.models import expected_shapes

    return sum(int(torch.tensor(s).prod()) for s in expected_shapes(config).values()) * element


def test_fit_picks_the_largest_context_that_fits():
    config = synthetic_config("llama-8b")
    weights = _weights(config)
    plan = fit_context(config, weights, device=CUDA, dtype=torch.bfloat16, free=24 * GIB, longest=131072)
    assert plan.fits and 256 <= plan.context_length < 131072
    over = make_plan(config, weights, device=CUDA, dtype=torch.bfloat16, context=plan.context_length + 1,
                     free=24 * GIB)
    assert not over.fits
    assert plan.kv_per_token == 32 * 8 * 128 * 2 * 2  # layers x kv heads x head dim x (k + v) x bf16 bytes


def test_a_quantized_kv_cache_buys_a_longer_context():
    config = synthetic_config("llama-8b")
    weights = _weights(config)
    f16 = fit_context(config, weights, device=CUDA, dtype=torch.bfloat16, free=20 * GIB, longest=1 << 20)
    q8 = fit_context(config, weights, device=CUDA, dtype=torch.bfloat16, free=20 * GIB, longest=1 << 20,
                     k_type="q8_0", v_type="q8_0")
    assert q8.context_length / f16.context_length == pytest.approx(2 / (34 / 32), rel=0.01)


def test_weights_that_do_not_fit_are_refused_with_the_sizes_and_the_options():
    config = synthetic_config("llama-8b")
    with pytest.raises(OutOfMemoryPlanError, match=r"MiB free; use a smaller weight type.*quantized KV cache"):
        fit_context(config, _weights(config), device=CUDA, dtype=torch.bfloat16, free=8 * GIB)


def test_window_layers_and_recurrent_state():
    config = synthetic_config("llama-1b")
    windowed = type(config)(**{**config.__dict__, "sliding_window": 4096})
    assert kv_bytes(windowed, 100_000, None, None, torch.bfloat16) < kv_bytes(config, 100_000, None, None,
                                                                               torch.bfloat16) / 10
    mamba = synthetic_config("mamba-130m")
    plan = make_plan(mamba, _weights(mamba), device=CUDA, dtype=torch.bfloat16, context=100_000)
    assert plan.kv_cache == 0 and plan.recurrent_state == recurrent_bytes(mamba) > 0


def test_engine_plan_and_the_cli():
    plan = Engine.plan(demo_model_path(), context_length=512)
    assert plan.context_length == 512 and plan.kv_cache == int(plan.kv_per_token * 512) and plan.fits is None
    fitted = Engine.plan(demo_model_path(), device="cuda", free_bytes=2 * GIB)
    assert fitted.context_length == 512 and fitted.fits  # the model's own limit, well inside 2 GiB
    shown = subprocess.run([sys.executable, "-m", "kilnlm.cli", "plan", str(demo_model_path()), "--device", "cuda",
                            "--free-gib", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["fits"] is True
    refused = subprocess.run([sys.executable, "-m", "kilnlm.cli", "plan", str(demo_model_path()), "--device", "cuda",
                              "--free-gib", "0.3"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "MiB free" in refused.stderr and "Traceback" not in refused.stderr
    assert plan.total < 64 * MiB
