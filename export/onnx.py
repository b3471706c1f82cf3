"""ONNX export of the Llama family in the layout onnxruntime-genai's model builder writes.

The graph uses onnxruntime's decoder ops as the builder does: `SkipSimplifiedLayerNormalization` fuses each
residual add with the next RMSNorm, `GroupQueryAttention` holds the KV cache (past/present in BNSH) and applies
RoPE itself from cos/sin caches (llama3 / yarn / linear scaling baked in), seqlens_k comes from the attention
mask. Weights are MatMul initializers in (in, out) layout, stored in one external-data file next to
`model.onnx`; `genai_config.json` describes the inputs and outputs for onnxruntime-genai.

Quantized linears keep their exact values in `MatMulNBits` (com.microsoft):
- Q4_0: bits 4, block 32, default zero point 8, scale d. ggml keeps element j in the low nibble of byte j and
  j + 16 in the high one; MatMulNBits wants elements 2i / 2i+1 in byte i's low / high nibble, so codes are
  repacked (not re-rounded).
- Q8_0: bits 8, codes XOR 0x80 against the default zero point 128, scale d.
- Q4_1 (d * q + m): bits 4 with zero point 0 for d * q, plus m times each block's sum of the activations,
  computed by a small MatMul, as ggml computes it. A float zero point -m / d is not exact in general.
- LLM.int8: bits 8 with each row's scale in every block, outlier columns zero in the codes; the fp16 outlier
  columns are a Gather of the activation columns and a small MatMul, added. The activations stay float (the
  kilnlm runtime quantizes them to int8 per token), so the two agree as float x dequantized weights.
Q4_0 / Q8_0 token embeddings are read by `GatherBlockQuantized` from the same repacked blocks (exact); Q4_1
and float ones by a float Gather.

RoPE is fused into GroupQueryAttention when the head size is a multiple of 16 (what onnxruntime's fused
rotary accepts); otherwise q and k go through separate `RotaryEmbedding` nodes fed by a `position_ids` input.

The folder's tokenizer.json (which onnxruntime-genai needs) is the source's own, or written for SentencePiece
models (export/tokenizer_json.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kilnlm.errors import CheckpointError, UnsupportedModelError
from kilnlm.quant.formats import QuantizedTensor, get_format
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.rope import RotaryEmbedding

FLOAT_TYPES = {"f32": (np.float32, 1), "f16": (np.float16, 10)}  # -> (numpy dtype, onnx TensorProto type)
NBITS_TYPES = ("q8_0", "q4_0", "q4_1")  # block formats MatMulNBits holds exactly
ONNX_TYPES = (*FLOAT_TYPES, *NBITS_TYPES)
ONNX_FAMILIES = ("llama", "mistral", "qwen2")
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
OPSET = 21


@dataclass
class OnnxSummary:
    """What write_onnx produced."""

    folder: Path
    bytes: int
    seconds: float


def check_exportable(config: ModelConfig) -> None:
    """Refuse, before writing anything, a model this exporter cannot express in onnxruntime's ops."""
    if config.architecture not in ONNX_FAMILIES:
        raise UnsupportedModelError(
            f"ONNX export supports {', '.join(ONNX_FAMILIES)} for now, not {config.architecture!r} "
            "(onnxruntime-genai has no recurrent-state decoder for Mamba models)")
    if config.sliding_window_layers:
        raise UnsupportedModelError("per-layer sliding windows are not expressed in the ONNX graph yet")


