"""Bad HF checkpoints raise the project's errors with messages that name the file and the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_model
from kilnlm.errors import CheckpointError, KilnError, PickleRefusedError, UnsupportedModelError
from kilnlm.export.hf import open_hf_checkpoint
from kilnlm.runtime.models import build_model


@pytest.fixture
def folder(tmp_path):
    make_hf_model(tmp_path, "llama")
    return tmp_path


def _load(folder, **kwargs):
    checkpoint = open_hf_checkpoint(folder, **kwargs)
    return build_model(checkpoint.config, checkpoint.tensors(), source=str(folder))


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        open_hf_checkpoint(tmp_path / "nope")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        open_hf_checkpoint(folder)


def test_malformed_config(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        open_hf_checkpoint(folder)


def test_missing_required_field(folder):
    _edit_config(folder, hidden_size=None)
    with pytest.raises(CheckpointError, match="'hidden_size' is missing"):
        open_hf_checkpoint(folder)


def test_unsupported_architecture_lists_supported(folder):
    _edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        open_hf_checkpoint(folder)


def test_unsupported_rope_type(folder):
    _edit_config(folder, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="longrope"):
        open_hf_checkpoint(folder)


def test_missing_weights_names_what_was_looked_for(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found.*model.safetensors"):
        open_hf_checkpoint(folder)


def test_missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is listed but missing"):
        open_hf_checkpoint(folder)


def test_corrupt_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors"):
        _load(folder)


def test_wrong_shape_names_the_tensor(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight.*\(95, 64\).*\(96, 64\)"):
        _load(folder)


def test_missing_tensor_is_named(folder):
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors norm\.weight"):
        _load(folder)


def test_untied_model_without_lm_head(folder):
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        _load(folder)


def test_integer_weights_are_refused(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int8)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="norm.weight.*torch.int8"):
        _load(folder)


def test_pickle_is_refused_by_default_and_loads_safely_when_allowed(folder):
    tensors = load_file(folder / "model.safetensors")
    reference = _load(folder)
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        open_hf_checkpoint(folder)
    model = _load(folder, allow_pickle=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


def test_pickle_with_code_is_refused_even_when_allowed(folder):
    (folder / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        _load(folder, allow_pickle=True)


def test_project_errors_share_a_base():
    assert issubclass(UnsupportedModelError, KilnError) and issubclass(PickleRefusedError, KilnError)
