"""ONNX export of the Llama family in the layout onnxruntime-genai's model builder writes (first slice: float weights).

The graph uses onnxruntime's decoder ops as the builder does: `SkipSimplifiedLayerNormalization` fuses each
residual add with the next RMSNorm, `GroupQueryAttention` holds the KV cache (past/present in BNSH) and applies
RoPE itself from cos/sin caches (llama3 / yarn / linear scaling baked in), seqlens_k comes from the attention
mask. Weights are MatMul initializers in (in, out) layout, stored in one external-data file next to
`model.onnx`; `genai_config.json` describes the inputs and outputs for onnxruntime-genai.

Not yet here (see the ONNX issue): MatMulNBits for Q4_0/Q4_1/Q8_0 and LLM.int8 weights, the separate
RotaryEmbedding path for head sizes that are not a multiple of 16, tokenizer.json for SentencePiece models,
and the runtime path that runs a folder through onnxruntime behind Engine.
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
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.rope import RotaryEmbedding

ONNX_TYPES = {"f32": (np.float32, 1), "f16": (np.float16, 10)}  # --type -> (numpy dtype, onnx TensorProto type)
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
    if config.head_dim % 16:
        raise UnsupportedModelError(
            f"head size {config.head_dim} is not a multiple of 16, which GroupQueryAttention's fused RoPE needs; "
            "the separate RotaryEmbedding path is not written yet")
    if config.sliding_window_layers:
        raise UnsupportedModelError("per-layer sliding windows are not expressed in the ONNX graph yet")


class _Graph:
    """Nodes, initializers and value names of the graph being built."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
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

    def matmul(self, x: str, weight: torch.Tensor, name: str, bias: torch.Tensor | None = None) -> str:
        """x @ W^T (+ b) with W in torch's (out, in) layout, stored as the (in, out) initializer MatMul wants."""
        out = self.node("MatMul", [x, self.weight(name, weight.t().numpy().astype(self.dtype))], [f"{name}/out"])[0]
        if bias is not None:
            out = self.node("Add", [out, self.weight(f"{name}.bias", bias.numpy().astype(self.dtype))],
                            [f"{name}/biased"])[0]
        return out


def _rope_caches(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin caches (positions, head_dim / 2) with the model's rope scaling and attention factor baked in."""
    cos, sin = RotaryEmbedding(config)(0, config.max_position_embeddings)
    half = config.head_dim // 2
    return cos[:, :half].numpy(), sin[:, :half].numpy()


def _build_graph(checkpoint, target: str):
    """The onnx ModelProto of a Llama-family checkpoint with float weights of `target`."""
    from onnx import TensorProto, helper

    config: ModelConfig = checkpoint.config
    dtype, onnx_type = ONNX_TYPES[target]
    g = _Graph(dtype)
    tensor = checkpoint.tensor
    eps = config.rms_norm_eps
    batch, seq, past, total = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total])]
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

    embed = tensor("embed_tokens.weight")
    x = g.node("Gather", [g.weight("embed_tokens.weight", embed.numpy().astype(dtype)), "input_ids"], ["embeddings"])[0]
    residual = None
    for i in range(config.num_layers):
        p = f"layers.{i}."
        normed, residual = _norm(g, x, residual, tensor(p + "input_layernorm.weight"), eps, f"{p}input_layernorm")
        attn = _attention(g, config, normed, tensor, p, i, inputs, outputs, kv_shape, present_shape, onnx_type)
        normed, residual = _norm(g, attn, residual, tensor(p + "post_attention_layernorm.weight"), eps,
                                 f"{p}post_attention_layernorm")
        gate = g.matmul(normed, tensor(p + "mlp.gate_proj.weight"), p + "mlp.gate_proj")
        up = g.matmul(normed, tensor(p + "mlp.up_proj.weight"), p + "mlp.up_proj")
        g.node("Sigmoid", [gate], [f"{p}mlp/sigmoid"])
        g.node("Mul", [gate, f"{p}mlp/sigmoid"], [f"{p}mlp/silu"])
        g.node("Mul", [f"{p}mlp/silu", up], [f"{p}mlp/act"])
        x = g.matmul(f"{p}mlp/act", tensor(p + "mlp.down_proj.weight"), p + "mlp.down_proj")
    normed, _ = _norm(g, x, residual, tensor("norm.weight"), eps, "norm")
    head = embed if config.tie_word_embeddings else tensor("lm_head.weight")
    logits = g.matmul(normed, head, "lm_head")
    g.node("Identity", [logits], ["logits"])
    graph = helper.make_graph(g.nodes, "kilnlm", inputs, outputs, g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             producer_name="kilnlm")