class _Graph:
    """Nodes, initializers and value names of the graph being built, with activations of one float dtype."""

    def __init__(self, dtype: np.dtype, accuracy_level: int):
        self.dtype = dtype
        self.accuracy_level = accuracy_level
        self.nodes: list = []
        self.initializers: list = []

    def weight(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], *, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"/{op}_{len(self.nodes)}", domain=domain, **attrs))
        return outputs

    def linear(self, x: str, weight, name: str, bias: torch.Tensor | None = None) -> str:
        """x @ W^T (+ b) for W (out, in) as a float tensor, a Q4_0 / Q4_1 / Q8_0 QuantizedTensor or an Int8Weight."""
        if isinstance(weight, QuantizedTensor):
            out = self._nbits(x, weight, name)
        elif isinstance(weight, torch.Tensor):
            w = self.weight(name, weight.t().numpy().astype(self.dtype))  # MatMul wants (in, out)
            out = self.node("MatMul", [x, w], [f"{name}/out"])[0]
        else:
            out = self._llm_int8(x, weight, name)
        if bias is not None:
            out = self.node("Add", [out, self.weight(f"{name}.bias", bias.numpy().astype(self.dtype))],
                            [f"{name}/biased"])[0]
        return out

    def _matmul_nbits(self, x: str, name: str, codes: np.ndarray, scales: np.ndarray, bits: int, block: int,
                      zero_points: np.ndarray | None = None, columns: int | None = None) -> str:
        rows, blocks, _ = codes.shape
        inputs = [x, self.weight(f"{name}.qweight", codes), self.weight(f"{name}.scales", scales.astype(self.dtype))]
        if zero_points is not None:
            inputs.append(self.weight(f"{name}.zero_points", zero_points))
        return self.node("MatMulNBits", inputs, [f"{name}/out"], domain="com.microsoft", K=columns or blocks * block,
                         N=rows,
                         bits=bits, block_size=block, accuracy_level=self.accuracy_level)[0]

    def _nbits(self, x: str, weight: QuantizedTensor, name: str) -> str:
        rows, cols = weight.shape
        blocks = weight.data.numpy().reshape(rows, cols // 32, weight.format.bytes_per_block)  # (N, nb, bytes)
        d = _fp16_field(blocks, 0)  # (N, nb) exact in fp16 and fp32
        if weight.format.name == "q8_0":
            return self._matmul_nbits(x, name, blocks[..., 2:] ^ 0x80, d, 8, 32)
        if weight.format.name == "q4_0":
            return self._matmul_nbits(x, name, _nbits_nibbles(blocks[..., 2:]), d, 4, 32)
        # q4_1: d * q with zero point 0 (two 4-bit zero points per byte), then m x each block's activation sum.
        zero_points = np.zeros(rows * (-(-blocks.shape[1] // 2)), np.uint8)
        scaled = self._matmul_nbits(x, name, _nbits_nibbles(blocks[..., 4:]), d, 4, 32, zero_points)
        # x (..., K) -> (..., K / 32, 32), whatever x's rank: its shape without the last axis, then the blocks.
        lead = self.node("Shape", [x], [f"{name}/x_shape"], end=-1)[0]
        blocks_shape = self.weight(f"{name}.block_shape", np.array([cols // 32, 32], np.int64))
        shape = self.node("Concat", [lead, blocks_shape], [f"{name}/blocks_shape"], axis=0)[0]
        grouped = self.node("Reshape", [x, shape], [f"{name}/blocks"])[0]
        sums = self.node("ReduceSum", [grouped, self.weight(f"{name}.last_axis", np.array([-1], np.int64))],
                         [f"{name}/block_sums"], keepdims=0)[0]
        mins = self.weight(f"{name}.mins", _fp16_field(blocks, 2).T.astype(self.dtype))  # (nb, N)
        offset = self.node("MatMul", [sums, mins], [f"{name}/min_part"])[0]
        return self.node("Add", [scaled, offset], [f"{name}/sum"])[0]

    def _llm_int8(self, x: str, weight, name: str) -> str:
        if self.dtype != np.float32:
            raise UnsupportedModelError(f"{name}: LLM.int8 row scales are float32 and would be rounded in an fp16 "
                                        "graph; export with --type f32 --ep cpu")
        codes = weight.weight_int8.numpy()  # (N, K) int8, outlier columns 0
        rows, cols = codes.shape
        block = 32
        blocks = -(-cols // block)  # MatMulNBits pads the last block of a row; padded codes are 0
        padded = np.zeros((rows, blocks * block), np.int8)
        padded[:, :cols] = codes
        scales = np.repeat(weight.row_scale.numpy()[:, None], blocks, axis=1)  # each row's scale in every block
        main = self._matmul_nbits(x, name, padded.view(np.uint8).reshape(rows, blocks, block) ^ 0x80, scales, 8,
                                  block, columns=cols)
        if weight.outlier_idx.numel() == 0:
            return main
        idx = self.weight(f"{name}.outlier_idx", weight.outlier_idx.numpy().astype(np.int64))
        picked = self.node("Gather", [x, idx], [f"{name}/outlier_x"], axis=-1)[0]
        columns = self.weight(f"{name}.outlier_weight", weight.outlier_weight.float().numpy().T.astype(self.dtype))
        extra = self.node("MatMul", [picked, columns], [f"{name}/outlier_out"])[0]
        return self.node("Add", [main, extra], [f"{name}/sum"])[0]


def _fp16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte `offset` of every ggml block (..., bytes), as float32."""
    return np.ascontiguousarray(blocks[..., offset : offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nbits_nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit codes (element j low, j + 16 high nibble of byte j) in MatMulNBits' order (2i low, 2i+1 high)."""
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (..., 32) elements in order
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _rope_caches(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin caches (positions, head_dim / 2) with the model's rope scaling and attention factor baked in."""
    cos, sin = RotaryEmbedding(config)(0, config.max_position_embeddings)
    half = config.head_dim // 2
    return cos[:, :half].numpy(), sin[:, :half].numpy()


def _weights(checkpoint, target: str):
    """name -> the weight to export: LLM.int8 and Q4_0 / Q4_1 / Q8_0 linears as stored (exact), float ones as
    floats, or, for a block `target`, rounded to it by llama.cpp's rules (output Q8_0 for 4-bit, F16 fallback)."""
    from kilnlm.export.gguf import tensor_formats

    int8_weight = getattr(checkpoint, "int8_weight", None)
    packed = getattr(checkpoint, "packed", None)
    formats = tensor_formats(checkpoint.config, target) if target in NBITS_TYPES else {}

    def weight(name: str):
        if int8_weight is not None and (stored := int8_weight(name)) is not None:
            return stored
        if packed is not None and checkpoint.tensor_format(name).name in NBITS_TYPES:  # block types: matrices only
            return packed(name)
        tensor = checkpoint.tensor(name)
        if (fmt := formats.get(name)) is not None:
            if fmt.name == "q6_k":  # llama.cpp's output type; MatMulNBits has no 6-bit form, so 8 bits
                fmt = get_format("q8_0")
            if fmt.name in NBITS_TYPES:
                return QuantizedTensor.from_float(tensor, fmt)
        return tensor

    return weight


def fused_rope(config: ModelConfig) -> bool:
    """Whether GroupQueryAttention applies RoPE itself (onnxruntime's fused rotary wants head sizes of 16k)."""
    return config.head_dim % 16 == 0


def activation_type(target: str, ep: str) -> str:
    """The graph's float type: the target's for f32 / f16, else fp32 on the CPU and fp16 on CUDA (the builder's)."""
    if target in FLOAT_TYPES:
        return target
    return "f16" if ep == "cuda" else "f32"


def _build_graph(checkpoint, target: str, ep: str, accuracy_level: int):
    """The onnx ModelProto of a Llama-family checkpoint with `target` weights."""
    from onnx import TensorProto, helper

    config: ModelConfig = checkpoint.config
    dtype, onnx_type = FLOAT_TYPES[activation_type(target, ep)]
    g = _Graph(dtype, accuracy_level)
    tensor, weight = checkpoint.tensor, _weights(checkpoint, target)
    eps = config.rms_norm_eps
    batch, seq, past, total = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total])]
    if not fused_rope(config):
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, seq]))
    outputs = [helper.make_tensor_value_info("logits", onnx_type, [batch, seq, config.vocab_size])]
    kv_shape = [batch, config.num_kv_heads, past, config.head_dim]
    present_shape = [batch, config.num_kv_heads, total, config.head_dim]

    # seqlens_k is the index of each sequence's last token; total_sequence_length the mask's width.
    g.node("ReduceSum", ["attention_mask", g.weight("one_axis", np.array([1], np.int64))], ["mask_sum"], keepdims=0)
    g.node("Sub", ["mask_sum", g.weight("one_i64", np.array(1, np.int64))], ["seqlens_k_i64"])
    g.node("Cast", ["seqlens_k_i64"], ["seqlens_k"], to=TensorProto.INT32)
    g.node("Shape", ["attention_mask"], ["mask_shape"])
    g.node("Gather", ["mask_shape", g.weight("one_index", np.array(1, np.int64))], ["total_i64"], axis=0)
    g.node("Cast", ["total_i64"], ["total_seq_len"], to=TensorProto.INT32)
    cos, sin = _rope_caches(config)
    g.weight("cos_cache", cos.astype(dtype))
    g.weight("sin_cache", sin.astype(dtype))

    embedding = weight("embed_tokens.weight")  # prepared once: a tied model's head is the same matrix
    x = _embed(g, embedding)
    residual = None
    for i in range(config.num_layers):
        p = f"layers.{i}."
        normed, residual = _norm(g, x, residual, tensor(p + "input_layernorm.weight"), eps, f"{p}input_layernorm")
        attn = _attention(g, config, normed, tensor, weight, p, i, inputs, outputs, kv_shape, present_shape,
                          onnx_type)
        normed, residual = _norm(g, attn, residual, tensor(p + "post_attention_layernorm.weight"), eps,
                                 f"{p}post_attention_layernorm")
        gate = g.linear(normed, weight(p + "mlp.gate_proj.weight"), p + "mlp.gate_proj")
        up = g.linear(normed, weight(p + "mlp.up_proj.weight"), p + "mlp.up_proj")
        g.node("Sigmoid", [gate], [f"{p}mlp/sigmoid"])
        g.node("Mul", [gate, f"{p}mlp/sigmoid"], [f"{p}mlp/silu"])
        g.node("Mul", [f"{p}mlp/silu", up], [f"{p}mlp/act"])
        x = g.linear(f"{p}mlp/act", weight(p + "mlp.down_proj.weight"), p + "mlp.down_proj")
    normed, _ = _norm(g, x, residual, tensor("norm.weight"), eps, "norm")
    head = embedding if config.tie_word_embeddings else weight("lm_head.weight")
    g.node("Identity", [g.linear(normed, head, "lm_head")], ["logits"])
    graph = helper.make_graph(g.nodes, "kilnlm", inputs, outputs, g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             producer_name="kilnlm")


def _embed(g: _Graph, embedding) -> str:
    """Token embeddings of input_ids: GatherBlockQuantized from Q4_0 / Q8_0 rows (exact), else a float Gather
    (Q4_1's d * q + m has no exact zero point, so its rows are dequantized, exactly, to floats)."""
    if isinstance(embedding, QuantizedTensor) and embedding.format.name in ("q4_0", "q8_0"):
        rows, cols = embedding.shape
        blocks = embedding.data.numpy().reshape(rows, cols // 32, embedding.format.bytes_per_block)
        bits = 4 if embedding.format.name == "q4_0" else 8
        codes = _nbits_nibbles(blocks[..., 2:]) if bits == 4 else blocks[..., 2:] ^ 0x80
        data = g.weight("embed_tokens.qweight", codes.reshape(rows, -1))
        scales = g.weight("embed_tokens.scales", _fp16_field(blocks, 0).astype(g.dtype))
        return g.node("GatherBlockQuantized", [data, "input_ids", scales], ["embeddings"], domain="com.microsoft",
                      block_size=32, gather_axis=0, quantize_axis=1, bits=bits)[0]
    if isinstance(embedding, QuantizedTensor):
        embedding = embedding.dequantize()
    table = g.weight("embed_tokens.weight", embedding.numpy().astype(g.dtype))
    return g.node("Gather", [table, "input_ids"], ["embeddings"])[0]


def _norm(g: _Graph, x: str, residual: str | None, weight: torch.Tensor, eps: float, name: str) -> tuple[str, str]:
    """RMSNorm of x (+ the residual stream, fused as the builder does); returns (normed, new residual stream)."""
    w = g.weight(f"{name}.weight", weight.numpy().astype(g.dtype))
    if residual is None:
        return g.node("SimplifiedLayerNormalization", [x, w], [f"{name}/out"], axis=-1, epsilon=eps,
                      stash_type=1)[0], x
    out = g.node("SkipSimplifiedLayerNormalization", [residual, x, w],
                 [f"{name}/out", "", "", f"{name}/residual"], domain="com.microsoft", epsilon=eps)
    return out[0], out[3]


def _attention(g: _Graph, config: ModelConfig, x: str, tensor, weight, p: str, layer: int, inputs: list,
               outputs: list, kv_shape: list, present_shape: list, onnx_type: int) -> str:
    """q/k/v projections, GroupQueryAttention with its past/present KV and fused RoPE, output projection."""
    from onnx import helper

    def bias(name: str) -> torch.Tensor | None:
        return tensor(f"{p}self_attn.{name}.bias") if config.attention_bias else None

    q = g.linear(x, weight(p + "self_attn.q_proj.weight"), p + "self_attn.q_proj", bias("q_proj"))
    k = g.linear(x, weight(p + "self_attn.k_proj.weight"), p + "self_attn.k_proj", bias("k_proj"))
    v = g.linear(x, weight(p + "self_attn.v_proj.weight"), p + "self_attn.v_proj", bias("v_proj"))
    past_k, past_v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
    present_k, present_v = f"present.{layer}.key", f"present.{layer}.value"
    inputs += [helper.make_tensor_value_info(past_k, onnx_type, kv_shape),
               helper.make_tensor_value_info(past_v, onnx_type, kv_shape)]
    outputs += [helper.make_tensor_value_info(present_k, onnx_type, present_shape),
                helper.make_tensor_value_info(present_v, onnx_type, present_shape)]
    window = config.window_for_layer(layer)
    attrs = dict(num_heads=config.num_heads, kv_num_heads=config.num_kv_heads, rotary_interleaved=0,
                 local_window_size=-1 if window is None else window)
    rope_inputs = ["cos_cache", "sin_cache"]
    if not fused_rope(config):  # rotate q and k first; GroupQueryAttention then only attends
        q, k = (g.node("RotaryEmbedding", [t, "position_ids", "cos_cache", "sin_cache"], [f"{t}/rotated"],
                       domain="com.microsoft", interleaved=0, num_heads=heads)[0]
                for t, heads in ((q, config.num_heads), (k, config.num_kv_heads)))
        rope_inputs = []
    out = g.node("GroupQueryAttention", [q, k, v, past_k, past_v, "seqlens_k", "total_seq_len", *rope_inputs],
                 [f"{p}attn/out", present_k, present_v], domain="com.microsoft",
                 do_rotary=int(fused_rope(config)), **attrs)[0]
    return g.linear(out, weight(p + "self_attn.o_proj.weight"), p + "self_attn.o_proj")


EXECUTION_PROVIDERS = {"cpu": [], "cuda": [{"cuda": {}}]}  # --ep -> genai_config's provider_options


def genai_config(config: ModelConfig, tokenizer, context_length: int, ep: str = "cpu") -> dict:
    """genai_config.json: what onnxruntime-genai needs to run the decoder and search."""
    eos = list(tokenizer.eos_ids)
    return {
        "model": {
            "bos_token_id": tokenizer.bos_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": EXECUTION_PROVIDERS[ep]},
                "filename": MODEL_FILE,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           **({} if fused_rope(config) else {"position_ids": "position_ids"}),
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": config.num_heads,
                "num_hidden_layers": config.num_layers,
                "num_key_value_heads": config.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": eos[0],
            "type": "qwen2" if config.architecture == "qwen2" else config.architecture,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def _write_tokenizer(tokenizer, folder: Path, source_folder: Path | None) -> None:
    """The tokenizer files onnxruntime-genai (tokenizer.json) and kilnlm (either file + tokenizer_config.json)
    read: an HF source's own files, plus a tokenizer.json written for SentencePiece models that have none."""
    from kilnlm.export.tokenizer_json import tokenizer_json

    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        if source_folder is not None and (source_folder / name).is_file():
            shutil.copyfile(source_folder / name, folder / name)
    if not (folder / "tokenizer.json").is_file():
        (folder / "tokenizer.json").write_text(tokenizer_json(tokenizer), encoding="utf-8")
    if not (folder / "tokenizer_config.json").is_file():  # a GGUF source: its special tokens and template
        pieces = tokenizer_pieces(tokenizer)
        settings = {"bos_token": pieces(tokenizer.bos_id), "eos_token": pieces(tokenizer.eos_ids[0] if
                                                                              tokenizer.eos_ids else None),
                    "add_bos_token": tokenizer.add_bos, "chat_template": tokenizer.chat_template,
                    "tokenizer_class": "LlamaTokenizerFast"}
        (folder / "tokenizer_config.json").write_text(
            json.dumps({k: v for k, v in settings.items() if v is not None}, indent=2) + "\n", encoding="utf-8")


def tokenizer_pieces(tokenizer):
    """id -> the token's text (None for None), from the tokenizer's GGUF-form vocabulary."""
    from kilnlm.runtime.gguf_vocab import gguf_vocab_from_tokenizer

    tokens = gguf_vocab_from_tokenizer(tokenizer).tokens
    return lambda token_id: None if token_id is None else tokens[token_id]


def write_onnx(checkpoint, out_dir: str | Path, target: str = "f32", *, ep: str = "cpu",
               accuracy_level: int | None = None, source_folder: Path | None = None,
               context_length: int | None = None) -> OnnxSummary:
    """Write `checkpoint` as an onnxruntime-genai folder for execution provider `ep`, atomically (a temporary
    folder renamed at the end).

    `target` (f32, f16, q8_0, q4_0, q4_1) is the type of weights the source stores as floats; Q4_0 / Q4_1 / Q8_0
    and LLM.int8 weights of a GGUF source keep their exact values whatever the target. `accuracy_level` is
    MatMulNBits' (0: the input's type, 1: fp32, 4: int8 activations; default: 4 on the CPU, 0 on CUDA, as
    onnxruntime-genai's builder). `source_folder` (an HF folder) supplies tokenizer files to copy;
    `context_length` is genai's context and search length (default: the model's)."""
    import onnx

    if target not in ONNX_TYPES:
        raise CheckpointError(f"ONNX export writes {', '.join(ONNX_TYPES)} for now, not {target!r}")
    if ep not in EXECUTION_PROVIDERS:
        raise CheckpointError(f"unknown execution provider {ep!r}; choose {', '.join(EXECUTION_PROVIDERS)}")
    config = checkpoint.config
    check_exportable(config)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir}: already exists; choose a new folder or remove it")
    if not out_dir.parent.is_dir():
        raise CheckpointError(f"{out_dir}: the folder {out_dir.parent} does not exist")
    started = time.perf_counter()
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    tmp.mkdir()
    try:
        level = accuracy_level if accuracy_level is not None else (4 if ep == "cpu" else 0)
        model = _build_graph(checkpoint, target, ep, level)
        onnx.save_model(model, tmp / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE)  # small tensors (axes, indices) stay inline for shape inference
        context = context_length or config.max_position_embeddings
        settings = genai_config(config, checkpoint.tokenizer(), context, ep)
        (tmp / "genai_config.json").write_text(json.dumps(settings, indent=4) + "\n", encoding="utf-8")
        _write_tokenizer(checkpoint.tokenizer(), tmp, source_folder)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    return OnnxSummary(out_dir, size, time.perf_counter() - started)
