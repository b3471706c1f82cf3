"""K-quant (and Q5_0/Q5_1) writing is byte-identical with llama.cpp's reference quantizers.

The expected bytes in tests/data/kquant_reference.npz come from ggml-quants.c itself, compiled by
scripts/make_kquant_reference.py (which also defines the inputs, rebuilt here from the same seed). Q5_0/Q5_1
are checked against gguf-py's numpy port of the C code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from kilnlm.quant.formats import get_format

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from make_kquant_reference import FORMATS, WEIGHTED_LEGACY, importance, reference_inputs  # noqa: E402

REFERENCE = np.load(REPO / "tests" / "data" / "kquant_reference.npz")
INPUTS = reference_inputs()


def _assert_same_blocks(fmt, got: np.ndarray, want: np.ndarray) -> None:
    """Byte equality, reporting the first differing block and bytes."""
    blocks_got, blocks_want = got.reshape(-1, fmt.bytes_per_block), want.reshape(-1, fmt.bytes_per_block)
    differ = np.nonzero((blocks_got != blocks_want).any(axis=1))[0]
    assert differ.size == 0, f"{differ.size} of {len(blocks_want)} blocks differ, first {differ[0]} at bytes " \
        f"{np.nonzero(blocks_got[differ[0]] != blocks_want[differ[0]])[0][:8].tolist()}"


@pytest.mark.parametrize("case", list(INPUTS))
@pytest.mark.parametrize("kind", list(FORMATS))
def test_k_quants_are_byte_identical_with_llama_cpp(kind: str, case: str) -> None:
    fmt = get_format(kind)
    _assert_same_blocks(fmt, fmt.quantize(torch.from_numpy(INPUTS[case])).numpy(), REFERENCE[f"{kind}/{case}"])


@pytest.mark.parametrize("case", list(INPUTS))
@pytest.mark.parametrize("kind", [*FORMATS, *WEIGHTED_LEGACY])
def test_importance_weighted_quants_are_byte_identical_with_llama_cpp(kind: str, case: str) -> None:
    """With an importance matrix: ggml's quantize_* with quant_weights (the *_impl functions)."""
    fmt = get_format(kind)
    x = INPUTS[case]
    got = fmt.quantize(torch.from_numpy(x), importance=torch.from_numpy(importance(x, 7))).numpy()
    _assert_same_blocks(fmt, got, REFERENCE[f"{kind}/{case}/imatrix"])


@pytest.mark.parametrize("kind", list(FORMATS))
def test_k_quants_round_trip_close_to_the_weights(kind: str) -> None:
    """Dequantising what was written gives the weights back within the format's resolution."""
    fmt = get_format(kind)
    x = torch.from_numpy(INPUTS["normal"])
    error = (fmt.dequantize(fmt.quantize(x), x.shape) - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()
    bound = {"q2_k": 0.45, "q3_k": 0.25, "q4_k": 0.12, "q5_k": 0.06, "q6_k": 0.03}[kind]
    assert float(error) < bound


@pytest.mark.parametrize("kind", ["q5_0", "q5_1"])
def test_q5_legacy_formats_match_gguf_py(kind: str) -> None:
    fmt = get_format(kind)
    for case, x in INPUTS.items():
        want = quants.quantize(x, GGMLQuantizationType[kind.upper()])
        got = fmt.quantize(torch.from_numpy(x)).numpy()
        assert np.array_equal(got, want), case
        assert np.array_equal(fmt.dequantize(torch.from_numpy(got), x.shape).numpy(),
                              quants.dequantize(want, GGMLQuantizationType[kind.upper()])), case


LLAMA_QUANTIZE_TYPES = ["q4_k_m", "q4_k_s", "q5_k_m", "q6_k", "q3_k_m", "q2_k", "q5_0", "q4_0", "q8_0"]


@pytest.fixture(scope="module")
def f32_demo(tmp_path_factory):
    from kilnlm.export.checkpoint import open_checkpoint
    from kilnlm.export.gguf import write_gguf
    from kilnlm.runtime.engine import demo_model_path

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional oracle (a source build)")
    folder = tmp_path_factory.mktemp("llama_quantize")
    write_gguf(open_checkpoint(demo_model_path()), folder / "f32.gguf", "f32")
    return folder


@pytest.mark.parametrize("target", LLAMA_QUANTIZE_TYPES)
def test_files_equal_llama_quantize_tensor_for_tensor(f32_demo, target: str) -> None:
    """llama.cpp's own llama_model_quantize on the same F32 file: same tensors in the same order, the same type
    for each (the mix rules and fallbacks), and the same bytes."""
    import ctypes

    import gguf
    import llama_cpp

    from kilnlm.export.checkpoint import open_checkpoint
    from kilnlm.export.gguf import write_gguf
    from kilnlm.runtime.engine import demo_model_path

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, f"MOSTLY_{target.upper()}"))
    theirs_path, ours_path = f32_demo / f"llama-{target}.gguf", f32_demo / f"kiln-{target}.gguf"
    assert llama_cpp.llama_model_quantize(str(f32_demo / "f32.gguf").encode(), str(theirs_path).encode(),
                                          ctypes.byref(params)) == 0
    write_gguf(open_checkpoint(demo_model_path()), ours_path, target)
    theirs, ours = gguf.GGUFReader(theirs_path).tensors, gguf.GGUFReader(ours_path).tensors
    assert [(t.name, t.tensor_type.name) for t in ours] == [(t.name, t.tensor_type.name) for t in theirs]
    differ = [t.name for t, o in zip(theirs, ours, strict=True) if not np.array_equal(np.asarray(t.data).view(np.uint8),
                                                                                     np.asarray(o.data).view(np.uint8))]
    assert differ == []


def test_q4_k_m_from_a_gguf_file_equals_from_the_hf_folder(tmp_path) -> None:
    """`kiln quantize --type q4_k_m` reads GGUF input too: the demo model's weights are fp16, so its F16 GGUF
    holds the same values and both routes write the same file bytes."""
    import gguf

    from kilnlm.export.checkpoint import open_checkpoint
    from kilnlm.export.gguf import write_gguf
    from kilnlm.runtime.engine import demo_model_path

    write_gguf(open_checkpoint(demo_model_path()), tmp_path / "f16.gguf", "f16")
    write_gguf(open_checkpoint(tmp_path / "f16.gguf"), tmp_path / "from-gguf.gguf", "q4_k_m")
    write_gguf(open_checkpoint(demo_model_path()), tmp_path / "from-hf.gguf", "q4_k_m")
    a, b = gguf.GGUFReader(tmp_path / "from-gguf.gguf").tensors, gguf.GGUFReader(tmp_path / "from-hf.gguf").tensors
    assert [(t.name, t.tensor_type.name) for t in a] == [(t.name, t.tensor_type.name) for t in b]
    assert all(np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(a, b, strict=True))
    assert {t.tensor_type.name for t in a} >= {"Q4_K", "Q6_K"}
