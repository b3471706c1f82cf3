"""Reading a Hugging Face checkpoint folder: config.json, safetensors weights (single or sharded), tokenizer.

Weights stream one tensor at a time under kilnlm's parameter names (HF's without the "model." prefix).
Pickle files (`pytorch_model.bin`) can execute code when loaded, so they are refused unless the caller
allows them, and even then are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kilnlm.errors import CheckpointError, PickleRefusedError, UnsupportedModelError
from kilnlm.runtime.config import ModelConfig, RopeScaling, SSMConfig

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MambaForCausalLM": "mamba",
    "FalconMambaForCausalLM": "mamba",  # Mamba-1 with RMS-normed dt, B and C (see _mamba_config)
    "Mamba2ForCausalLM": "mamba2",
    "GraniteMoeHybridForCausalLM": "granitehybrid",  # Granite-4.0-H, dense variants (see _granite_hybrid_config)
}
MAMBA_CONTEXT = 1 << 20  # Mamba has no position limit; llama.cpp's converter records this as the context length
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ROPE_FIELDS = {
    "factor": float,
    "original_max_position_embeddings": int,
    "low_freq_factor": float,
    "high_freq_factor": float,
    "beta_fast": float,
    "beta_slow": float,
    "mscale": float,
    "mscale_all_dim": float,
    "attention_factor": float,
    "truncate": bool,
}


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from `path`, raising CheckpointError naming the file when it is missing or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _require(raw: dict[str, Any], key: str, source: str) -> Any:
    if raw.get(key) is None:
        raise CheckpointError(f"{source}: required field {key!r} is missing")
    return raw[key]


def _architecture(raw: dict[str, Any], source: str) -> str:
    names = raw.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = ", ".join(names) or f"model_type {raw.get('model_type')!r}"
    raise UnsupportedModelError(
        f"{source}: architecture {found} is not supported; supported: {', '.join(ARCHITECTURES)}"
    )


def _rope_scaling(raw: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes "rope_parameters" (with rope_theta inside); older files "rope_scaling" + "rope_theta".
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear", "dynamic", "yarn", "llama3"):
        raise UnsupportedModelError(
            f"{source}: rope scaling type {kind!r} is not supported; supported: default, linear, dynamic, yarn, llama3"
        )
    fields = {key: cast(params[key]) for key, cast in _ROPE_FIELDS.items() if params.get(key) is not None}
    if kind in ("linear", "dynamic", "llama3") and "factor" not in fields:
        raise CheckpointError(f"{source}: rope scaling {kind!r} needs a 'factor'")
    return theta, RopeScaling(type=kind, **fields)


def _sliding_window(raw: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    window = raw.get("sliding_window")
    if arch == "llama" or window is None:
        return None, ()
    layer_types = raw.get("layer_types")
    if layer_types:
        flags = tuple(kind == "sliding_attention" for kind in layer_types)
        return (int(window), flags) if any(flags) else (None, ())
    if arch == "qwen2":
        # Qwen2 only slides when asked, and then only from layer max_window_layers upwards.
        if not raw.get("use_sliding_window", False):
            return None, ()
        first = int(raw.get("max_window_layers", 0))
        return int(window), tuple(i >= first for i in range(num_layers))
    return int(window), ()


def _json_float(value: Any) -> float:
    """A float from config.json, including the {"__float__": "Infinity"} that transformers >= 5 writes for inf."""
    return float(value["__float__"] if isinstance(value, dict) else value)


def _mamba_config(raw: dict[str, Any], arch: str, source: str) -> ModelConfig:
    """The ModelConfig of a transformers Mamba / Falcon-Mamba / Mamba-2 config.json."""
    hidden = int(_require(raw, "hidden_size", source))
    inner = int(raw.get("intermediate_size") or int(raw.get("expand", 2) * hidden))
    if arch == "mamba":
        rank = raw.get("time_step_rank", "auto")
        ssm = SSMConfig(
            version=1, inner_size=inner, state_size=int(raw.get("state_size", 16)),
            conv_kernel=int(raw.get("conv_kernel", 4)),
            time_step_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
            dt_b_c_rms=raw.get("model_type") == "falcon_mamba" or "FalconMambaForCausalLM" in raw.get("architectures", []),
            mixer_rms_eps=float(raw.get("mixer_rms_eps", 1e-6)),
            conv_bias=bool(raw.get("use_conv_bias", True)), proj_bias=bool(raw.get("use_bias", False)),
        )
    else:
        inner = int(raw.get("expand", 2) * hidden)  # transformers' Mamba2Mixer ignores intermediate_size
        heads = int(_require(raw, "num_heads", source))
        if heads * int(raw.get("head_dim", 64)) != inner:
            raise CheckpointError(f"{source}: num_heads x head_dim ({heads} x {raw.get('head_dim', 64)}) must equal "
                                  f"expand x hidden_size ({inner})")
        limit = raw.get("time_step_limit") or (0.0, math.inf)
        ssm = SSMConfig(
            version=2, inner_size=inner, state_size=int(raw.get("state_size", 128)),
            conv_kernel=int(raw.get("conv_kernel", 4)), time_step_rank=heads, n_groups=int(raw.get("n_groups", 1)),
            conv_bias=bool(raw.get("use_conv_bias", True)), proj_bias=bool(raw.get("use_bias", False)),
            time_step_limit=(_json_float(limit[0]), _json_float(limit[1])), chunk_size=int(raw.get("chunk_size", 256)),
        )
    return ModelConfig(
        architecture=arch,
        vocab_size=int(_require(raw, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=0,
        num_layers=int(_require(raw, "num_hidden_layers", source)),
        num_heads=0,
        num_kv_heads=0,
        head_dim=0,
        max_position_embeddings=MAMBA_CONTEXT,
        rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", arch == "mamba")),
        ssm=ssm,
    )


_LAYER_KINDS = {"attention": "attention", "full_attention": "attention", "mamba": "mamba",
                "linear_attention": "mamba"}  # what transformers' and the checkpoints' layer_types say


def _granite_hybrid_config(raw: dict[str, Any], arch: str, source: str) -> ModelConfig:
    """The ModelConfig of a GraniteMoeHybridForCausalLM config.json (Granite-4.0-H), dense variants only."""
    if raw.get("num_local_experts"):
        raise UnsupportedModelError(f"{source}: Granite hybrid with {raw['num_local_experts']} experts (MoE) is not "
                                    "supported yet; dense variants (num_local_experts 0) are")
    hidden = int(_require(raw, "hidden_size", source))
    heads = int(_require(raw, "num_attention_heads", source))
    layers = int(_require(raw, "num_hidden_layers", source))
    kinds = raw.get("layer_types") or raw.get("layers_block_type") or ["mamba"] * layers
    if any(kind not in _LAYER_KINDS for kind in kinds):
        raise UnsupportedModelError(f"{source}: layer types {sorted(set(kinds) - set(_LAYER_KINDS))} are not supported")
    inner = int(raw.get("mamba_expand", 2) * hidden)
    mamba_heads = int(raw.get("mamba_n_heads", 128))
    d_head = raw.get("mamba_d_head", "auto")
    if d_head != "auto" and int(d_head) * mamba_heads != inner:
        raise CheckpointError(f"{source}: mamba_n_heads x mamba_d_head ({mamba_heads} x {d_head}) must equal "
                              f"mamba_expand x hidden_size ({inner})")
    limit = raw.get("time_step_limit") or (0.0, math.inf)
    theta, scaling = _rope_scaling(raw, source)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(_require(raw, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "shared_intermediate_size", source)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=hidden // heads,
        max_position_embeddings=int(raw.get("max_position_embeddings") or 2048),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=bool(raw.get("attention_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        ssm=SSMConfig(
            version=2, inner_size=inner, state_size=int(raw.get("mamba_d_state", 256)),
            conv_kernel=int(raw.get("mamba_d_conv", 4)), time_step_rank=mamba_heads,
            n_groups=int(raw.get("mamba_n_groups", 1)), conv_bias=bool(raw.get("mamba_conv_bias", True)),
            proj_bias=bool(raw.get("mamba_proj_bias", False)),
            time_step_limit=(_json_float(limit[0]), _json_float(limit[1])),
            chunk_size=int(raw.get("mamba_chunk_size", 256)),
        ),
        layer_types=tuple(_LAYER_KINDS[kind] for kind in kinds),
        use_rope=raw.get("position_embedding_type") == "rope",
        attention_scale=float(raw.get("attention_multiplier", 1.0)),
        embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(raw.get("residual_multiplier", 1.0)),
        logits_scaling=float(raw.get("logits_scaling", 1.0)),
    )


_SSM_FAMILIES = {"mamba": _mamba_config, "mamba2": _mamba_config, "granitehybrid": _granite_hybrid_config}


def parse_hf_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from the contents of a Hugging Face config.json."""
    arch = _architecture(raw, source)
    if arch in _SSM_FAMILIES:
        try:
            return _SSM_FAMILIES[arch](raw, arch, source)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: inconsistent model config ({err})") from None
    if arch == "llama" and (raw.get("attention_bias") or raw.get("mlp_bias")):
        raise UnsupportedModelError(f"{source}: Llama checkpoints with attention_bias or mlp_bias are not supported")
    hidden = int(_require(raw, "hidden_size", source))
    heads = int(_require(raw, "num_attention_heads", source))
    layers = int(_require(raw, "num_hidden_layers", source))
    theta, scaling = _rope_scaling(raw, source)
    window, window_layers = _sliding_window(raw, arch, layers)
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=int(_require(raw, "vocab_size", source)),
            hidden_size=hidden,
            intermediate_size=int(_require(raw, "intermediate_size", source)),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            max_position_embeddings=int(raw.get("max_position_embeddings") or 2048),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            sliding_window=window,
            sliding_window_layers=window_layers,
            attention_bias=arch == "qwen2",
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: inconsistent model config ({err})") from None


