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
from kilnlm.runtime.models import model_class, on_meta


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

    def __init__(self, checkpoint, ids: torch.Tensor, *, device: str | torch.device = "cpu", batch_size: int = 8,
                 float_stream: bool = False):
        self.checkpoint = checkpoint
        self.config: ModelConfig = checkpoint.config
        self.device = torch.device(device)
        self.batch_size = batch_size
        embedding = checkpoint.tensor("embed_tokens.weight").to(self.device, torch.float32)
        self.hidden = F.embedding(ids.to(self.device), embedding)  # (nsamples, seqlen, H)
        # The same samples through the float model, for methods that aim at its outputs (GPTQ's float targets).
        self.float_hidden = self.hidden.clone() if float_stream else None
        self.family = model_class(self.config)
        # What the family's blocks take besides the hidden states (RoPE tables for attention, nothing for Mamba).
        self.context = self.family.block_context(self.config, 0, ids.shape[1], self.device)

    def layer(self, index: int) -> nn.Module:
        """Block `index` with its float32 weights from the checkpoint; its `linear_groups` name the linears
        that share an input (quantization methods solve each group from one set of statistics)."""
        with on_meta():
            layer = self.family.make_block(self.config, index)
        for name, _ in list(layer.named_parameters()):
            tensor = self.checkpoint.tensor(f"layers.{index}.{name}").to(self.device, torch.float32)
            owner, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(owner), attr, nn.Parameter(tensor, requires_grad=False))
        return layer

    @torch.no_grad()
    def observe(self, layer: nn.Module, module_name: str, callback: Callable[[torch.Tensor], None]) -> None:
        """Run the block over all samples and call `callback` with every batch of inputs of `module_name`."""
        for batch in self.hidden.split(self.batch_size):
            callback(_inputs_of(layer, module_name, batch, self.context))

    @torch.no_grad()
    def observe_with_float(self, layer: nn.Module, float_layer: nn.Module, module_name: str,
                           callback: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Like `observe`, with each batch's inputs of `module_name` in the float model passed alongside."""
        if self.float_hidden is None:
            raise CalibrationError("internal error: observe_with_float needs LayerRunner(float_stream=True)")
        for batch, float_batch in zip(self.hidden.split(self.batch_size), self.float_hidden.split(self.batch_size)):
            callback(_inputs_of(layer, module_name, batch, self.context),
                     _inputs_of(float_layer, module_name, float_batch, self.context))

    @torch.no_grad()
    def advance(self, layer: nn.Module, float_layer: nn.Module | None = None) -> None:
        """Replace the activations by the block's outputs (computed with whatever weights it now holds).

        With a float stream, `float_layer` (the block with its checkpoint weights) advances that stream too.
        """
        self.hidden = self._run(layer, self.hidden)
        if self.float_hidden is not None:
            if float_layer is None:
                raise CalibrationError("internal error: a LayerRunner with a float stream needs the float block")
            self.float_hidden = self._run(float_layer, self.float_hidden)

    def _run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(batch, self.context, None).float() for batch in hidden.split(self.batch_size)])


class _ModuleReached(Exception):
    """Raised by `_inputs_of`'s hook to stop a block's forward once the watched module has its input."""

    def __init__(self, inputs: torch.Tensor):
        super().__init__()
        self.inputs = inputs


def _raise_inputs(_module: nn.Module, args: tuple) -> None:
    raise _ModuleReached(args[0])


def _inputs_of(layer: nn.Module, module_name: str, hidden: torch.Tensor, context) -> torch.Tensor:
    """The input `module_name` receives when `layer` runs on `hidden`, computing only what precedes it.

    The forward stops as the module is reached: q/k/v need only the first norm, so the statistics of a
    block's four linear groups cost about two block forwards instead of four. `context` is what the family's
    blocks take besides the hidden states (see runtime.models).
    """
    handle = layer.get_submodule(module_name).register_forward_pre_hook(_raise_inputs)
    try:
        layer(hidden, context, None)
    except _ModuleReached as reached:
        return reached.inputs
    finally:
        handle.remove()
    raise CalibrationError(f"internal error: the block never called {module_name}")


def load_calibration(checkpoint, files: Sequence[str | Path], nsamples: int, seqlen: int, seed: int,
                     device: str | torch.device = "cpu", model_samples: int | None = None) -> tuple[torch.Tensor, str]:
    """(nsamples, seqlen) calibration ids and a description of where they came from.

    `model_samples` of the windows are text sampled from the model itself and the rest are drawn from
    `files`; by default all of them are sampled when no file is given, and none otherwise. Mixing the two
    covers both the states the model visits on its own domain and those real text drives it into.
    """
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"need at least 1 sample of at least 2 tokens (got {nsamples} x {seqlen})")
    if model_samples is None:
        model_samples = 0 if files else nsamples
    if not 0 <= model_samples <= nsamples:
        raise CalibrationError(f"model samples must be between 0 and nsamples ({nsamples}), got {model_samples}")
    if model_samples < nsamples and not files:
        raise CalibrationError(f"{nsamples - model_samples} calibration windows should come from text files, but "
                               "no --calib file was given")
    tokenizer = checkpoint.tokenizer()
    parts, sources = [], []
    if model_samples:
        from kilnlm.runtime.models import build_model

        model = build_model(checkpoint.config, checkpoint.tensors(), device=device, dtype=torch.float32)
        parts.append(generated_calibration_ids(model, tokenizer, model_samples, seqlen, seed).cpu())
        sources.append(f"{model_samples} sampled from the model")
        del model
    if model_samples < nsamples:
        parts.append(calibration_ids(tokenizer, files, nsamples - model_samples, seqlen, seed))
        sources.append(f"{nsamples - model_samples} from " + ", ".join(Path(f).name for f in files))
    return torch.cat(parts), "; ".join(sources)
