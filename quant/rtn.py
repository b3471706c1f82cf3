"""Round-to-nearest: every tensor packed on its own by the format registry, as llama-quantize does, weighted
by an importance matrix when one is given (llama-quantize --imatrix)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kilnlm.quant.formats import QuantizedTensor
from kilnlm.quant.imatrix import ImportanceMatrix


class RoundToNearest:
    """The baseline quantizer; the writer's default."""

    def __init__(self, importance: ImportanceMatrix | None = None, importance_file: str | Path | None = None):
        self.importance = importance
        self.recipe = "rtn" if importance is None else "rtn+imatrix"
        self.metadata = {} if importance is None else _imatrix_metadata(importance, importance_file)

    def plan(self, checkpoint, plan: list) -> list:
        """The writer's plan, unchanged: one packed tensor per parameter."""
        return plan

    def quantized_tensors(self, checkpoint, plan: list) -> Iterator[tuple[object, QuantizedTensor]]:
        """Yield (planned tensor, packed tensor) for every planned tensor, one tensor in memory at a time."""
        for planned in plan:
            weight = self.importance.importance(planned.gguf_name) if self.importance is not None else None
            yield planned, QuantizedTensor.from_float(checkpoint.tensor(planned.name), planned.format, weight)


def _imatrix_metadata(importance: ImportanceMatrix, file: str | Path | None) -> dict:
    """The keys llama-quantize records about the importance matrix it used."""
    meta = {"quantize.imatrix.entries_count": len(importance.sums),
            "quantize.imatrix.chunks_count": importance.chunk_count}
    if file is not None:
        meta["quantize.imatrix.file"] = str(file)
    if importance.datasets:
        meta["quantize.imatrix.dataset"] = importance.datasets[-1]
    return meta
