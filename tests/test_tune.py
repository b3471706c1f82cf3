"""End-to-end tuning of block scales after GPTQ (quant/tune.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kilnlm.export.checkpoint import open_checkpoint
from kilnlm.export.gguf import GGUFCheckpoint, write_gguf
from kilnlm.quant.calibration import generated_calibration_ids
from kilnlm.quant.formats import QuantizationError, QuantizedTensor
from kilnlm.quant.gptq import gptq_quantizer
from kilnlm.quant.tune import EndToEndTuner, TuneRecipe, _BlockScaledLinear
from kilnlm.runtime.engine import demo_model_path
from kilnlm.runtime.models import build_model

# Byte ranges of each block that hold codes, not fp16 parameters.
CODE_BYTES = {"q4_0": slice(2, 18), "q4_1": slice(4, 20), "q8_0": slice(2, 34)}


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_block_scaled_linear_decodes_like_the_registry_and_repacks_only_its_scales(fmt):
    g = torch.Generator().manual_seed(0)
    packed = QuantizedTensor.from_float(torch.randn(8, 64, generator=g) * 0.1, fmt)
    linear = _BlockScaledLinear(packed)
    assert torch.equal(linear.weight(), packed.dequantize())
    assert torch.equal(linear.repacked("w").data, packed.data)  # untrained: the same bytes
    with torch.no_grad():
        linear.log_gain.uniform_(-0.2, 0.2, generator=g)
        if linear.shift is not None:
            linear.shift.uniform_(-0.5, 0.5, generator=g)
    tuned = linear.repacked("w")
    blocks, before = tuned.data.view(8, 2, -1), packed.data.view(8, 2, -1)
    assert torch.equal(blocks[..., CODE_BYTES[fmt]], before[..., CODE_BYTES[fmt]])
    assert not torch.equal(tuned.data, packed.data)
    assert torch.equal(tuned.dequantize(), linear.weight(round_to_fp16=True))
    x = torch.randn(3, 64, generator=g)
    assert torch.allclose(linear(x), x @ linear.weight().T)


def test_a_scale_beyond_fp16_is_a_clear_error():
    linear = _BlockScaledLinear(QuantizedTensor.from_float(torch.full((1, 32), 1000.0), "q4_0"))
    with torch.no_grad():
        linear.log_gain.fill_(10.0)
    with pytest.raises(QuantizationError, match="fp16"):
        linear.repacked("w")


def test_recipe_needs_steps():
    with pytest.raises(QuantizationError, match="step"):
        EndToEndTuner(None, torch.zeros(1, 2, dtype=torch.long), TuneRecipe(steps=0))
    with pytest.raises(QuantizationError, match="at least 2"):
        EndToEndTuner(None, torch.zeros(1, 2, dtype=torch.long), TuneRecipe(steps=1))


@pytest.fixture(scope="module")
def demo():
    if not demo_model_path().is_dir():
        pytest.skip("demo model not built")
    return open_checkpoint(demo_model_path())


def _quantize(checkpoint, out, steps, nsamples=16, seqlen=64, **recipe):
    quantizer = gptq_quantizer(checkpoint, calib_files=[], nsamples=nsamples, seqlen=seqlen, seed=0)  # sampled text
    if steps:
        quantizer = EndToEndTuner(quantizer, quantizer.ids, TuneRecipe(steps=steps, **{"batch": 4, **recipe}))
    write_gguf(checkpoint, out, "q4_0", quantizer=quantizer)
    return quantizer


def _tensor_bytes(path) -> dict[str, bytes]:
    from gguf import GGUFReader

    return {t.name: t.data.tobytes() for t in GGUFReader(path).tensors}


def test_tuning_that_does_not_help_on_held_out_windows_changes_nothing(demo, tmp_path):
    """A learning rate that wrecks the model: the held-out check keeps GPTQ's own tensors, byte for byte."""
    plain, tuned = tmp_path / "plain.gguf", tmp_path / "tuned.gguf"
    _quantize(demo, plain, 0)
    tuner = _quantize(demo, tuned, 5, lr=0.5)
    assert all(kl > tuner.validation[0][1] for _, kl in tuner.validation[1:]), tuner.validation
    assert _tensor_bytes(plain) == _tensor_bytes(tuned)


def test_tuning_brings_the_gptq_model_closer_to_the_float_model(shared_dir, tmp_path):
    """stories260K (a real model with a real Q4_0 error): on windows the tuning never saw, KL(float ‖ quantized)
    drops; every code and the embedding stay as GPTQ chose them, only fp16 scales and float tensors move."""
    checkpoint = open_checkpoint(shared_dir / "checkpoints" / "stories260K-hf")
    paths = {steps: tmp_path / f"tuned-{steps}.gguf" for steps in (0, 100)}
    for steps, path in paths.items():
        tuner = _quantize(checkpoint, path, steps, nsamples=64, seqlen=128, batch=8)
    assert min(kl for _, kl in tuner.validation) < tuner.validation[0][1]
    reference = build_model(checkpoint.config, checkpoint.tensors())
    held_out = generated_calibration_ids(reference, checkpoint.tokenizer(), 8, 64, seed=123)
    files = {steps: GGUFCheckpoint(path) for steps, path in paths.items()}
    with torch.no_grad():
        p = torch.log_softmax(reference(held_out), -1)
        kl = {}
        for steps, file in files.items():
            q = torch.log_softmax(build_model(file.config, file.tensors())(held_out), -1)
            kl[steps] = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl[100] < 0.9 * kl[0], kl
    plain, tuned = (_tensor_bytes(path) for path in paths.values())
    assert plain["token_embd.weight"] == tuned["token_embd.weight"]
    for name in ("blk.0.attn_q.weight", "blk.3.ffn_up.weight"):
        a, b = (torch.frombuffer(bytearray(t[name]), dtype=torch.uint8).view(-1, 18) for t in (plain, tuned))
        assert torch.equal(a[:, CODE_BYTES["q4_0"]], b[:, CODE_BYTES["q4_0"]]) and not torch.equal(a, b)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_down.weight", "output_norm.weight"):
        assert plain[name] != tuned[name]


def test_tuning_is_deterministic(demo, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "demo.gguf", tmp_path / "b" / "demo.gguf"  # the file name is stored as general.name
    _quantize(demo, a, 5)
    _quantize(demo, b, 5)
    assert a.read_bytes() == b.read_bytes()


def test_cli_tunes_after_gptq_and_records_it(demo, tmp_path):
    out = tmp_path / "tuned.gguf"
    kiln = [sys.executable, "-m", "kilnlm.cli", "quantize", str(demo_model_path()), "-o", str(out), "--type", "q4_0"]
    refused = subprocess.run([*kiln, "--tune-steps", "3"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--method gptq" in refused.stderr and not out.exists()
    result = subprocess.run([*kiln, "--method", "gptq", "--nsamples", "4", "--seqlen", "32", "--tune-steps", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tuning scales" in result.stderr
    recorded = json.loads(GGUFCheckpoint(out).file.metadata["kilnlm.quantization.tuning"])
    assert recorded == {"method": "e2e-kl", "steps": 3, "lr": 0.001, "batch": 16, "seed": 0}
