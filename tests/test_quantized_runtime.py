"""Packed ggml weights in the runtime: QuantizedLinear keeps them packed and matches dequantising."""

from __future__ import annotations

import pytest
import torch

from kilnlm.export.checkpoint import open_checkpoint
from kilnlm.export.gguf import write_gguf
from kilnlm.runtime.engine import Engine
from kilnlm.runtime.models.quantized_linear import QuantizedEmbedding, QuantizedLinear


@pytest.fixture(params=["q4_0", "q4_1", "q8_0", "q4_k_m", "q5_k_m", "q6_k"])
def gguf_file(request, demo_gguf):
    return demo_gguf(request.param)


@pytest.mark.parametrize("activations", ["i16", "f32"])
def test_packed_engine_matches_the_dequantised_engine(gguf_file, activations):
    packed = Engine.load(gguf_file, progress=False, cpu_activations=activations)  # packed: the CPU default
    plain = Engine.load(gguf_file, packed_weights=False, progress=False)
    attn = packed.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QuantizedLinear) and isinstance(attn.k_proj, QuantizedLinear)
    assert isinstance(packed.model.embed_tokens, QuantizedEmbedding)
    assert not isinstance(plain.model.layers[0].self_attn.q_proj, QuantizedLinear)
    ids = torch.tensor([plain.tokenizer.encode("ROMEO:\nI will not stay, my lord.")])
    with torch.no_grad():
        assert (packed.model(ids) - plain.model(ids)).abs().max() < 1e-3  # a prompt: float32 products
        # one token: the one-row kernels (integer dot products with i16 activations)
        assert (packed.model(ids[:, :1]) - plain.model(ids[:, :1])).abs().max() < 1e-3
    kwargs = dict(max_tokens=48, temperature=0, ignore_eos=True)
    assert packed.generate("ROMEO:", **kwargs) == plain.generate("ROMEO:", **kwargs)


def test_int8_activations_stay_close(gguf_file):
    packed = Engine.load(gguf_file, progress=False, cpu_activations="i8")
    plain = Engine.load(gguf_file, packed_weights=False, progress=False)
    ids = torch.tensor([plain.tokenizer.encode("ROMEO:")])
    with torch.no_grad():
        ours, theirs = packed.model(ids)[0, -1], plain.model(ids)[0, -1]
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()
    assert ours.argmax() == theirs.argmax()


def test_packed_weights_take_the_files_bytes(gguf_file):
    packed = Engine.load(gguf_file, dtype="fp16", progress=False)
    plain = Engine.load(gguf_file, packed_weights=False, dtype="fp16", progress=False)

    def linear_bytes(model):
        return sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                   if "_proj" in n)

    ratio = linear_bytes(packed.model) / linear_bytes(plain.model)
    # On the CPU the block linears hold the file's own bytes: q4_0 4.5 bits, q4_1 5, q8_0 8.5 per weight against
    # fp16's 16 for 3/4 of the block weights; the other quarter (down_proj: 688 columns, not a multiple of 32) is
    # fp16 in both. Exactly 1.0 if the packed path silently dequantised.
    assert ratio == pytest.approx(_file_ratio(gguf_file), abs=0.002)
    assert ratio < 0.75


def test_loading_builds_the_model_without_torch_compile_machinery(demo_gguf):
    """Modules are built on the meta device without their random init (runtime.models.on_meta): torch's meta
    kernels of normal_ / uniform_ import torch._dynamo and sympy, ~70 MiB of resident memory for a CPU app."""
    import subprocess
    import sys

    script = ("import sys; from kilnlm import Engine; Engine.load(sys.argv[1], progress=False); "
              "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script, str(demo_gguf("q4_0"))], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_meta_modules_keep_their_shapes_and_real_ones_their_init():
    from kilnlm.runtime.models import on_meta

    with on_meta():
        meta = torch.nn.Linear(64, 32)
    assert meta.weight.is_meta and meta.weight.shape == (32, 64)
    with on_meta():  # a real tensor made inside still gets its values
        real = torch.nn.init.normal_(torch.zeros(1000, device="cpu"))
    assert real.std() > 0.5
    assert not torch.empty(1).is_meta  # the context ended


def _file_ratio(path) -> float:
    import gguf

    held = dense = 0
    for t in gguf.GGUFReader(path).tensors:
        if not t.name.startswith("blk.") or len(t.shape) != 2:
            continue
        weights = int(t.shape[0]) * int(t.shape[1])
        dense += weights * 2
        held += int(t.n_bytes) if int(t.shape[0]) % 32 == 0 else weights * 2
    return held / dense


@pytest.mark.parametrize("target", ["q4_0", "q8_0", "f16"])
def test_stories260k_greedy_tokens_equal_the_dequantised_path(shared_dir, tmp_path, target):
    out = tmp_path / f"stories-{target}.gguf"
    write_gguf(open_checkpoint(shared_dir / "checkpoints" / "stories260K-hf"), out, target)
    packed = Engine.load(out, progress=False)
    plain = Engine.load(out, packed_weights=False, progress=False)
    assert isinstance(packed.model.layers[0].mlp.up_proj, QuantizedLinear)
    kwargs = dict(max_tokens=96, temperature=0, ignore_eos=True)
    assert packed.generate("Once upon a time", **kwargs) == plain.generate("Once upon a time", **kwargs)


def test_explicit_threads_apply_during_generation_only(gguf_file):
    before = torch.get_num_threads()
    engine = Engine.load(gguf_file, progress=False, threads=1)
    seen = []
    for _ in engine.generate("ROMEO:", max_tokens=2, temperature=0, stream=True):
        seen.append(torch.get_num_threads())
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    assert engine.model.layers[0].self_attn.q_proj.cpu.threads == 1


@pytest.mark.parametrize("options", [dict(threads=0), dict(threads=-2), dict(cpu_activations="int4")])
def test_bad_cpu_options_are_refused_before_loading(demo_gguf, options):
    from kilnlm.errors import KilnError

    with pytest.raises(KilnError, match="threads must be at least 1|CPU activations must be one of"):
        Engine.load(demo_gguf("q4_0"), progress=False, **options)


def test_fused_projections_share_one_matrix(gguf_file):
    engine = Engine.load(gguf_file, progress=False)
    mlp = engine.model.layers[0].mlp
    assert mlp.gate_proj._group is mlp.up_proj._group is not None
    assert mlp.gate_proj.qweight.untyped_storage().data_ptr() == mlp.up_proj.qweight.untyped_storage().data_ptr()