def _norm(g: _Graph, x: str, residual: str | None, weight: torch.Tensor, eps: float, name: str) -> tuple[str, str]:
    """RMSNorm of x (+ the residual stream, fused as the builder does); returns (normed, new residual stream)."""
    w = g.weight(f"{name}.weight", weight.numpy().astype(g.dtype))
    if residual is None:
        return g.node("SimplifiedLayerNormalization", [x, w], [f"{name}/out"], axis=-1, epsilon=eps,
                      stash_type=1)[0], x
    out = g.node("SkipSimplifiedLayerNormalization", [residual, x, w],
                 [f"{name}/out", "", "", f"{name}/residual"], domain="com.microsoft", epsilon=eps)
    return out[0], out[3]


def _attention(g: _Graph, config: ModelConfig, x: str, tensor, p: str, layer: int, inputs: list, outputs: list,
               kv_shape: list, present_shape: list, onnx_type: int) -> str:
    """q/k/v projections, GroupQueryAttention with its past/present KV and fused RoPE, output projection."""
    from onnx import helper

    def bias(name: str) -> torch.Tensor | None:
        return tensor(f"{p}self_attn.{name}.bias") if config.attention_bias else None

    q = g.matmul(x, tensor(p + "self_attn.q_proj.weight"), p + "self_attn.q_proj", bias("q_proj"))
    k = g.matmul(x, tensor(p + "self_attn.k_proj.weight"), p + "self_attn.k_proj", bias("k_proj"))
    v = g.matmul(x, tensor(p + "self_attn.v_proj.weight"), p + "self_attn.v_proj", bias("v_proj"))
    past_k, past_v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
    present_k, present_v = f"present.{layer}.key", f"present.{layer}.value"
    inputs += [helper.make_tensor_value_info(past_k, onnx_type, kv_shape),
               helper.make_tensor_value_info(past_v, onnx_type, kv_shape)]
    outputs += [helper.make_tensor_value_info(present_k, onnx_type, present_shape),
                helper.make_tensor_value_info(present_v, onnx_type, present_shape)]
    window = config.window_for_layer(layer)
    attrs = dict(num_heads=config.num_heads, kv_num_heads=config.num_kv_heads, do_rotary=1, rotary_interleaved=0,
                 local_window_size=-1 if window is None else window)
    out = g.node("GroupQueryAttention",
                 [q, k, v, past_k, past_v, "seqlens_k", "total_seq_len", "cos_cache", "sin_cache"],
                 [f"{p}attn/out", present_k, present_v], domain="com.microsoft", **attrs)[0]
    return g.matmul(out, tensor(p + "self_attn.o_proj.weight"), p + "self_attn.o_proj")


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


def write_onnx(checkpoint, out_dir: str | Path, target: str = "f32", *, ep: str = "cpu",
               source_folder: Path | None = None, context_length: int | None = None) -> OnnxSummary:
    """Write `checkpoint` as an onnxruntime-genai folder of float `target` weights for execution provider `ep`,
    atomically (a temporary folder renamed at the end). `source_folder` (an HF folder) supplies tokenizer files
    to copy; `context_length` is genai's context and search length (default: the model's)."""
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
        model = _build_graph(checkpoint, target)
        onnx.save_model(model, tmp / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE)  # small tensors (axes, indices) stay inline for shape inference
        context = context_length or config.max_position_embeddings
        settings = genai_config(config, checkpoint.tokenizer(), context, ep)
        (tmp / "genai_config.json").write_text(json.dumps(settings, indent=4) + "\n", encoding="utf-8")
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
            if source_folder is not None and (source_folder / name).is_file():
                shutil.copyfile(source_folder / name, tmp / name)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    return OnnxSummary(out_dir, size, time.perf_counter() - started)