# HF names whose kilnlm name is not just the HF name without its "model." / "backbone." prefix: Mamba's
# embedding and final norm take the names every family uses.
_RENAMED = {"backbone.embeddings.weight": "embed_tokens.weight", "backbone.embedding.weight": "embed_tokens.weight",
            "backbone.norm_f.weight": "norm.weight"}


# HF tensors that hold several kilnlm parameters stacked along rows (chunk i of n): Granite's fused MLP input,
# which kilnlm (like llama.cpp) keeps as separate gate and up projections.
_FUSED = {"shared_mlp.input_linear.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
          "shared_mlp.output_linear.weight": ("mlp.down_proj.weight",)}


def internal_name(hf_name: str) -> str:
    """kilnlm's parameter name for an HF tensor name (the one place this mapping lives)."""
    return _RENAMED.get(hf_name) or hf_name.removeprefix("model.").removeprefix("backbone.")


def internal_parts(hf_name: str) -> list[tuple[str, int, int]]:
    """(kilnlm name, chunk, chunks) for each kilnlm parameter an HF tensor holds (chunk i of n along dim 0)."""
    name = internal_name(hf_name)
    for fused, parts in _FUSED.items():
        if name.endswith("." + fused):
            base = name.removesuffix(fused)
            return [(base + part, i, len(parts)) for i, part in enumerate(parts)]
    return [(name, 0, 1)]


