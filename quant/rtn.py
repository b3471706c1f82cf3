"""Round-to-nearest: every tensor packed on its own by the format registry, as llama-quantize does."""

from __future__ import annotations

from collections.abc import Iterator

from kilnlm.quant.formats import QuantizedTensor


class RoundToNearest:
    """The baseline quantizer; the writer's default."""

    recipe = "rtn"

    def plan(self, checkpoint, plan: list) -> list:
        """The writer's plan, unchanged: one packed tensor per parameter."""
        return plan

    def quantized_tensors(self, checkpoint, plan: list) -> Iterator[tuple[object, QuantizedTensor]]:
        """Yield (planned tensor, packed tensor) for every planned tensor, one tensor in memory at a time."""
        for planned in plan:
            yield planned, QuantizedTensor.from_float(checkpoint.tensor(planned.name), planned.format)
