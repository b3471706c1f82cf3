"""Packed ggml weights in the runtime: QuantizedLinear keeps them packed and matches dequantising."""

from __future__ import annotations

import pytest
import torch

from kilnlm.export.checkpoint import open_checkpoint
from kilnlm.export.gguf import write_gguf
from kilnlm.runtime.engine import Engine, demo_model_path
from kilnlm.runtime.models.quantized_linear import QuantizedLinear


@pytest.fixture(scope="module", params=["q4_0", "q4_1", "q8_0", "q4_k_m", "q5_k_m", "q6_k"])
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
    # 0.645; exactly 1.0 if the packed path silently dequantised. K-quants hold the kernel's planes (group
    # scales multiplied out into float32): what kernel_bytes says, per tensor type of the file.
    target = gguf_file.stem.split("-")[1]
    expected = {"q4_0": 0.456, "q4_1": 0.482, "q8_0": 0.645}.get(target) or _kernel_plane_ratio(gguf_file)
    assert ratio == pytest.approx(expected, abs=0.005)
    assert ratio < 0.75


def _kernel_plane_ratio(path) -> float:
    import gguf

    from kilnlm.kernels.dequant_matmul import kernel_bytes

    held = dense = 0
    for t in gguf.GGUFReader(path).tensors:
        if not t.name.startswith("blk.") or len(t.shape) != 2:
            continue
        shape = (int(t.shape[1]), int(t.shape[0]))  # (out, in) from ggml's (ne0, ne1)
        dense += shape[0] * shape[1] * 2
        kind = t.tensor_type.name.lower()
        held += kernel_bytes(kind, shape) if kind in ("q4_k", "q5_k", "q6_k") else shape[0] * shape[1] * 2
    return held / dense
