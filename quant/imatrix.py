"""Importance matrices, llama.cpp's way: per input column of every block linear, the mean square of the
activations it multiplied over a calibration text. Quantizers weight each weight's rounding error by its
column's importance (llama-quantize --imatrix, and `kiln quantize --imatrix`).

`collect` runs the model over the text as llama-imatrix does: the tokens in chunks of `ctx`, each starting
with BOS, every token's activations counted. Files are written in llama-imatrix's GGUF form (general.type
"imatrix"; per weight `<name>.in_sum2`, the sum of squares per column, and `<name>.counts`, the rows summed;
imatrix.datasets / chunk_count / chunk_size) and read in that form or its legacy binary one (.dat: per weight
the mean square times the call count). Names are the GGUF tensor names ("blk.0.attn_q.weight").
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kilnlm.errors import KilnError

GGUF_MAGIC = b"GGUF"


class ImatrixError(KilnError):
    """An importance-matrix file that cannot be read, or one that does not fit the model."""


@dataclass
class ImportanceMatrix:
    """Sums of squared activations per input column, and how many rows were summed, by GGUF weight name."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float64 (columns,)
    counts: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> torch.Tensor | None:
        """The mean square per column of weight `name` (float32), or None when the file has no entry for it."""
        if name not in self.sums or self.counts.get(name, 0) <= 0:
            return None
        return torch.from_numpy((self.sums[name] / self.counts[name]).astype(np.float32))

    def save(self, path: str | Path) -> None:
        """Write llama-imatrix's GGUF form, atomically."""
        path = Path(path)
        check_output(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        writer = gguf.GGUFWriter(tmp, arch=None)
        try:
            writer.add_type("imatrix")
            writer.add_array("imatrix.datasets", self.datasets)
            writer.add_uint32("imatrix.chunk_count", self.chunk_count)
            writer.add_uint32("imatrix.chunk_size", self.chunk_size)
            for name in sorted(self.sums):  # llama-imatrix's deterministic order
                writer.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32)[None, :])
                writer.add_tensor(f"{name}.counts", np.array([[float(self.counts[name])]], dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, path)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> ImportanceMatrix:
        """Read an importance matrix written by llama-imatrix or kilnlm (GGUF or legacy .dat)."""
        path = Path(path)
        try:
            head = path.open("rb").read(4)
        except OSError as err:
            raise ImatrixError(f"{path}: cannot read the importance matrix ({err})") from None
        return cls._load_gguf(path) if head == GGUF_MAGIC else cls._load_legacy(path)

    @classmethod
    def _load_gguf(cls, path: Path) -> ImportanceMatrix:
        try:
            reader = gguf.GGUFReader(path)
        except Exception as err:  # gguf raises ValueError, struct errors, ... for a damaged file
            raise ImatrixError(f"{path}: not a readable GGUF file ({err})") from None
        kind = reader.fields.get("general.type")
        if kind is None or kind.contents() != "imatrix":
            raise ImatrixError(f"{path}: a GGUF file, but not an importance matrix (general.type is not 'imatrix')")
        tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
        matrix = cls(datasets=list(_field(reader, "imatrix.datasets", [])),
                     chunk_count=int(_field(reader, "imatrix.chunk_count", 0)),
                     chunk_size=int(_field(reader, "imatrix.chunk_size", 0)))
        for key, values in tensors.items():
            if not key.endswith(".in_sum2"):
                continue
            name = key.removesuffix(".in_sum2")
            counts = tensors.get(f"{name}.counts")
            if counts is None or counts.size != 1:
                raise ImatrixError(f"{path}: {name} has no single count (mixture-of-experts entries are not "
                                   "supported)")
            matrix.sums[name], matrix.counts[name] = values.reshape(-1), int(counts.reshape(-1)[0])
        return matrix

    @classmethod
    def _load_legacy(cls, path: Path) -> ImportanceMatrix:
        data = path.read_bytes()
        reader = _Bytes(data, path)
        matrix = cls()
        for _ in range(reader.int32("entry count")):
            name = reader.text("entry name")
            ncall, nval = reader.int32(f"{name}: call count"), reader.int32(f"{name}: value count")
            values = np.frombuffer(reader.take(4 * nval, f"{name}: values"), dtype="<f4").astype(np.float64)
            # The legacy form stores mean * ncall and llama-quantize divides by ncall: as sums over ncall rows.
            matrix.sums[name], matrix.counts[name] = values, max(ncall, 1)
        if reader.left() >= 4:
            matrix.chunk_count = reader.int32("chunk count")
            if reader.left() >= 4:
                matrix.datasets = [reader.text("dataset")]
        return matrix


def check_output(path: str | Path) -> None:
    """Refuse an output path whose folder does not exist (before any slow work is done for it)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ImatrixError(f"{path}: the folder {path.parent} does not exist")


def collect(model: nn.Module, tokens: list[int], *, ctx: int, bos_id: int | None, source: str,
            gguf_name: Callable[[str], str], max_chunks: int | None = None, progress: bool = True) -> ImportanceMatrix:
    """Run `model` over `tokens` in chunks of `ctx` (each starting with BOS when the model has one) and sum the
    squared inputs of every block linear per column."""
    n_chunks = len(tokens) // ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks < 1:
        raise ImatrixError(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of {ctx}; give more "
                           "text or a smaller --ctx")
    matrix = ImportanceMatrix(datasets=[source], chunk_size=ctx)
    device = next(model.parameters()).device
    hooks = [module.register_forward_pre_hook(_accumulator(matrix, gguf_name(f"{name}.weight")))
             for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.startswith("layers.")]
    try:
        with torch.inference_mode():
            for chunk in tqdm(range(n_chunks), desc="imatrix", unit="chunk", file=sys.stderr, disable=not progress):
                ids = list(tokens[chunk * ctx:(chunk + 1) * ctx])
                if bos_id is not None:
                    ids[0] = bos_id
                model(torch.tensor([ids], device=device), model.new_cache(ctx), last_logits_only=True)
                matrix.chunk_count += 1
    finally:
        for hook in hooks:
            hook.remove()
    return matrix


def _accumulator(matrix: ImportanceMatrix, name: str):
    def hook(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        squares = (x * x).sum(dim=0).cpu().numpy()
        if name in matrix.sums:
            matrix.sums[name] += squares
        else:
            matrix.sums[name] = squares
        matrix.counts[name] = matrix.counts.get(name, 0) + x.shape[0]
    return hook


def _field(reader: gguf.GGUFReader, key: str, default):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class _Bytes:
    """A little-endian reader of the legacy .dat layout that names what is missing when the file is short."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.offset, self.path = data, 0, path

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise ImatrixError(f"{self.path}: not an importance matrix (GGUF or llama.cpp's legacy .dat): the file "
                               f"ends before {what}")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def int32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    def text(self, what: str) -> str:
        size = self.int32(f"{what} length")
        if size > 4096:
            raise ImatrixError(f"{self.path}: not an importance matrix ({what} claims {size} bytes)")
        return self.take(size, what).decode("utf-8", "replace")

    def left(self) -> int:
        return len(self.data) - self.offset