@dataclass
class HFCheckpoint:
    """An opened HF checkpoint folder: its config and a lazy, random-access view of its weight files."""

    folder: Path
    config: ModelConfig
    weight_files: list[Path]
    is_pickle: bool
    _index: dict[str, tuple[Path, str, int, int]] | None = field(default=None, repr=False)
    _pickles: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def tensor_names(self) -> list[str]:
        """kilnlm names of the model's parameters present in the files, in file order (reads only headers)."""
        return list(self._locate())

    def num_tensors(self) -> int:
        """How many tensors `tensors()` yields (for progress bars)."""
        return len(self._locate())

    def tensor(self, name: str) -> torch.Tensor:
        """One parameter by kilnlm name."""
        path, key, chunk, chunks = self._locate()[name]
        if self.is_pickle:
            tensor = self._pickle(path)[key]
        else:
            tensor = _read_safetensor(path, key)
        if chunks > 1:
            tensor = tensor.chunk(chunks)[chunk].contiguous()
        if tensor.dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(
                f"{path}: tensor {key!r} has dtype {tensor.dtype}; only float32, float16 and bfloat16 "
                "checkpoints can be read (pre-quantized HF checkpoints are not supported)"
            )
        return tensor

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (kilnlm name, tensor) for the model's parameters, one at a time, in file order."""
        for name in self._locate():
            yield name, self.tensor(name)

    def tokenizer(self):
        """The checkpoint's tokenizer (tokenizer.model or tokenizer.json)."""
        from kilnlm.runtime.tokenizer import Tokenizer

        return Tokenizer.from_hf_folder(self.folder)

    def _locate(self) -> dict[str, tuple[Path, str, int, int]]:
        """kilnlm name -> (file, key in the file, chunk, chunks), for the parameters the model needs (tied lm_head
        copies, rotary inv_freq buffers and the like are left out)."""
        if self._index is None:
            from kilnlm.runtime.models import expected_shapes

            wanted = set(expected_shapes(self.config))
            self._index = {}
            for path in self.weight_files:
                keys = list(self._pickle(path)) if self.is_pickle else _safetensors_keys(path)
                self._index.update({name: (path, key, chunk, chunks) for key in keys
                                    for name, chunk, chunks in internal_parts(key) if name in wanted})
        return self._index

    def _pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._pickles:
            self._pickles[path] = _read_pickle(path)  # memory-mapped: tensors are read on use
        return self._pickles[path]


