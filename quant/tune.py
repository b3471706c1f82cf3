"""End-to-end tuning of a quantized model's float parameters, with every integer code kept as it is.

After GPTQ has chosen the codes block by block, the whole quantized model is distilled towards the float
model: the fp16 scale (and Q4_1 minimum) of every ggml block, the RMSNorm weights and the linears stored
in a float type are trained with Adam to minimise KL(float ‖ quantized) on the calibration windows. This
is EfficientQAT's E2E-QP stage (Chen et al., 2024). The file stays ordinary Q4_0/Q4_1/Q8_0, so llama.cpp
loads it unchanged. It needs the float model and the quantized one in memory at once, unlike GPTQ itself.

Embeddings and the output matrix stay as the inner quantizer made them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kilnlm.quant.formats import QuantizationError, QuantizedTensor, fp16_field, le_bytes

_FLOAT_TYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class TuneRecipe:
    """How the float parameters were tuned; stored as `kilnlm.quantization.tuning`."""

    steps: int
    lr: float = 1e-3  # Adam; float tensors take lr × their RMS, so every step is a relative change
    batch: int = 16  # calibration windows per step
    seed: int = 0

    def describe(self) -> str:
        return json.dumps({"method": "e2e-kl", **asdict(self)}, sort_keys=True)


class _BlockScaledLinear(nn.Module):
    """A linear in a ggml block format whose scales (and minimums) train while its codes stay fixed.

    codes:     (rows, n_blocks, block_size) float32, the value each code stands for with d = 1 and m = 0.
    scale:     (rows, n_blocks, 1) float32, the stored fp16 scales; trained as scale · exp(log_gain).
    minimum:   (rows, n_blocks, 1) float32 stored minimums (Q4_1), shifted by scale · shift; else None.
    """

    def __init__(self, packed: QuantizedTensor):
        super().__init__()
        fmt = packed.format
        d_at, m_at = fmt.scale_offset, fmt.min_offset
        rows, cols = packed.shape
        n_blocks = cols // fmt.block_size
        blocks = packed.data.reshape(rows * n_blocks, fmt.bytes_per_block)
        unit = blocks.clone()  # the same codes with d = 1 (and m = 0): decodes to the codes' values
        unit[:, d_at : d_at + 2] = le_bytes(torch.ones(rows * n_blocks, 1, dtype=torch.float16))
        if m_at is not None:
            unit[:, m_at : m_at + 2] = 0
        self.packed = packed
        codes = QuantizedTensor(fmt, packed.shape, unit.reshape(packed.data.shape)).dequantize().float()
        self.register_buffer("codes", codes.reshape(rows, n_blocks, fmt.block_size))
        self.register_buffer("scale", fp16_field(blocks, d_at).reshape(rows, n_blocks, 1))
        minimum = None if m_at is None else fp16_field(blocks, m_at).reshape(rows, n_blocks, 1)
        self.register_buffer("minimum", minimum)
        self.log_gain = nn.Parameter(torch.zeros_like(self.scale))
        self.shift = nn.Parameter(torch.zeros_like(self.scale)) if m_at is not None else None

    def block_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        d = self.scale * torch.exp(self.log_gain)
        m = None if self.minimum is None else self.minimum + self.scale * self.shift
        return d, m

    def weight(self, round_to_fp16: bool = False) -> torch.Tensor:
        d, m = self.block_params()
        if round_to_fp16:
            d, m = d.half().float(), None if m is None else m.half().float()
        w = self.codes * d if m is None else self.codes * d + m
        return w.reshape(self.packed.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())

    @torch.no_grad()
    def repacked(self, name: str) -> QuantizedTensor:
        """The original blocks with the trained fp16 scales (and minimums) written in."""
        fmt = self.packed.format
        d_at, m_at = fmt.scale_offset, fmt.min_offset
        blocks = self.packed.data.reshape(*self.scale.shape[:2], fmt.bytes_per_block).clone()
        d, m = self.block_params()
        for offset, value in ((d_at, d), (m_at, m)):
            if offset is None:
                continue
            half = value.half().cpu()
            if not bool(torch.isfinite(half).all()):
                raise QuantizationError(f"{name}: a tuned block scale left fp16's range; tune with fewer steps "
                                        "or a lower learning rate")
            blocks[..., offset : offset + 2] = le_bytes(half)
        packed = QuantizedTensor(self.packed.format, self.packed.shape, blocks.reshape(self.packed.data.shape))
        if not torch.equal(packed.dequantize().float(), self.weight(round_to_fp16=True).cpu()):
            raise QuantizationError(f"{name}: internal error: repacked blocks do not decode to the tuned weights")
        return packed


class EndToEndTuner:
    """Wraps a calibrated quantizer (GPTQ) and tunes the float parameters of everything it produced.

    `ids` are the calibration windows (nsamples, seqlen); `on_step(done, total, loss)` reports progress.
    """

    def __init__(self, inner, ids: torch.Tensor, recipe: TuneRecipe, *, device: str | torch.device = "cpu",
                 on_step: Callable[[int, int, float], None] | None = None):
        if recipe.steps < 1 or recipe.batch < 1 or not recipe.lr > 0:
            raise QuantizationError(f"tuning needs at least one step, a batch of one and a positive learning rate "
                                    f"(got {recipe})")
        if ids.shape[0] < 2:
            raise QuantizationError(f"tuning holds out calibration windows to check itself; it needs at least 2 "
                                    f"(got {ids.shape[0]}): raise --nsamples")
        self.inner, self.ids, self.recipe = inner, ids, recipe
        self.device = torch.device(device)
        self.on_step = on_step
        self.losses: list[float] = []  # KL per token at each step, on that step's batch
        self.validation: list[tuple[int, float]] = []  # (step, KL per token on the held-out windows)

    @property
    def errors(self) -> dict:
        return getattr(self.inner, "errors", {})

    def plan(self, checkpoint, plan: list) -> list:
        return self.inner.plan(checkpoint, plan)

    def quantized_tensors(self, checkpoint, plan: list) -> Iterator[tuple[object, QuantizedTensor]]:
        """The inner quantizer's tensors, those it tuned replaced, in plan order."""
        produced = list(self.inner.quantized_tensors(checkpoint, plan))
        tuned = self._tune(checkpoint, {planned.name: packed for planned, packed in produced})
        for planned, packed in produced:
            yield planned, tuned.get(planned.name, packed)

    def _tune(self, checkpoint, packed: dict[str, QuantizedTensor]) -> dict[str, QuantizedTensor]:
        from kilnlm.runtime.models import build_model

        teacher = build_model(checkpoint.config, checkpoint.tensors(), device=self.device, dtype=torch.float32)
        student = build_model(checkpoint.config, ((n, p.dequantize().float()) for n, p in packed.items()),
                              device=self.device, dtype=torch.float32)
        for parameter in [*teacher.parameters(), *student.parameters()]:
            parameter.requires_grad_(False)
        scaled, floats = self._make_trainable(student, packed)
        groups = [{"params": [p for m in scaled.values() for p in (m.log_gain, m.shift) if p is not None],
                   "lr": self.recipe.lr}]
        groups += [{"params": [p], "lr": self.recipe.lr * float(p.detach().square().mean().sqrt().clamp(min=1e-3))}
                   for p in floats.values()]
        self._train(teacher, student, torch.optim.Adam(groups))
        out = {name: module.repacked(name) for name, module in scaled.items()}
        out.update({name: QuantizedTensor.from_float(p.detach().cpu(), packed[name].format)
                    for name, p in floats.items()})
        return out

    def _make_trainable(self, student: nn.Module, packed: dict[str, QuantizedTensor]):
        """Swap block-format linears for _BlockScaledLinear; mark float norms and linears trainable."""
        scaled: dict[str, _BlockScaledLinear] = {}
        floats: dict[str, nn.Parameter] = {}
        for name, tensor in packed.items():
            if not (name.startswith("layers.") or name == "norm.weight"):
                continue
            module_name = name.removesuffix(".weight")
            if tensor.format.scale_offset is not None and len(tensor.shape) == 2:
                owner, _, attr = module_name.rpartition(".")
                scaled[name] = _BlockScaledLinear(tensor).to(self.device)
                setattr(student.get_submodule(owner), attr, scaled[name])
            elif tensor.format.name in _FLOAT_TYPES:
                floats[name] = student.get_parameter(name)
                floats[name].requires_grad_(True)
        return scaled, floats

    def _train(self, teacher: nn.Module, student: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Adam on the training windows; keeps the parameters that scored best on the held-out windows.

        The last eighth of the windows (at least one) is held out and scored before the first step and every
        tenth of the run, so the result is never worse there than what the inner quantizer produced: on a
        model that GPTQ already fits closely, Adam's first steps can only add noise. `load_calibration` puts
        model-sampled windows first, so with a mix the check runs on real text.
        """
        ids = self.ids.to(self.device)
        held_out = max(1, ids.shape[0] // 8)
        train, check = ids[:-held_out], ids[-held_out:]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        best = (self._kl(teacher, student, check), [p.detach().clone() for p in params])
        self.validation = [(0, best[0])]
        generator = torch.Generator().manual_seed(self.recipe.seed)
        every = max(1, self.recipe.steps // 10)
        for step in range(1, self.recipe.steps + 1):
            batch = train[torch.randint(0, train.shape[0], (min(self.recipe.batch, train.shape[0]),),
                                        generator=generator)]
            loss = self._kl(teacher, student, batch, grad=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.losses.append(float(loss.detach()))
            if step % every == 0 or step == self.recipe.steps:
                self.validation.append((step, self._kl(teacher, student, check)))
                if self.validation[-1][1] < best[0]:
                    best = (self.validation[-1][1], [p.detach().clone() for p in params])
            if self.on_step is not None:
                self.on_step(step, self.recipe.steps, self.losses[-1])
        with torch.no_grad():
            for p, kept in zip(params, best[1]):
                p.copy_(kept)

    def _kl(self, teacher: nn.Module, student: nn.Module, ids: torch.Tensor, grad: bool = False):
        """KL(teacher ‖ student) per token over windows ids (B, T): a tensor with grad, else a float."""
        total = torch.zeros((), device=self.device)
        with torch.set_grad_enabled(grad):
            for batch in ids.split(self.recipe.batch):
                with torch.no_grad():
                    target = torch.log_softmax(teacher(batch).float(), -1)  # (B, T, vocab)
                logp = torch.log_softmax(student(batch).float(), -1)
                total = total + F.kl_div(logp, target, log_target=True, reduction="sum")
        kl = total / ids.numel()
        return kl if grad else float(kl)
