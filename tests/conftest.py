"""Shared fixtures: tiny random HF checkpoints (made in the test) and the optional ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton fixes compiled-or-interpreted when a kernel is defined (at import). Without a GPU the kernels
    # can only run in the interpreter, so choose it before any test imports kilnlm.kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    # Larger than HF's 0.02 so logits differ visibly between positions and a wrong op cannot hide.
    initializer_range=0.2,
)


TOKENIZER_VOCAB = 320


@pytest.fixture
def shared_dir() -> Path:
    """The team's ../shared data folder; tests that need it are skipped in a plain clone."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside the checkout")
    return SHARED


def make_hf_model(folder: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, **overrides):
    """Create and save a tiny random HF model of `arch` (llama, mistral, qwen2); return the HF model."""
    transformers = pytest.importorskip("transformers")
    config_classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_class, model_class = config_classes[arch]
    config = config_class(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(folder) if dtype == torch.float32 else model.to(dtype).save_pretrained(folder)
    return model.float()


@pytest.fixture(scope="session")
def sp_tokenizer_files(tmp_path_factory) -> Path:
    """A folder holding a small SentencePiece tokenizer (tokenizer.model + tokenizer_config.json)."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("sp_tokenizer")
    text = folder / "corpus.txt"
    lines = [f"Once upon a time there was a little {w} who liked to {v} in the {p}. {w.title()}s {v} {n} times."
             for w in ("cat", "dog", "girl", "boy", "bird", "fox", "king", "queen")
             for v in ("play", "run", "sing", "read", "jump", "swim")
             for p in ("garden", "park", "house", "forest", "river")
             for n in ("two", "three", "seven")]
    text.write_text("\n".join(lines), encoding="utf-8")
    # byte_fallback needs 256 byte pieces; the rest are learned merges.
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=TOKENIZER_VOCAB, model_type="bpe",
        byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
        # Llama's normaliser settings, so GGUF export round-trips the tokenizer exactly.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )
    (folder / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}', encoding="utf-8"
    )
    return folder


def add_tokenizer(folder: Path, tokenizer_files: Path) -> None:
    """Copy tokenizer files into a checkpoint folder."""
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_files / name).read_bytes())
