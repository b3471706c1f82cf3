"""GGUF both ways for the Llama family, with llama.cpp's own names, metadata keys and conventions.

Reading: `GGUFCheckpoint` turns a GGUF file (ours or llama.cpp's) into a ModelConfig, float tensors under
kilnlm's parameter names, and a tokenizer. Writing: `write_gguf` streams any checkpoint into a GGUF file of
a target type, one tensor in memory at a time, to a temporary name that is renamed when complete.
The container parser is export/gguf_file.py; the block formats are quant/formats.py.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gguf
import numpy as np
import torch
from gguf import Keys, RopeScalingType

from kilnlm.errors import CheckpointError, KilnError, UnsupportedModelError
from kilnlm.export.gguf_file import GGUFFile
from kilnlm.export.gguf_types import TARGET_TYPES, ModelShape, TensorSlot, quantized_order, tensor_types
from kilnlm.quant.formats import QuantizedTensor, WeightFormat, format_for_gguf_type, get_format
from kilnlm.quant.rtn import RoundToNearest
from kilnlm.runtime.config import ModelConfig, RopeScaling, SSMConfig
from kilnlm.runtime.models import expected_shapes
from kilnlm.runtime.rope import rope_frequencies

GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2",  # kilnlm -> llama.cpp
                      "mamba": "mamba", "mamba2": "mamba2", "granitehybrid": "granitehybrid"}
QK_PERMUTED = ("llama", "granitehybrid")  # GGUF architectures whose q/k rows convert_hf_to_gguf permutes
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency divisors (Llama 3.1 rope scaling)

# kilnlm (HF-style) parameter names <-> llama.cpp tensor names, per GGUF architecture; {i} is the block index.
_COMMON_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LLAMA_NAMES = {
    **_COMMON_NAMES,
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
def _ssm_names(parent: str, version: int) -> dict[str, str]:
    """llama.cpp's names for a Mamba mixer held in attribute `parent` of each block (A and D have no suffix)."""
    names = {
        "in_proj.weight": "ssm_in.weight", "in_proj.bias": "ssm_in.bias", "conv1d.weight": "ssm_conv1d.weight",
        "conv1d.bias": "ssm_conv1d.bias", "A_log": "ssm_a", "D": "ssm_d", "out_proj.weight": "ssm_out.weight",
        "out_proj.bias": "ssm_out.bias",
    }
    if version == 1:
        names |= {"x_proj.weight": "ssm_x.weight", "dt_proj.weight": "ssm_dt.weight", "dt_proj.bias": "ssm_dt.bias"}
    else:
        names |= {"dt_bias": "ssm_dt.bias", "norm.weight": "ssm_norm.weight"}
    return {f"layers.{{i}}.{parent}.{ours}": f"blk.{{i}}.{theirs}" for ours, theirs in names.items()}


_MAMBA_BLOCK_NORM = {"layers.{i}.norm.weight": "blk.{i}.attn_norm.weight"}
_NAMES = {
    "llama": _LLAMA_NAMES,
    "qwen2": _LLAMA_NAMES,
    "mamba": {**_COMMON_NAMES, **_MAMBA_BLOCK_NORM, **_ssm_names("mixer", 1)},
    "mamba2": {**_COMMON_NAMES, **_MAMBA_BLOCK_NORM, **_ssm_names("mixer", 2)},
    "granitehybrid": {**_LLAMA_NAMES, **_ssm_names("mamba", 2)},
}


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_TO_GGUF = {arch: {_pattern(k): v for k, v in names.items()} for arch, names in _NAMES.items()}
_TO_KILN = {arch: {_pattern(v): k for k, v in names.items()} for arch, names in _NAMES.items()}


def _rename(name: str, table: dict[re.Pattern[str], str]) -> str | None:
    for pattern, template in table.items():
        match = pattern.match(name)
        if match:
            return template.replace("{i}", match.group(1)) if match.groups() else template
    return None


def gguf_name(name: str, arch: str = "llama") -> str:
    """llama.cpp's tensor name for a kilnlm parameter name in a GGUF file of architecture `arch`."""
    renamed = _rename(name, _TO_GGUF[arch])
    if renamed is None:
        raise KeyError(f"no GGUF name for parameter {name!r} of architecture {arch!r}")
    return renamed


