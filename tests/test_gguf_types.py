"""llama.cpp's tensor-type rules (export/gguf_types.py): which tensors of a K-quant mix get more bits."""

from __future__ import annotations

import pytest

from kilnlm.export.gguf_types import TARGET_TYPES, ModelShape, TensorSlot, tensor_types

LAYERS = 8
# llama.cpp's use_more_bits for 8 layers: the first eighth, the last eighth, and every third in between
MORE_BITS = {0, 3, 6, 7}


def _llama_slots(hidden: int = 512, ffn: int = 1024, tied: bool = False) -> list[TensorSlot]:
    slots = [TensorSlot("token_embd.weight", 2, hidden)]
    for i in range(LAYERS):
        slots += [TensorSlot(f"blk.{i}.attn_norm.weight", 1, hidden)]
        slots += [TensorSlot(f"blk.{i}.attn_{p}.weight", 2, hidden) for p in ("q", "k", "v", "output")]
        slots += [TensorSlot(f"blk.{i}.ffn_norm.weight", 1, hidden), TensorSlot(f"blk.{i}.ffn_gate.weight", 2, hidden),
                  TensorSlot(f"blk.{i}.ffn_up.weight", 2, hidden), TensorSlot(f"blk.{i}.ffn_down.weight", 2, ffn)]
    slots += [TensorSlot("output_norm.weight", 1, hidden)] + ([] if tied else [TensorSlot("output.weight", 2, hidden)])
    return slots


def _types(target: str, n_head_kv: int = 8, has_imatrix: bool = False, **shape) -> dict[str, str | None]:
    slots = _llama_slots(**shape)
    model = ModelShape("llama", LAYERS, 8, n_head_kv, has_output=not shape.get("tied", False), has_imatrix=has_imatrix)
    return {s.gguf_name: t for s, t in zip(slots, tensor_types(slots, model, target), strict=True)}


def _per_layer(types: dict, part: str) -> list[str]:
    return [types[f"blk.{i}.{part}.weight"] for i in range(LAYERS)]


def test_q4_k_m_gives_attn_v_and_ffn_down_of_some_layers_q6_k() -> None:
    types = _types("q4_k_m")
    high = ["q6_k" if i in MORE_BITS else "q4_k" for i in range(LAYERS)]
    assert _per_layer(types, "attn_v") == high and _per_layer(types, "ffn_down") == high
    assert set(_per_layer(types, "attn_q") + _per_layer(types, "ffn_up") + _per_layer(types, "attn_output")) == {"q4_k"}
    assert types["output.weight"] == "q6_k" and types["token_embd.weight"] == "q4_k"
    assert types["blk.0.attn_norm.weight"] is None  # norms stay float


def test_the_other_mixes() -> None:
    q4_k_s = _types("q4_k_s")
    assert _per_layer(q4_k_s, "attn_v") == ["q5_k"] * 4 + ["q4_k"] * 4
    assert _per_layer(q4_k_s, "ffn_down") == ["q5_k"] + ["q4_k"] * 7
    q3_k_m = _types("q3_k_m")
    assert _per_layer(q3_k_m, "attn_v") == ["q5_k"] * 2 + ["q4_k"] * 6
    assert set(_per_layer(q3_k_m, "ffn_down")) == {"q4_k"} and set(_per_layer(q3_k_m, "attn_output")) == {"q4_k"}
    assert set(_per_layer(q3_k_m, "attn_q")) == {"q3_k"}
    assert set(_per_layer(_types("q3_k_l"), "attn_v")) == {"q5_k"}
    q2_k = _types("q2_k")  # n_gqa 1 -> attn_v q3_k; with 4 query heads per KV head, q4_k
    assert set(_per_layer(q2_k, "attn_v")) == {"q3_k"} and set(_per_layer(q2_k, "ffn_down")) == {"q3_k"}
    assert set(_per_layer(_types("q2_k", n_head_kv=2), "attn_v")) == {"q4_k"}
    assert _per_layer(_types("q5_k_m"), "ffn_down") == ["q6_k" if i in MORE_BITS else "q5_k" for i in range(LAYERS)]
    assert set(_types("q6_k").values()) == {"q6_k", None}


@pytest.mark.parametrize("target, output", [("q4_0", "q6_k"), ("q5_1", "q6_k"), ("q8_0", "q8_0"), ("q4_k_m", "q6_k")])
def test_output_and_tied_embedding_types(target: str, output: str) -> None:
    assert _types(target)["output.weight"] == output
    tied = _types(target, tied=True)
    assert tied["token_embd.weight"] == output and "output.weight" not in tied


def test_rows_that_do_not_split_into_blocks_fall_back() -> None:
    """Q4_K -> Q5_0 when rows split into 32 but not 256; F16 when not even into 32 (llama.cpp's fallback)."""
    types = _types("q4_k_m", hidden=512, ffn=96)
    assert _per_layer(types, "ffn_down") == ["q8_0" if i in MORE_BITS else "q5_0" for i in range(LAYERS)]
    types = _types("q4_k_m", hidden=520, ffn=1024)  # 520 = 16 * 32 + 8
    assert types["blk.1.attn_q.weight"] == "f16" and types["output.weight"] == "f16"


def test_an_importance_matrix_guards_the_first_ffn_down_of_q4_0_and_q5_0() -> None:
    assert _per_layer(_types("q4_0", has_imatrix=True), "ffn_down") == ["q4_1"] + ["q4_0"] * 7
    assert _per_layer(_types("q5_0", has_imatrix=True), "ffn_down") == ["q5_1"] + ["q5_0"] * 7
    assert set(_per_layer(_types("q4_0"), "ffn_down")) == {"q4_0"}


def test_every_target_has_a_file_type() -> None:
    assert {"q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k", "q4_k_s", "q5_k_s"} <= set(TARGET_TYPES)
