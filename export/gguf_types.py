"""Which ggml type each tensor of a GGUF file gets for a `--type`, by llama.cpp's rules.

This follows llama-quant.cpp (`llama_tensor_get_type`, `tensor_type_fallback`), so a kilnlm file has the same
tensor-type table as llama-quantize's for the same model and type: the K-quant mixes give attn_v and ffn_down
of some layers more bits (`use_more_bits`: the first and last eighth of the layers and every third in
between), the output projection (or the tied embedding that doubles as it) gets Q6_K, and a tensor whose rows
do not split into its type's blocks falls back to a type with smaller blocks (Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0), then to F16. Rules for types kilnlm does not write (IQ*, TQ*, MXFP4) and for
mixture-of-experts models are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import LlamaFileType

# --type -> (the ggml type most 2-D weights get, GGUF general.file_type)
TARGET_TYPES = {
    "f32": ("f32", LlamaFileType.ALL_F32),
    "f16": ("f16", LlamaFileType.MOSTLY_F16),
    "bf16": ("bf16", LlamaFileType.MOSTLY_BF16),
    "q8_0": ("q8_0", LlamaFileType.MOSTLY_Q8_0),
    "q4_0": ("q4_0", LlamaFileType.MOSTLY_Q4_0),
    "q4_1": ("q4_1", LlamaFileType.MOSTLY_Q4_1),
    "q5_0": ("q5_0", LlamaFileType.MOSTLY_Q5_0),
    "q5_1": ("q5_1", LlamaFileType.MOSTLY_Q5_1),
    "q2_k": ("q2_k", LlamaFileType.MOSTLY_Q2_K),
    "q3_k_s": ("q3_k", LlamaFileType.MOSTLY_Q3_K_S),
    "q3_k_m": ("q3_k", LlamaFileType.MOSTLY_Q3_K_M),
    "q3_k_l": ("q3_k", LlamaFileType.MOSTLY_Q3_K_L),
    "q4_k_s": ("q4_k", LlamaFileType.MOSTLY_Q4_K_S),
    "q4_k_m": ("q4_k", LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_s": ("q5_k", LlamaFileType.MOSTLY_Q5_K_S),
    "q5_k_m": ("q5_k", LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": ("q6_k", LlamaFileType.MOSTLY_Q6_K),
}
_FLOAT_TYPES = ("f32", "f16", "bf16")
_BLOCK = {"q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32,
          "q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256}
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


@dataclass(frozen=True)
class TensorSlot:
    """What the rules read of one tensor: its GGUF name, its dimensions, its row length (ggml's ne[0])."""

    gguf_name: str
    dims: int
    row: int


@dataclass(frozen=True)
class ModelShape:
    """What the rules read of the model."""

    architecture: str  # the GGUF architecture
    n_layer: int
    n_head: int
    n_head_kv: int
    has_output: bool  # an output.weight of its own (not tied to the embedding)
    has_imatrix: bool = False


def tensor_types(slots: list[TensorSlot], model: ModelShape, target: str) -> list[str]:
    """The ggml type name (kilnlm format name) of every tensor, in order, for `target` (a TARGET_TYPES key).
    Tensors llama.cpp never quantizes (1-D, norms, Mamba's conv1d and A) get None: the caller keeps them
    in the source's float type."""
    default = TARGET_TYPES[target][0]
    state = _Counters(n_attention_wv=sum(_category(s.gguf_name) == "attn_v" for s in slots))
    return [_tensor_type(slot, model, target, default, state) for slot in slots]


def quantized_order(gguf_name: str) -> tuple[int, str]:
    """llama-quantize's tensor order (its loader's weight_name_comparer): the tensors outside blocks first, then
    block by block, by name within each."""
    match = re.match(r"blk\.(\d+)\.", gguf_name)
    return (int(match.group(1)) if match else -1, gguf_name)


def quantizable(slot: TensorSlot) -> bool:
    """llama.cpp's tensor_allows_quantization for the tensors kilnlm writes."""
    name = slot.gguf_name
    return (slot.dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ssm_conv1d" not in name)


@dataclass
class _Counters:
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part, category in (("attn_qkv.weight", "attn_v"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                           ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"),
                           ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if part in name:
            return category
    return "other"


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _tensor_type(slot: TensorSlot, model: ModelShape, target: str, default: str, state: _Counters) -> str | None:
    if not quantizable(slot):
        return None
    if default in _FLOAT_TYPES:
        return default
    category = _category(slot.gguf_name)
    if category == "output" or (category == "token_embd" and not model.has_output):
        kind = "q8_0" if slot.row % _BLOCK[default] else default if default == "q8_0" else "q6_k"
    elif category == "attn_v":
        kind = _attn_v_type(model, target, default, state)
        state.i_attention_wv += 1
    elif category == "ffn_down":
        kind = _ffn_down_type(model, target, default, state.i_ffn_down)
        state.i_ffn_down += 1
    elif category == "attn_output":
        kind = {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(target, default)
    else:
        kind = default
    return _fallback(kind, slot.row)


def _attn_v_type(model: ModelShape, target: str, default: str, state: _Counters) -> str:
    gqa = model.n_head // max(model.n_head_kv, 1)
    i, n = state.i_attention_wv, state.n_attention_wv
    kind = default
    if target == "q2_k":
        kind = "q4_k" if gqa >= 4 else "q3_k"
    elif target == "q3_k_m":
        kind = "q5_k" if i < 2 else "q4_k"
    elif target == "q3_k_l":
        kind = "q5_k"
    elif target in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
        kind = "q6_k"
    elif target == "q4_k_s" and i < 4:
        kind = "q5_k"
    # llama.cpp's 70B type (Llama, 80 layers, grouped KV heads): attn_v is 8x smaller, so it gets more bits.
    if model.architecture == "llama" and model.n_layer == 80 and model.n_head != model.n_head_kv \
            and kind in ("q3_k", "q4_k"):
        kind = "q5_k"
    return kind


def _ffn_down_type(model: ModelShape, target: str, default: str, i: int) -> str:
    n = model.n_layer
    if target == "q2_k":
        return "q3_k"
    if target == "q3_k_m":
        return "q5_k" if i < n // 16 else "q4_k"
    if target == "q3_k_l":
        return "q5_k"
    if target in ("q4_k_m", "q5_k_m"):
        return "q6_k" if _use_more_bits(i, n) else default
    if target == "q4_k_s":
        return "q5_k" if i < n // 8 else default
    if target in ("q4_0", "q5_0") and model.has_imatrix and i < n // 8:
        return "q4_1" if target == "q4_0" else "q5_1"
    return default


def _fallback(kind: str, row: int) -> str:
    """tensor_type_fallback: a type with smaller blocks when the rows do not split into this one's, then F16."""
    if row % _BLOCK[kind] == 0:
        return kind
    kind = _FALLBACK.get(kind, kind)
    return kind if row % _BLOCK[kind] == 0 else "f16"