def kiln_name(name: str, arch: str = "llama") -> str | None:
    """kilnlm's parameter name for a llama.cpp tensor name (None for tensors kilnlm does not use)."""
    return _rename(name, _TO_KILN[arch])


# Mamba tensors that llama.cpp stores in another form than HF: A as -exp(A_log) (so readers of llama.cpp's
# files must take the log, not apply exp again), the conv kernel squeezed to 2-D, and for Mamba-2 A and D as
# (heads, 1) and the gated norm's weight as (groups, inner / groups). All of them are stored F32.
_SSM_PARENTS = (".mixer.", ".mamba.")  # the attribute holding a block's Mamba mixer (Mamba files; hybrids)
ALWAYS_F32 = ("conv1d.weight", "A_log")


def _ssm_part(name: str) -> str | None:
    """The mixer parameter a name refers to ('A_log', 'conv1d.weight', ...), or None outside Mamba mixers."""
    for parent in _SSM_PARENTS:
        if parent in name:
            return name.split(parent, 1)[1]
    return None


def stored_shape(config: ModelConfig, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape (torch order) llama.cpp gives a kilnlm parameter of this shape."""
    part = _ssm_part(name)
    if part is None or config.ssm is None:
        return shape
    if part == "conv1d.weight":
        return (shape[0], shape[2])
    if config.ssm.version == 2 and part in ("A_log", "D"):
        return (shape[0], 1)
    if config.ssm.version == 2 and part == "norm.weight":
        return (config.ssm.n_groups, shape[0] // config.ssm.n_groups)
    return shape


def to_stored(config: ModelConfig, name: str, values: torch.Tensor) -> torch.Tensor:
    """A float parameter in llama.cpp's form (values and shape)."""
    if _ssm_part(name) == "A_log":
        values = -torch.exp(values.float())
    return values.reshape(stored_shape(config, name, tuple(values.shape)))


def from_stored(config: ModelConfig, name: str, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of to_stored: a tensor read from a GGUF file back in kilnlm's form of `shape`."""
    values = values.reshape(shape)
    if _ssm_part(name) == "A_log":
        values = torch.log(-values)
    return values


def permute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved rotary layout (what convert_hf_to_gguf does)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of permute_qk: llama.cpp's interleaved rows back to HF's layout."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _qk_heads(config: ModelConfig, name: str) -> int | None:
    """Heads to (un)permute `name` by, or None: only the `llama` GGUF architecture permutes q and k."""
    if GGUF_ARCHITECTURES[config.architecture] not in QK_PERMUTED or name.endswith("outlier_idx"):
        return None  # qwen2 is not permuted; outlier indices number columns, not rows
    if ".self_attn.q_proj." in name:
        return config.num_heads
    if ".self_attn.k_proj." in name:
        return config.num_kv_heads
    return None


# ------------------------------------------------------------------------------------------- reading


class _Metadata:
    """Typed access to `{arch}.*` keys with errors that name the file and the key."""

    def __init__(self, metadata: dict[str, Any], arch: str, source: str):
        self.metadata, self.arch, self.source = metadata, arch, source

    def get(self, key_template: str, kind: type, default: Any = None, required: bool = False) -> Any:
        key = key_template.format(arch=self.arch)
        value = self.metadata.get(key, default)
        if value is None and required:
            raise CheckpointError(f"{self.source}: required metadata key {key!r} is missing")
        if value is not None and not isinstance(value, (kind, int) if kind is float else kind):
            raise CheckpointError(f"{self.source}: metadata key {key!r} should be {kind.__name__}, got {value!r}")
        return kind(value) if value is not None else None


def _rope_from_gguf(meta: _Metadata, gguf_file: GGUFFile) -> RopeScaling:
    kind = meta.get(Keys.Rope.SCALING_TYPE, str, "none")
    factors = None
    if ROPE_FREQS in gguf_file.tensors:
        factors = tuple(format_for_gguf_type(gguf_file.tensors[ROPE_FREQS].ggml_type)
                        .dequantize(gguf_file.raw(ROPE_FREQS), gguf_file.tensors[ROPE_FREQS].shape).tolist())
    fields: dict[str, Any] = {"freq_factors": factors}
    if kind in ("linear", "yarn"):
        fields["factor"] = meta.get(Keys.Rope.SCALING_FACTOR, float, required=True)
    if kind == "yarn":
        fields["original_max_position_embeddings"] = meta.get(Keys.Rope.SCALING_ORIG_CTX_LEN, int)
        fields["beta_fast"] = meta.get(Keys.Rope.SCALING_YARN_BETA_FAST, float, 32.0)
        fields["beta_slow"] = meta.get(Keys.Rope.SCALING_YARN_BETA_SLOW, float, 1.0)
    elif kind not in ("none", "linear"):
        raise UnsupportedModelError(f"{meta.source}: rope scaling type {kind!r} is not supported (none, linear, yarn)")
    return RopeScaling(type="default" if kind == "none" else kind, **fields)


def _ssm_from_gguf(meta: _Metadata, gguf_file: GGUFFile) -> SSMConfig:
    """The Mamba mixer sizes of a `mamba` / `mamba2` file (llama.cpp's `{arch}.ssm.*` keys)."""
    version = 1 if meta.arch == "mamba" else 2
    return SSMConfig(
        version=version,
        inner_size=meta.get(Keys.SSM.INNER_SIZE, int, required=True),
        state_size=meta.get(Keys.SSM.STATE_SIZE, int, required=True),
        conv_kernel=meta.get(Keys.SSM.CONV_KERNEL, int, required=True),
        time_step_rank=meta.get(Keys.SSM.TIME_STEP_RANK, int, required=True),
        n_groups=meta.get(Keys.SSM.GROUP_COUNT, int, 1) if version == 2 else 1,
        dt_b_c_rms=bool(meta.get(Keys.SSM.DT_B_C_RMS, bool, False)),
        # llama.cpp normalises dt, B and C with the model's RMS eps (Falcon-Mamba's HF config says 1e-6).
        mixer_rms_eps=meta.get(Keys.Attention.LAYERNORM_RMS_EPS, float, 1e-5),
        conv_bias=any(name.endswith(".ssm_conv1d.bias") for name in gguf_file.tensors),
        proj_bias=any(name.endswith(".ssm_in.bias") for name in gguf_file.tensors),
    )


def _granite_hybrid_from_gguf(meta: _Metadata, gguf_file: GGUFFile, vocab: int, hidden: int) -> ModelConfig:
    """The ModelConfig of a `granitehybrid` file: layers with 0 KV heads are the Mamba-2 ones."""
    heads = meta.get(Keys.Attention.HEAD_COUNT, int, required=True)
    layers = meta.get(Keys.LLM.BLOCK_COUNT, int, required=True)
    kv = gguf_file.metadata.get(Keys.Attention.HEAD_COUNT_KV.format(arch=meta.arch), heads)
    kv_per_layer = list(kv) if isinstance(kv, (list, tuple)) else [kv] * layers
    if len(kv_per_layer) != layers or not all(isinstance(k, int) for k in kv_per_layer):
        raise CheckpointError(f"{meta.source}: {meta.arch}.attention.head_count_kv should be one count per layer")
    attention_kv = {k for k in kv_per_layer if k}
    if len(attention_kv) > 1:
        raise UnsupportedModelError(f"{meta.source}: attention layers with different KV head counts are not supported")
    if "blk.0.ffn_gate_exps.weight" in gguf_file.tensors:
        raise UnsupportedModelError(f"{meta.source}: Granite hybrid with experts (MoE) is not supported yet")
    try:
        return ModelConfig(
            architecture="granitehybrid", vocab_size=vocab, hidden_size=hidden,
            intermediate_size=meta.get(Keys.LLM.FEED_FORWARD_LENGTH, int, required=True), num_layers=layers,
            num_heads=heads, num_kv_heads=attention_kv.pop() if attention_kv else heads,
            head_dim=meta.get(Keys.Attention.KEY_LENGTH, int) or hidden // heads,
            max_position_embeddings=meta.get(Keys.LLM.CONTEXT_LENGTH, int, 4096),
            rms_norm_eps=meta.get(Keys.Attention.LAYERNORM_RMS_EPS, float, 1e-5),
            rope_theta=meta.get(Keys.Rope.FREQ_BASE, float, 10000.0), rope_scaling=_rope_from_gguf(meta, gguf_file),
            attention_bias="blk.0.attn_q.bias" in gguf_file.tensors,
            tie_word_embeddings="output.weight" not in gguf_file.tensors,
            ssm=_ssm_from_gguf(meta, gguf_file),
            layer_types=tuple("attention" if k else "mamba" for k in kv_per_layer),
            use_rope=bool(meta.get(Keys.Rope.SCALING_FINETUNED, bool, False)),  # as llama.cpp decides it
            attention_scale=meta.get(Keys.Attention.SCALE, float, 1.0),
            embedding_multiplier=meta.get(Keys.LLM.EMBEDDING_SCALE, float, 1.0),
            residual_multiplier=meta.get(Keys.LLM.RESIDUAL_SCALE, float, 1.0),
            logits_scaling=meta.get(Keys.LLM.LOGIT_SCALE, float, 1.0),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{meta.source}: inconsistent model metadata ({err})") from None


def config_from_gguf(gguf_file: GGUFFile) -> ModelConfig:
    """Build the ModelConfig of a llama / qwen2 / mamba / mamba2 GGUF file from its metadata (and tensor directory)."""
    source = str(gguf_file.path)
    arch = gguf_file.metadata.get(Keys.General.ARCHITECTURE)
    if arch not in _NAMES:
        raise UnsupportedModelError(
            f"{source}: GGUF architecture {arch!r} is not supported; supported: {', '.join(_NAMES)}")
    meta = _Metadata(gguf_file.metadata, arch, source)
    hidden = meta.get(Keys.LLM.EMBEDDING_LENGTH, int, required=True)
    if "token_embd.weight" not in gguf_file.tensors:
        raise CheckpointError(f"{source}: tensor 'token_embd.weight' is missing")
    vocab = meta.get(Keys.LLM.VOCAB_SIZE, int) or gguf_file.tensors["token_embd.weight"].shape[0]
    if arch in ("mamba", "mamba2"):
        try:
            return ModelConfig(
                architecture=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=0,
                num_layers=meta.get(Keys.LLM.BLOCK_COUNT, int, required=True), num_heads=0, num_kv_heads=0,
                head_dim=0, max_position_embeddings=meta.get(Keys.LLM.CONTEXT_LENGTH, int, 1 << 20),
                rms_norm_eps=meta.get(Keys.Attention.LAYERNORM_RMS_EPS, float, 1e-5),
                tie_word_embeddings="output.weight" not in gguf_file.tensors, ssm=_ssm_from_gguf(meta, gguf_file),
            )
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: inconsistent model metadata ({err})") from None
    if arch == "granitehybrid":
        return _granite_hybrid_from_gguf(meta, gguf_file, vocab, hidden)
    heads = meta.get(Keys.Attention.HEAD_COUNT, int, required=True)
    window = meta.get(Keys.Attention.SLIDING_WINDOW, int)
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=meta.get(Keys.LLM.FEED_FORWARD_LENGTH, int, required=True),
            num_layers=meta.get(Keys.LLM.BLOCK_COUNT, int, required=True),
            num_heads=heads,
            num_kv_heads=meta.get(Keys.Attention.HEAD_COUNT_KV, int, heads),
            head_dim=meta.get(Keys.Attention.KEY_LENGTH, int) or hidden // heads,
            max_position_embeddings=meta.get(Keys.LLM.CONTEXT_LENGTH, int, 2048),
            rms_norm_eps=meta.get(Keys.Attention.LAYERNORM_RMS_EPS, float, 1e-5),
            rope_theta=meta.get(Keys.Rope.FREQ_BASE, float, 10000.0),
            rope_scaling=_rope_from_gguf(meta, gguf_file),
            sliding_window=window or None,
            attention_bias="blk.0.attn_q.bias" in gguf_file.tensors,
            tie_word_embeddings="output.weight" not in gguf_file.tensors,
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: inconsistent model metadata ({err})") from None


class GGUFCheckpoint:
    """A GGUF model file as a checkpoint: config, float tensors under kilnlm's names, tokenizer."""

    def __init__(self, path: str | Path):
        self.file = GGUFFile(path)
        self.path = self.file.path
        self.config = config_from_gguf(self.file)
        self.arch = GGUF_ARCHITECTURES[self.config.architecture]
        self._names = {kiln: g for g in self.file.tensors if (kiln := kiln_name(g, self.arch)) is not None}
        self._shapes = expected_shapes(self.config)
        for name, shape in self._shapes.items():
            info = self.file.tensors.get(self._names.get(name, gguf_name(name, self.arch)))
            if info is None:
                raise CheckpointError(f"{self.path}: tensor {gguf_name(name, self.arch)!r} is missing")
            stored = stored_shape(self.config, name, shape)
            if info.shape != stored:
                raise CheckpointError(f"{self.path}: tensor {info.name!r} has shape {info.shape}, expected {stored}")

    def tensor_names(self) -> list[str]:
        """kilnlm names of the model's tensors, in file order."""
        return list(self._names)

    def num_tensors(self) -> int:
        """How many model tensors `tensors()` yields."""
        return len(self._names)

    def tensor_format(self, name: str) -> WeightFormat:
        """The stored format of a tensor (by kilnlm name)."""
        return format_for_gguf_type(self.file.tensors[self._names[name]].ggml_type)

    def tensor(self, name: str) -> torch.Tensor:
        """One parameter by kilnlm name, dequantised to float32 in HF layout."""
        int8 = self.int8_weight(name)
        if int8 is not None:
            return int8.dequantize()
        return self._stored(name, self._names[name])

    def int8_weight(self, name: str):
        """The LLM.int8 form of a linear weight (None unless the file stores it so), in HF layout."""
        gguf_weight = self._names.get(name, "")
        base = gguf_weight.removesuffix(".weight")
        if not gguf_weight.endswith(".weight") or f"{base}.int8_scale" not in self.file.tensors:
            return None
        from kilnlm.quant.llm_int8 import Int8Weight

        codes = self._stored(name, gguf_weight).to(torch.int8)
        scale = self._stored(name, f"{base}.int8_scale")
        rows = codes.shape[0]
        if f"{base}.int8_outlier_idx" in self.file.tensors:
            idx = self._stored(f"{name}.outlier_idx", f"{base}.int8_outlier_idx").to(torch.int64)
            columns = self._stored(name, f"{base}.int8_outlier_weight").to(torch.float16)
        else:
            idx, columns = torch.zeros(0, dtype=torch.int64), torch.zeros(rows, 0, dtype=torch.float16)
        threshold = float(self.file.metadata.get("kilnlm.llm_int8.threshold", 6.0))
        try:
            return Int8Weight(codes, scale, idx, columns, threshold)
        except KilnError as err:
            raise CheckpointError(f"{self.path}: inconsistent LLM.int8 tensors for {gguf_weight!r} ({err})") from None

    def _stored(self, name: str, gguf_tensor: str) -> torch.Tensor:
        """A stored tensor as float32 (integers exactly), rows back in HF order for q/k."""
        info = self.file.tensors[gguf_tensor]
        weight = format_for_gguf_type(info.ggml_type).dequantize(self.file.raw(gguf_tensor), info.shape)
        if self._names.get(name) == gguf_tensor:  # the parameter itself, not one of its LLM.int8 side tensors
            weight = from_stored(self.config, name, weight, self._shapes[name])
        heads = _qk_heads(self.config, name)
        return unpermute_qk(weight, heads) if heads else weight

    def tensors(self, *, packed: Callable[[str, WeightFormat, tuple[int, ...]], bool] | None = None
                ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """Yield (kilnlm name, float32 tensor in HF layout), dequantising one tensor at a time.

        Matrices for which `packed(name, stored format, shape)` is true come as QuantizedTensor instead (the file's
        blocks, rows in HF order), for runtimes that multiply through packed weights (runtime.models.quantized_linear.keeps_packed).
        """
        for name in self._names:
            info = self.file.tensors[self._names[name]]
            fmt = format_for_gguf_type(info.ggml_type)
            keep = packed is not None and len(info.shape) == 2 and packed(name, fmt, info.shape)
            yield name, self.packed(name) if keep else self.tensor(name)

    def packed(self, name: str) -> QuantizedTensor:
        """A matrix's weight as stored (the file's blocks, a copy), rows back in HF order."""
        info = self.file.tensors[self._names[name]]
        fmt = format_for_gguf_type(info.ggml_type)
        if len(info.shape) != 2:
            raise CheckpointError(f"{self.path}: {info.name!r} is not a matrix")
        data = self.file.raw(info.name).reshape(fmt.packed_shape(info.shape))
        heads = _qk_heads(self.config, name)
        return QuantizedTensor(fmt, info.shape, (unpermute_qk(data, heads) if heads else data).clone())

    def tokenizer(self):
        """The tokenizer stored in the file's metadata."""
        from kilnlm.runtime.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.file.metadata, str(self.path))


# ------------------------------------------------------------------------------------------- writing


class Checkpoint(Protocol):
    """What the writer needs from a source (HFCheckpoint or GGUFCheckpoint)."""

    config: ModelConfig

    def tensor_names(self) -> list[str]: ...
    def tensor(self, name: str) -> torch.Tensor: ...
    def tokenizer(self): ...


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor the writer will store: kilnlm name, GGUF name, shape (torch order) and storage format."""

    name: str
    gguf_name: str
    shape: tuple[int, ...]
    format: WeightFormat


class Quantizer(Protocol):
    """Turns a checkpoint into packed tensors in plan order (quant/rtn.py, quant/gptq.py, quant/llm_int8.py)."""

    def plan(self, checkpoint: Checkpoint, plan: list[PlannedTensor]) -> list[PlannedTensor]: ...

    def quantized_tensors(self, checkpoint: Checkpoint, plan: list[PlannedTensor]
                          ) -> Iterator[tuple[PlannedTensor, QuantizedTensor]]: ...


@dataclass
class ExportSummary:
    """What write_gguf produced."""

    path: Path
    file_bytes: int
    parameters: int
    seconds: float
    types: dict[str, int]  # ggml type name -> tensor count

    @property
    def bits_per_weight(self) -> float:
        """File bits per model parameter (metadata and tokenizer included, as llama.cpp reports it)."""
        return self.file_bytes * 8 / self.parameters


def tensor_formats(config: ModelConfig, target: str, has_imatrix: bool = False) -> dict[str, WeightFormat]:
    """The storage format of every tensor for a target type, by llama.cpp's rules (export/gguf_types.py).

    1-D tensors (norms, biases) and Mamba's conv kernel and A stay F32, as in llama.cpp's files.
    """
    arch = GGUF_ARCHITECTURES[config.architecture]
    shapes = expected_shapes(config)
    slots = [TensorSlot(gguf_name(n, arch), len(s), stored_shape(config, n, s)[-1]) for n, s in shapes.items()]
    model = ModelShape(arch, config.num_layers, config.num_heads, config.num_kv_heads,
                       has_output=not config.tie_word_embeddings, has_imatrix=has_imatrix)
    kinds = tensor_types(slots, model, target)
    return {name: get_format("f32" if kind is None or _ssm_part(name) in ALWAYS_F32 else kind)
            for (name, _), kind in zip(shapes.items(), kinds, strict=True)}


def _rope_freq_factors(config: ModelConfig) -> torch.Tensor | None:
    """llama.cpp encodes Llama 3.1 rope scaling as a tensor of divisors of the default frequencies."""
    if config.rope_scaling.type != "llama3":
        return None
    plain = ModelConfig(**{**config.__dict__, "rope_scaling": RopeScaling()})
    return rope_frequencies(plain, 0)[0] / rope_frequencies(config, 0)[0]


def _add_model_metadata(writer: gguf.GGUFWriter, config: ModelConfig, name: str, file_type: int) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if config.ssm is not None:
        _add_ssm_metadata(writer, config.ssm)
    if config.num_heads:
        _add_attention_metadata(writer, config)


def _add_ssm_metadata(writer: gguf.GGUFWriter, ssm: SSMConfig) -> None:
    # As convert_hf_to_gguf writes them; Mamba-2's time_step_rank is its head count.
    writer.add_ssm_conv_kernel(ssm.conv_kernel)
    writer.add_ssm_inner_size(ssm.inner_size)
    writer.add_ssm_state_size(ssm.state_size)
    writer.add_ssm_time_step_rank(ssm.time_step_rank)
    if ssm.version == 2:
        writer.add_ssm_group_count(ssm.n_groups)
    if ssm.dt_b_c_rms:
        writer.add_ssm_dt_b_c_rms(True)


def _add_attention_metadata(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    kinds = config.layer_kinds()
    if "mamba" in kinds:  # a hybrid: llama.cpp takes the layers with 0 KV heads for recurrent ones
        writer.add_head_count_kv([config.num_kv_heads if kind == "attention" else 0 for kind in kinds])
        writer.add_rope_scaling_finetuned(config.use_rope)  # llama.cpp's granitehybrid applies RoPE only if set
        writer.add_expert_shared_feed_forward_length(config.intermediate_size)
    else:
        writer.add_head_count_kv(config.num_kv_heads)
    if config.attention_scale is not None:  # Granite's multipliers, all four as convert_hf_to_gguf writes them
        writer.add_attention_scale(config.attention_scale)
        writer.add_embedding_scale(config.embedding_multiplier)
        writer.add_residual_scale(config.residual_multiplier)
        writer.add_logit_scale(config.logits_scaling)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.hidden_size // config.num_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    _add_rope_scaling(writer, config.rope_scaling)
    if config.sliding_window and not config.sliding_window_layers:
        writer.add_sliding_window(config.sliding_window)


def _add_rope_scaling(writer: gguf.GGUFWriter, scaling: RopeScaling) -> None:
    # Like convert_hf_to_gguf: linear and yarn have keys, llama3 becomes the rope_freqs tensor, and
    # dynamic NTK (which llama.cpp does not implement) is left out.
    if scaling.type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)
    elif scaling.type == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling.factor)
        if scaling.original_max_position_embeddings:
            writer.add_rope_scaling_orig_ctx_len(scaling.original_max_position_embeddings)
        writer.add_rope_scaling_yarn_beta_fast(scaling.beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(scaling.beta_slow)


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    from kilnlm.runtime.gguf_vocab import TokenType, gguf_vocab_from_tokenizer

    vocab = gguf_vocab_from_tokenizer(tokenizer)
    if len(vocab.tokens) > vocab_size:
        raise CheckpointError(f"the tokenizer has {len(vocab.tokens)} tokens but the model only {vocab_size} rows")
    # Embedding tables are often padded past the tokenizer; llama.cpp wants one token per row.
    padding = range(len(vocab.tokens), vocab_size)
    vocab.tokens += [f"[PAD{i}]" for i in padding]
    vocab.token_types += [int(TokenType.UNUSED)] * len(padding)
    if vocab.scores is not None:
        vocab.scores += [-1000.0] * len(padding)
    for key, value in vocab.metadata().items():
        _add_tokenizer_key(writer, key, value)


def _add_tokenizer_key(writer: gguf.GGUFWriter, key: str, value) -> None:
    # GGUF types as llama.cpp reads them: ids uint32, flags bool, the charsmap an array of uint8, token
    # types int32 and scores float32 (the writer infers array types from the first element).
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def plan_tensors(checkpoint: Checkpoint, target: str, has_imatrix: bool = False) -> list[PlannedTensor]:
    """Every model tensor with its storage format for `target`, in the model's own order (layer by layer)."""
    config = checkpoint.config
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(checkpoint.tensor_names()))
    if missing:
        raise CheckpointError(f"cannot export: the source lacks tensors {', '.join(missing[:5])}")
    arch = GGUF_ARCHITECTURES[config.architecture]
    formats = tensor_formats(config, target, has_imatrix)
    plan = [PlannedTensor(n, gguf_name(n, arch), s, formats[n]) for n, s in shapes.items()]
    if TARGET_TYPES[target][0] in ("f32", "f16", "bf16"):
        return plan  # convert_hf_to_gguf's order, the model's own
    return sorted(plan, key=lambda p: quantized_order(p.gguf_name))  # llama-quantize's


def _gguf_layout(planned: PlannedTensor, packed: QuantizedTensor, config: ModelConfig) -> np.ndarray:
    if packed.format is not planned.format or packed.shape != planned.shape:
        raise RuntimeError(f"{planned.name}: the quantizer returned {packed.format.name} {packed.shape}, "
                           f"planned {planned.format.name} {planned.shape}")
    if _ssm_part(planned.name) in ALWAYS_F32 or stored_shape(config, planned.name, planned.shape) != planned.shape:
        # Stored in llama.cpp's own form (F32, see to_stored): convert the float values, then pack them again.
        stored = to_stored(config, planned.name, packed.format.dequantize(packed.data, packed.shape))
        return planned.format.quantize(stored).numpy()
    heads = _qk_heads(config, planned.name)
    if not heads:
        return packed.data.numpy()
    # ggml blocks run along rows, so permuting whole packed rows is exact (a vector's rows are its elements).
    rows = packed.data.reshape(planned.shape[0], -1)
    return permute_qk(rows, heads).reshape(packed.data.shape).numpy()


def write_gguf(
    checkpoint: Checkpoint,
    out_path: str | Path,
    target: str,
    *,
    quantizer: Quantizer | None = None,
    name: str = "",
    extra_metadata: dict[str, Any] | None = None,
    on_tensor: Callable[[str, str], None] | None = None,
) -> ExportSummary:
    """Write `checkpoint` as a GGUF file of type `target` (a TARGET_TYPES key: f16, q8_0, q4_k_m, ...), atomically.

    `quantizer` packs the tensors (round-to-nearest by default); `extra_metadata` adds string-keyed
    values (e.g. the recipe of a calibrated method) to the file.
    """
    if target not in TARGET_TYPES:
        raise CheckpointError(f"unknown GGUF type {target!r}; choose one of {', '.join(TARGET_TYPES)}")
    config, out_path = checkpoint.config, Path(out_path)
    if not out_path.parent.is_dir():
        raise CheckpointError(f"{out_path}: the folder {out_path.parent} does not exist")
    started = time.perf_counter()
    quantizer = quantizer or RoundToNearest()
    has_imatrix = getattr(quantizer, "importance", None) is not None  # llama.cpp's mixes change with one
    plan = quantizer.plan(checkpoint, plan_tensors(checkpoint, target, has_imatrix))
    rope_factors = _rope_freq_factors(config)
    tmp_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp_path, GGUF_ARCHITECTURES[config.architecture])
    try:
        _add_model_metadata(writer, config, name or out_path.stem, TARGET_TYPES[target][1])
        _add_tokenizer_metadata(writer, checkpoint.tokenizer(), config.vocab_size)
        for key, value in {**getattr(quantizer, "metadata", {}), **(extra_metadata or {})}.items():
            if isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, int):
                writer.add_int32(key, value)
            else:
                writer.add_float32(key, float(value))
        if rope_factors is not None:
            writer.add_tensor_info(ROPE_FREQS, rope_factors.shape, np.float32, rope_factors.numel() * 4)
        for p in plan:
            packed_shape = p.format.packed_shape(stored_shape(config, p.name, p.shape))
            writer.add_tensor_info(p.gguf_name, packed_shape, np.uint8, int(np.prod(packed_shape)), p.format.gguf_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if rope_factors is not None:
            writer.write_tensor_data(rope_factors.numpy())
        _write_tensors(writer, checkpoint, plan, quantizer, on_tensor)
        writer.close()
        os.replace(tmp_path, out_path)
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise
    types: dict[str, int] = {}
    for p in plan:
        types[p.format.gguf_type.name] = types.get(p.format.gguf_type.name, 0) + 1
    parameters = sum(int(np.prod(shape)) for shape in expected_shapes(config).values())
    return ExportSummary(out_path, out_path.stat().st_size, parameters, time.perf_counter() - started, types)


def _write_tensors(writer: gguf.GGUFWriter, checkpoint: Checkpoint, plan: list[PlannedTensor], quantizer: Quantizer,
                   on_tensor: Callable[[str, str], None] | None) -> None:
    expected = iter(plan)
    for planned, packed in quantizer.quantized_tensors(checkpoint, plan):
        if next(expected, None) is not planned:
            raise RuntimeError("the quantizer yielded tensors out of plan order")
        writer.write_tensor_data(_gguf_layout(planned, packed, checkpoint.config))
        if on_tensor is not None:
            on_tensor(planned.gguf_name, planned.format.gguf_type.name)
