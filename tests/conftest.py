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


@pytest.fixture(scope="session")
def demo_gguf(tmp_path_factory):
    """demo_gguf(type) -> the bundled demo model written as a GGUF file of that type (once per session)."""
    from kilnlm.export.checkpoint import open_checkpoint
    from kilnlm.export.gguf import write_gguf
    from kilnlm.runtime.engine import demo_model_path

    written: dict[str, Path] = {}

    def write(target: str) -> Path:
        if not demo_model_path().is_dir():
            pytest.skip("demo model not built")
        if target not in written:
            written[target] = tmp_path_factory.mktemp("demo-gguf") / f"demo-{target}.gguf"
            write_gguf(open_checkpoint(demo_model_path()), written[target], target)
        return written[target]

    return write


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


TINY_MAMBA = {
    "mamba": dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, state_size=8, conv_kernel=4, expand=2,
                  time_step_rank=8),
    "falcon_mamba": dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, state_size=8, conv_kernel=4,
                         expand=2, time_step_rank=8),
    "mamba2": dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, state_size=16, conv_kernel=4, expand=2,
                   num_heads=8, head_dim=16, n_groups=1, chunk_size=8),
}


def make_hf_mamba(folder: Path, arch: str = "mamba", **overrides):
    """Create and save a tiny random HF Mamba model (mamba, falcon_mamba, mamba2); return the HF model.

    Every parameter is perturbed away from HF's structured init (D = 1, A_log = log(1..N), zero biases, unit
    norms), so that a mixer that ignored one of them could not match.
    """
    transformers = pytest.importorskip("transformers")
    classes = {
        "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM),
        "falcon_mamba": (transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM),
        "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM),
    }
    config_class, model_class = classes[arch]
    torch.manual_seed(0)
    model = model_class(config_class(**{**TINY_MAMBA[arch], **overrides})).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if name.endswith(("A_log", "dt_bias", "D", "norm.weight", "norm_f.weight", "bias")) else 0.05
            param.add_(scale * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return model


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


TINY_GRANITE_HYBRID = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, shared_intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_local_experts=0,
    layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, embedding_multiplier=3.0,
    residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0, position_embedding_type="nope",
)


def make_hf_granite_hybrid(folder: Path, **overrides):
    """Create and save a tiny random GraniteMoeHybridForCausalLM (dense, Mamba-2 + attention); return it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GraniteMoeHybridConfig(**{**TINY_GRANITE_HYBRID, **overrides})
    model = transformers.GraniteMoeHybridForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if name.endswith(("A_log", "dt_bias", "D", "norm.weight", "bias")) else 0.05
            param.add_(scale * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return model
