"""Running an ONNX folder (kilnlm's or onnxruntime-genai's builder's layout) through onnxruntime behind the
same model interface as the torch families, so Engine, generation, chat, perplexity and bench work unchanged.

The graph holds the KV cache as past/present inputs and outputs (BNSH, the graph's float type); OnnxKVCache
keeps the present tensors between calls and cuts them back for prefix reuse, so the next chat turn runs only
its new tokens, as with the torch caches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kilnlm.errors import CheckpointError, UnsupportedModelError
from kilnlm.runtime.cache import Cache
from kilnlm.runtime.config import ModelConfig

GENAI_CONFIG = "genai_config.json"
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def is_onnx_folder(path: Path) -> bool:
    """Whether `path` is a folder holding genai_config.json and the decoder it names."""
    return path.is_dir() and (path / GENAI_CONFIG).is_file()


def config_from_genai(settings: dict, source: str) -> ModelConfig:
    """The ModelConfig the runtime needs (sizes, context) from genai_config.json's model section."""
    try:
        model, decoder = settings["model"], settings["model"]["decoder"]
        heads = int(decoder["num_attention_heads"])
        return ModelConfig(
            architecture=str(model.get("type", "onnx")), vocab_size=int(model["vocab_size"]),
            hidden_size=int(decoder["hidden_size"]), intermediate_size=0, num_layers=int(decoder["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(decoder.get("num_key_value_heads", heads)),
            head_dim=int(decoder["head_size"]), max_position_embeddings=int(model["context_length"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: genai_config.json lacks or mangles a model field ({err})") from None


class OnnxKVCache(Cache):
    """The present keys and values of every layer as the graph returned them, (B, Hkv, length, D) numpy arrays."""

    def __init__(self, capacity: int, num_layers: int):
        super().__init__(capacity)
        self.num_layers = num_layers
        self.past: list[tuple[np.ndarray, np.ndarray]] | None = None

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Not used: the ONNX graph updates its own KV cache (see OnnxDecoder.forward)."""
        raise TypeError("an ONNX model's cache is updated by the graph, not layer by layer")

    def nbytes(self) -> int:
        """Memory held by the keys and values of the positions so far (the graph grows them; nothing is preallocated)."""
        return sum(k.nbytes + v.nbytes for k, v in self.past or ())

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on: keys and values are cut back like the token list."""
        super().truncate(length)
        if self.past is not None:
            self.past = [(k[:, :, :length], v[:, :, :length]) for k, v in self.past]


class OnnxDecoder(nn.Module):
    """An ONNX decoder folder run by onnxruntime, called like the torch families: logits for input ids."""

    def __init__(self, folder: Path, settings: dict, session, device: torch.device):
        super().__init__()
        self.folder = folder
        self.config = config_from_genai(settings, str(folder))
        self.session = session
        inputs, outputs = settings["model"]["decoder"]["inputs"], settings["model"]["decoder"]["outputs"]
        self.names = {"past_key": inputs["past_key_names"], "past_value": inputs["past_value_names"],
                      "position_ids": inputs.get("position_ids"), "present_key": outputs["present_key_names"],
                      "present_value": outputs["present_value_names"], "logits": outputs.get("logits", "logits")}
        self.outputs = [o.name for o in session.get_outputs()]
        first_past = next(i for i in session.get_inputs() if i.name == self.names["past_key"] % 0)
        self.kv_dtype = np.float16 if "float16" in first_past.type else np.float32
        # The runtime finds a model's device from its parameters; an ONNX model keeps its weights in the session.
        self.device_anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)

    def weight_bytes(self) -> int:
        """Bytes of the graph's weights (the external-data file and the graph itself)."""
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.suffix in (".onnx", ".data"))

    def new_cache(self, capacity: int, batch: int = 1, *, paged: bool = False, **kv_options) -> OnnxKVCache:
        """A cache for `batch` sequences; the KV type is the graph's own, so KV options are refused."""
        asked = [k for k, v in kv_options.items() if v not in (None, False) and k != "rotate"]
        if asked or paged:
            from kilnlm.runtime.kv_stores import CacheTypeError

            raise CacheTypeError(f"{self.folder}: an ONNX model keeps keys and values in the graph's own type; "
                                 "KV cache options do not apply")
        return OnnxKVCache(capacity, self.config.num_layers)

    def forward(self, input_ids: torch.Tensor, cache: OnnxKVCache | None = None, *,
                last_logits_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) in fp32 for input_ids (B, T), after the positions already in `cache`."""
        batch, length = input_ids.shape
        start = 0 if cache is None else cache.length
        if cache is not None:
            cache.check_room(length)
        c = self.config
        empty = np.zeros((batch, c.num_kv_heads, 0, c.head_dim), self.kv_dtype)
        past = cache.past if cache is not None and cache.past is not None else [(empty, empty)] * c.num_layers
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                 "attention_mask": np.ones((batch, start + length), np.int64)}
        if self.names["position_ids"]:
            feeds[self.names["position_ids"]] = np.broadcast_to(np.arange(start, start + length), (batch, length)).copy()
        for i, (k, v) in enumerate(past):
            feeds[self.names["past_key"] % i], feeds[self.names["past_value"] % i] = k, v
        out = dict(zip(self.outputs, self.session.run(None, feeds), strict=True))
        if cache is not None:
            n = self.names
            cache.past = [(out[n["present_key"] % i], out[n["present_value"] % i]) for i in range(c.num_layers)]
            cache.commit_rows(input_ids)
        logits = torch.from_numpy(out[self.names["logits"]]).float()
        return (logits[:, -1:] if last_logits_only else logits).to(self.device_anchor.device)


def load_onnx_folder(folder: Path, device: torch.device) -> OnnxDecoder:
    """Open an ONNX folder with onnxruntime on `device` (CPU, or CUDA with onnxruntime-gpu)."""
    import onnxruntime as ort

    try:
        settings = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder / GENAI_CONFIG}: not readable JSON ({err})") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{folder / GENAI_CONFIG}: expected a JSON object")
    decoder_file = folder / settings.get("model", {}).get("decoder", {}).get("filename", "model.onnx")
    if not decoder_file.is_file():
        raise CheckpointError(f"{folder}: genai_config.json names {decoder_file.name}, which is missing")
    providers = PROVIDERS[device.type] if device.type in PROVIDERS else None
    if providers is None or providers[0] not in ort.get_available_providers():
        raise UnsupportedModelError(f"{folder}: onnxruntime has no execution provider for {device}; install "
                                    "kilnlm[onnx-gpu] for CUDA or use --device cpu")
    session = ort.InferenceSession(str(decoder_file), providers=providers)
    return OnnxDecoder(folder, settings, session, device)
