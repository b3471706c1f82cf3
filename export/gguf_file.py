"""A strict GGUF container parser: metadata and tensor directory, tensor bytes memory-mapped.

Our own parser rather than gguf's GGUFReader so that every malformed file (wrong magic, truncated,
absurd counts or lengths, tensors outside the file, unknown types) becomes a CheckpointError naming the
problem, before anything large is allocated. Only versions 2 and 3 (little-endian) exist in the wild.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kilnlm.errors import CheckpointError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 1 << 24  # 16 MiB: chat templates are the longest strings real files hold

# GGUF value types -> struct format of a scalar (strings and arrays are handled separately).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. shape is in torch order (GGUF stores ne0, the row length, first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        """The ggml type's name, e.g. 'Q4_0'."""
        return GGMLQuantizationType(self.ggml_type).name


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buffer: memoryview, path: Path):
        self.buffer, self.pos, self.path = buffer, 0, path

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: malformed GGUF file ({message} at byte {self.pos})")

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or self.pos + size > len(self.buffer):
            raise self.fail(f"truncated: {what} needs {size} bytes, {len(self.buffer) - self.pos} left")
        view = self.buffer[self.pos : self.pos + size]
        self.pos += size
        return view

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", what)
        if length > MAX_STRING:
            raise self.fail(f"{what} claims a string of {length} bytes")
        try:
            return bytes(self.take(length, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, kind: int, what: str) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            return self.array(what)
        raise self.fail(f"{what} has unknown value type {kind}")

    def array(self, what: str) -> list[Any]:
        kind, count = self.scalar("<I", what), self.scalar("<Q", what)
        if kind in _NUMPY:
            size = np.dtype(_NUMPY[kind]).itemsize
            if count > (len(self.buffer) - self.pos) // size:
                raise self.fail(f"{what} claims {count} elements, more than the file holds")
            values = np.frombuffer(self.take(count * size, what), dtype=_NUMPY[kind]).tolist()
            return [bool(v) for v in values] if kind == 7 else values
        if kind in (_STRING, _ARRAY):
            if count > (len(self.buffer) - self.pos) // 8:  # every element takes at least 8 bytes
                raise self.fail(f"{what} claims {count} elements, more than the file holds")
            return [self.value(kind, what) for _ in range(count)]
        raise self.fail(f"{what} is an array of unknown value type {kind}")


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> Python value) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (OSError, ValueError) as err:  # ValueError: mmap of an empty file
            raise CheckpointError(f"{self.path}: cannot read GGUF file ({err})") from None
        cursor = _Cursor(memoryview(self._map), self.path)
        self.version = self._header(cursor)
        tensor_count, kv_count = cursor.scalar("<Q", "tensor count"), cursor.scalar("<Q", "metadata count")
        self.metadata = self._metadata(cursor, kv_count)
        self.tensors = self._tensor_infos(cursor, tensor_count)

    def _header(self, cursor: _Cursor) -> int:
        magic = bytes(cursor.take(4, "magic")) if len(cursor.buffer) >= 4 else bytes(cursor.buffer)
        if magic != MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        version = cursor.scalar("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            raise CheckpointError(
                f"{self.path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS}); "
                "re-convert the model with a current llama.cpp"
            )
        return version

    def _metadata(self, cursor: _Cursor, count: int) -> dict[str, Any]:
        if count > len(cursor.buffer) // 12:  # a key-value pair takes at least 12 bytes
            raise cursor.fail(f"metadata count {count} is larger than the file could hold")
        metadata: dict[str, Any] = {}
        for _ in range(count):
            key = cursor.string("metadata key")
            if key in metadata:
                raise cursor.fail(f"duplicate metadata key {key!r}")
            metadata[key] = cursor.value(cursor.scalar("<I", f"type of {key}"), key)
        return metadata

    def _tensor_infos(self, cursor: _Cursor, count: int) -> dict[str, TensorInfo]:
        if count > len(cursor.buffer) // 24:  # name length, dims count, one dim, type, offset
            raise cursor.fail(f"tensor count {count} is larger than the file could hold")
        raw = [self._tensor_info(cursor) for _ in range(count)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cursor.fail(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-cursor.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in raw:
            if name in tensors:
                raise cursor.fail(f"duplicate tensor {name!r}")
            tensors[name] = self._place(cursor, name, shape, ggml_type, data_start + offset, alignment)
        return tensors

    def _tensor_info(self, cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cursor.string("tensor name")
        n_dims = cursor.scalar("<I", f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [cursor.scalar("<Q", f"dimensions of {name}") for _ in range(n_dims)]
        ggml_type = cursor.scalar("<I", f"type of {name}")
        offset = cursor.scalar("<Q", f"offset of {name}")
        return name, tuple(reversed(ne)), ggml_type, offset

    def _place(self, cursor: _Cursor, name: str, shape: tuple[int, ...], ggml_type: int, start: int,
               alignment: int) -> TensorInfo:
        try:
            block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise cursor.fail(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
        if any(d == 0 for d in shape) or shape[-1] % block_size:
            raise cursor.fail(f"tensor {name!r} has shape {shape}, invalid for its type (block size {block_size})")
        nbytes = math.prod(shape) // block_size * block_bytes
        if start % alignment or start + nbytes > len(cursor.buffer):
            raise cursor.fail(f"tensor {name!r} data ({nbytes} bytes at offset {start}) lies outside the file "
                              f"of {len(cursor.buffer)} bytes or is misaligned")
        return TensorInfo(name, shape, ggml_type, start, nbytes)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a read-only uint8 view of the file (no copy)."""
        info = self.tensors[name]
        array = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return torch.from_numpy(array) if array.flags.writeable else _readonly_tensor(array)

    def close(self) -> None:
        """Release the memory map (tensors still referencing it keep it alive)."""
        self._map = None


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    # torch warns on read-only numpy buffers; the views are only ever read, and copies happen on conversion.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)
