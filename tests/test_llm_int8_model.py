"""LLM.int8 over a whole model: calibration, a kilnlm-only GGUF file, and the runtime's Int8Linear."""

from __future__ import annotations

import pytest
import torch

from kilnlm.export.checkpoint import open_checkpoint
from kilnlm.export.gguf import GGUFCheckpoint, write_gguf
from kilnlm.export.inspect import describe_gguf
from kilnlm.quant.calibration import calibration_ids
from kilnlm.quant.llm_int8 import LLMInt8Quantizer, quantize_llm_int8
from kilnlm.runtime.engine import Engine, demo_model_path
from kilnlm.runtime.models.int8_linear import Int8Linear

CALIB_TEXT = ("ROMEO: I will not stay, my lord; the king is dead and all the court is mourning.\n" * 3) * 30


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory):
    if not demo_model_path().is_dir():
        pytest.skip("demo model not built")
    folder = tmp_path_factory.mktemp("int8")
    (folder / "calib.txt").write_text(CALIB_TEXT)
    source = open_checkpoint(demo_model_path())
    ids = calibration_ids(source.tokenizer(), [folder / "calib.txt"], nsamples=8, seqlen=64, seed=0)
    quantizer = LLMInt8Quantizer(ids)
    write_gguf(source, folder / "demo-int8.gguf", "f16", quantizer=quantizer)
    return folder / "demo-int8.gguf", quantizer, source


def test_file_holds_codes_scales_and_outliers_exactly(int8_file):
    path, quantizer, source = int8_file
    assert any(len(cols) for cols in quantizer.outliers.values())  # this model does have outlier features
    loaded = GGUFCheckpoint(path)
    for name in ("layers.0.self_attn.q_proj.weight", "layers.3.mlp.down_proj.weight"):  # permuted and not
        expected = quantize_llm_int8(source.tensor(name), quantizer.outliers[name])
        got = loaded.int8_weight(name)
        assert torch.equal(got.weight_int8, expected.weight_int8)
        assert torch.equal(got.row_scale, expected.row_scale)
        assert torch.equal(got.outlier_idx, expected.outlier_idx)
        assert torch.equal(got.outlier_weight, expected.outlier_weight)
    assert loaded.int8_weight("norm.weight") is None


def test_inspect_says_only_kilnlm_loads_it(int8_file):
    description = describe_gguf(int8_file[0])
    assert description["metadata"]["kilnlm.quantization.scheme"] == "llm.int8"
    assert len(description["loadable_by"]) == 1 and description["loadable_by"][0].startswith("kilnlm")
    types = {t["name"]: t["type"] for t in description["tensors"]}
    assert types["blk.0.attn_q.weight"] == "I8" and types["blk.0.attn_q.int8_scale"] == "F32"


def test_engine_runs_int8_linears_close_to_the_float_model(int8_file):
    path, _, _ = int8_file
    engine, reference = Engine.load(path, progress=False), Engine.load(demo_model_path(), progress=False)
    assert isinstance(engine.model.layers[0].self_attn.q_proj, Int8Linear)
    assert isinstance(engine.model.layers[5].mlp.down_proj, Int8Linear)
    ids = torch.tensor([reference.tokenizer.encode("ROMEO:\nI will not stay, my lord, for the king is dead.")])
    with torch.no_grad():
        got, expected = engine.model(ids), reference.model(ids)
    # Measured 1.0% of the logit range; W8A8 with fp16 outliers keeps each product within ~0.5%.
    assert (got - expected).abs().max() / expected.abs().max() < 0.03
    assert len(engine.generate("ROMEO:", max_tokens=10, temperature=0, ignore_eos=True)) > 0