def _read_safetensor(path: Path, key: str) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors file ({err})") from None


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors file ({err})") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch.load raises many types for bad or unsafe pickles
        raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _sharded(folder: Path, index_name: str) -> list[Path]:
    index_path = folder / index_name
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' in the index")
    files = [folder / name for name in dict.fromkeys(weight_map.values())]
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{index_path}: shard {path.name} is listed but missing from {folder}")
    return files


def _weight_files(folder: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"], False
    if (folder / "model.safetensors.index.json").is_file():
        return _sharded(folder, "model.safetensors.index.json"), False
    pickles = []
    if (folder / "pytorch_model.bin").is_file():
        pickles = [folder / "pytorch_model.bin"]
    elif (folder / "pytorch_model.bin.index.json").is_file():
        pickles = _sharded(folder, "pytorch_model.bin.index.json")
    if pickles and not allow_pickle:
        raise PickleRefusedError(
            f"{folder}: only pickle weights ({pickles[0].name}) were found. Pickle files can run arbitrary code "
            "when loaded, so kilnlm refuses them by default; pass --allow-pickle (allow_pickle=True) if you "
            "trust this checkpoint, or convert it to safetensors"
        )
    if pickles:
        return pickles, True
    raise CheckpointError(
        f"{folder}: no weights found (looked for model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin, pytorch_model.bin.index.json)"
    )


def open_hf_checkpoint(folder: str | Path, *, allow_pickle: bool = False) -> HFCheckpoint:
    """Open an HF checkpoint folder: parse config.json and locate (but do not read) its weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (expected a Hugging Face checkpoint folder)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: config.json is missing; this does not look like a Hugging Face checkpoint")
    config = parse_hf_config(read_json(config_path), source=str(config_path))
    files, is_pickle = _weight_files(folder, allow_pickle)
    return HFCheckpoint(folder=folder, config=config, weight_files=files, is_pickle=is_pickle)
