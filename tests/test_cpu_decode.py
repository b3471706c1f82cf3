"""The compiled CPU decode step (runtime.models.cpu_decode) against the model's own modules, its reference."""

from __future__ import annotations

import pytest
import torch

from kilnlm.export.checkpoint import open_checkpoint
from kilnlm.export.gguf import write_gguf
from kilnlm.kernels import cpu
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.engine import Engine, demo_model_path
from kilnlm.runtime.models import expected_shapes, llama

pytestmark = pytest.mark.skipif(not cpu.kernel_status().compiled,
                                reason=f"no CPU kernels here: {cpu.kernel_status().detail}")


class _Synthetic:
    """A small Llama-family checkpoint with seeded random weights, as the GGUF writer reads one."""

    def __init__(self, **overrides):
        shape = dict(architecture="llama", hidden_size=128, intermediate_size=320, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=32, vocab_size=2048, max_position_embeddings=512, rms_norm_eps=1e-5,
                     tie_word_embeddings=False)
        self.config = ModelConfig(**{**shape, **overrides})
        self._shapes = expected_shapes(self.config)

    def tensor_names(self):
        return list(self._shapes)

    def tensor(self, name):
        generator = torch.Generator().manual_seed(sum(map(ord, name)))
        scale = 0.5 if name.endswith("bias") else 0.08
        values = torch.randn(self._shapes[name], generator=generator) * scale
        return 1.0 + values if name.endswith("norm.weight") else values

    def tokenizer(self):
        return open_checkpoint(demo_model_path()).tokenizer()


def _steps(model, kv_type, compiled: bool, monkeypatch, steps: int = 12) -> list[torch.Tensor]:
    """Logits of a 5-token prompt and `steps` greedy decode steps after it; model.ran_compiled says whether the
    compiled step ran them."""
    if not compiled:
        monkeypatch.setattr(llama, "compiled_decode", lambda *args: False)
    cache = model.new_cache(64, k_type=kv_type, v_type=kv_type)
    out = []
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 5, 9, 13, 17]]), cache)[:, -1:]
        for _ in range(steps):
            out.append(logits[0, -1])
            logits = model(logits.argmax(-1), cache)
    monkeypatch.undo()
    model.ran_compiled = _ran_compiled(model)
    return out


def _ran_compiled(model) -> bool:
    """Whether a live cache of the model has the compiled step prepared (plans last as long as their cache)."""
    plans = model.__dict__.get("_cpu_decode_plans") or {}
    return any(plan is not None for plan in plans.values())


@pytest.fixture(params=["q4_0", "q4_k_m", "q8_0", "f16"])
def demo_file(request, demo_gguf):
    return demo_gguf(request.param)


@pytest.mark.parametrize("kv_type", [None, "f16", "bf16"])
def test_compiled_step_matches_the_modules_on_the_demo_model(demo_file, kv_type, monkeypatch):
    model = Engine.load(demo_file, progress=False).model
    ours = _steps(model, kv_type, True, monkeypatch)
    assert model.ran_compiled  # the demo model's every matrix is packed, so the compiled step took it
    theirs = _steps(model, kv_type, False, monkeypatch)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4 * b.abs().max().item())


def test_compiled_step_keeps_greedy_tokens_of_the_dequantised_model(demo_file):
    packed = Engine.load(demo_file, progress=False)
    plain = Engine.load(demo_file, packed_weights=False, progress=False)
    kwargs = dict(max_tokens=64, temperature=0, ignore_eos=True)
    assert packed.generate("KING HENRY:", **kwargs) == plain.generate("KING HENRY:", **kwargs)
    assert _ran_compiled(packed.model) and not _ran_compiled(plain.model)


@pytest.mark.parametrize("overrides", [
    dict(architecture="qwen2", attention_bias=True),  # q, k, v biases: each projection its own part
    dict(sliding_window=8),  # a window shorter than the cache, kept in a full store: the kernel applies it
    dict(num_kv_heads=1, tie_word_embeddings=True),  # MQA, and the embedding's blocks as the output
])
def test_compiled_step_matches_the_modules_across_the_family(overrides, tmp_path, monkeypatch):
    path = tmp_path / "synthetic.gguf"
    write_gguf(_Synthetic(**overrides), path, "q8_0")
    model = Engine.load(path, progress=False).model
    ours = _steps(model, "f16", True, monkeypatch, steps=20)
    assert model.ran_compiled
    theirs = _steps(model, "f16", False, monkeypatch, steps=20)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4 * b.abs().max().item())


def test_what_the_step_does_not_take_runs_the_modules(tmp_path, monkeypatch):
    path = tmp_path / "synthetic.gguf"
    write_gguf(_Synthetic(), path, "q4_0")
    model = Engine.load(path, progress=False).model
    _steps(model, "q8_0", True, monkeypatch, steps=2)  # a quantized cache: its own decode kernel reads it
    assert not model.ran_compiled
    with torch.inference_mode():
        cache = model.new_cache(16, batch=2)
        model(torch.tensor([[1, 2], [3, 4]]), cache)
        model(torch.tensor([[5], [6]]), cache)  # two sequences: the modules
    assert not _ran_compiled(model)
    cache = model.new_cache(16)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), cache)
    model(torch.tensor([[3]]), cache)  # autograd on: the modules, which it can follow
    assert not _ran_compiled(model)
