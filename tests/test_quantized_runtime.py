"""Packed Q4_0/Q4_1/Q8_0 weights in the runtime: QuantizedLinear keeps them packed and matches dequantising."""

from __future__ import annotations

import pytest
import torch

from kilnlm.export.checkpoint import open_checkpoint
from kilnlm.export.gguf import write_gguf
from kilnlm.runtime.engine import Engine, demo_model_path
from kilnlm.runtime.models.quantized_linear import QuantizedLinear


@pytest.fixture(scope="module", params=["q4_0", "q4_1", "q8_0"])
def gguf_file(request, tmp_path_factory):
    if not demo_model_path().is_dir():
        pytest.skip("demo model not built")
    out = tmp_path_factory.mktemp("packed") / f"demo-{request.param}.gguf"
    write_gguf(open_checkpoint(demo_model_path()), out, request.param)
    return out


def test_packed_engine_matches_the_dequantised_engine(gguf_file):
    packed = Engine.load(gguf_file, packed_weights=True, progress=False)
    plain = Engine.load(gguf_file, packed_weights=False, progress=False)
    attn = packed.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QuantizedLinear) and isinstance(attn.k_proj, QuantizedLinear)
    assert not isinstance(plain.model.layers[0].self_attn.q_proj, QuantizedLinear)
    ids = torch.tensor([plain.tokenizer.encode("ROMEO:\nI will not stay, my lord.")])
    with torch.no_grad():
        assert (packed.model(ids) - plain.model(ids)).abs().max() < 1e-3
    kwargs = dict(max_tokens=8, temperature=0, ignore_eos=True)
    assert packed.generate("ROMEO:", **kwargs) == plain.generate("ROMEO:", **kwargs)


def test_packed_weights_take_a_fraction_of_the_float_memory(gguf_file):
    packed = Engine.load(gguf_file, packed_weights=True, dtype="fp16", progress=False)
    plain = Engine.load(gguf_file, packed_weights=False, dtype="fp16", progress=False)

    def linear_bytes(model):
        return sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                   if "_proj" in n)

    ratio = linear_bytes(packed.model) / linear_bytes(plain.model)
    # Packed: q4_0 4.5 bits, q4_1 5, q8_0 8.5 per weight vs fp16's 16, for 3/4 of the block weights; the
    # other quarter (down_proj: 688 columns, not a multiple of 32) is fp16 in both. Expected 0.456 / 0.482 /
    # 0.645; exactly 1.0 if the packed path silently dequantised.
    expected = {"q4_0": 0.456, "q4_1": 0.482, "q8_0": 0.645}[gguf_file.stem.split("-")[1]]
    assert ratio == pytest.approx(expected, abs=0.005)
