"""Calibration: token samples, and a runner that pushes them through the model one decoder block at a time.

Only one block's weights and the calibration activations are in memory at once, so a model far larger
than memory can be calibrated. Methods (GPTQ, LLM.int8) watch the inputs of each block's linear layers
through `LayerRunner.observe`, replace the block's weights with their quantized versions, and then call
`LayerRunner.advance` so the next block sees the quantized block's outputs, as GPTQ's reference does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kilnlm.errors import KilnError
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.models.llama import DecoderLayer
from kilnlm.runtime.rope import RotaryEmbedding

# Linear layers that see the same input share one set of statistics (one Hessian for q, k and v).
LINEAR_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class CalibrationError(KilnError):
    """Calibration data is missing, unreadable or too short."""


def calibration_ids(tokenizer, files: Sequence[str | Path], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) token windows drawn at random (seeded) from the concatenated text files.

    Each window starts with BOS when the tokenizer adds one, as sequences do at inference time.
    """
    texts = []
    for path in files:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise CalibrationError(f"{path}: cannot read calibration text ({err})") from None
    ids = tokenizer.encode("\n\n".join(texts), add_bos=False)
    body = seqlen - 1 if tokenizer.add_bos else seqlen
    if len(ids) < body + 1:
        raise CalibrationError(
            f"the calibration text has {len(ids)} tokens; windows of {seqlen} tokens need more text (or a smaller --seqlen)"
        )
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        start = rng.randrange(0, len(ids) - body + 1)
        window = ids[start : start + body]
        windows.append([tokenizer.bos_id] + window if tokenizer.add_bos else window)
    return torch.tensor(windows, dtype=torch.long)


def generated_calibration_ids(model: nn.Module, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) tokens sampled from the model itself (temperature 1 from BOS): data-free calibration.

    The default when no text is given. Text from the model's own distribution calibrates better than random
    tokens (LLM-QAT, Liu et al. 2023), but real text of the target domain is better still.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    start = tokenizer.bos_id if tokenizer.bos_id is not None else 0
    ids = torch.full((nsamples, 1), start, dtype=torch.long, device=device)
    cache = model.new_cache(seqlen, batch=nsamples)
    with torch.inference_mode():
        logits = model(ids, cache)[:, -1]
        for _ in range(seqlen - 1):
            token = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
            ids = torch.cat([ids, token], dim=1)
            if ids.shape[1] < seqlen:
                logits = model(token, cache)[:, -1]
    return ids


class LayerRunner:
    """Runs calibration activations through the decoder blocks of a checkpoint, one block at a time."""

    def __init__(self, checkpoint, ids: torch.Tensor, *, device: str | torch.device = "cpu", batch_size: int = 8):
        self.checkpoint = checkpoint
        self.config: ModelConfig = checkpoint.config
        self.device = torch.device(device)
        self.batch_size = batch_size
        embedding = checkpoint.tensor("embed_tokens.weight").to(self.device, torch.float32)
        self.hidden = F.embedding(ids.to(self.device), embedding)  # (nsamples, seqlen, H)
        cos, sin = RotaryEmbedding(self.config).to(self.device)(0, ids.shape[1])
        self.cos, self.sin = cos, sin

    def layer(self, index: int) -> DecoderLayer:
        """Decoder block `index` with its float32 weights from the checkpoint."""
        with torch.device("meta"):
            layer = DecoderLayer(self.config, index)
        for name, _ in list(layer.named_parameters()):
            tensor = self.checkpoint.tensor(f"layers.{index}.{name}").to(self.device, torch.float32)
            owner, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(owner), attr, nn.Parameter(tensor, requires_grad=False))
        return layer

    @torch.no_grad()
    def observe(self, layer: DecoderLayer, module_name: str, callback: Callable[[torch.Tensor], None]) -> None:
        """Run the block over all samples and call `callback` with every batch of inputs of `module_name`."""
        module = layer.get_submodule(module_name)
        handle = module.register_forward_hook(lambda _m, inputs, _out: callback(inputs[0]))
        try:
            for batch in self.hidden.split(self.batch_size):
                layer(batch, self.cos, self.sin, None)
        finally:
            handle.remove()

    @torch.no_grad()
    def advance(self, layer: DecoderLayer) -> None:
        """Replace the activations by the block's outputs (computed with whatever weights it now holds)."""
        self.hidden = torch.cat([layer(batch, self.cos, self.sin, None) for batch in self.hidden.split(self.batch_size)])


def load_calibration(checkpoint, files: Sequence[str | Path], nsamples: int, seqlen: int, seed: int,
                     device: str | torch.device = "cpu") -> tuple[torch.Tensor, str]:
    """Calibration ids from text files, or sampled from the model when none are given; and a description."""
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"need at least 1 sample of at least 2 tokens (got {nsamples} x {seqlen})")
    tokenizer = checkpoint.tokenizer()
    if files:
        ids = calibration_ids(tokenizer, files, nsamples, seqlen, seed)
        return ids, "files: " + ", ".join(Path(f).name for f in files)
    from kilnlm.runtime.models import build_model

    model = build_model(checkpoint.config, checkpoint.tensors(), device=device, dtype=torch.float32)
    ids = generated_calibration_ids(model, tokenizer, nsamples, seqlen, seed)
    return ids.cpu(), "generated by the model (no --calib given)"
