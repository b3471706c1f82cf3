"""CPU kernels: Y = X · Wᵀ straight from ggml blocks (the GGUF file's bytes), embedding rows gathered from them, and
decode attention.

The kernel is `cpu.c`, compiled at first use by the user's C compiler (`$CC`, else cc / gcc / clang) with
-O3 -march=native and OpenMP, and cached under `$XDG_CACHE_HOME/kilnlm` (or ~/.cache/kilnlm) by a hash of the
source, the compiler and the CPU, so a rebuild happens only when one of them changes (about a second). Why a
kernel of our own: torch's CPU kernels do not fit ggml's formats exactly (`_weight_int8pack_mm` has one scale
per row, not per 32 weights; `_weight_int4pack_mm_for_cpu` is fast only with bf16 activations and bf16 scales,
which round ggml's fp16 scales) and torch has nothing for the K-quants; see `benchmarks/cpu.py` for the
measured alternatives.

Without a compiler `GGMLMatrix` still keeps the bytes packed and the pure-torch reference runs: it dequantises
a few rows at a time through the format registry and multiplies (slower). Which one runs is decided in one
place, `cpu_kernels()`, and reported by `kernel_status()`.

Decode rows (M <= MAX_GEMV_ROWS) stream each weight row once for all x rows (memory-bound, the file's bytes
per weight); longer inputs (prefill) dequantise chunks of rows into one float32 buffer and hand them to
torch's GEMM, which is compute-bound there.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kilnlm.errors import KilnError

__all__ = ["CpuOptions", "GGMLMatrix", "decode_attention", "MAX_GEMV_ROWS", "cpu_kernels", "ggml_embedding", "ggml_embedding_ref", "ggml_matmul",
           "ggml_matmul_ref", "kernel_status", "supports"]

MAX_GEMV_ROWS = 8  # x rows up to this stream W once (MAX_ROWS in cpu.c); more dequantise chunks for the GEMM
_CHUNK_FLOATS = 1 << 21  # the prefill path's dequantised chunk: 8 MiB of float32, within L2 + L3
_SOURCE = Path(__file__).with_name("cpu.c")
# ggml type ids (ggml.h) with the weights per block and bytes per block cpu.c multiplies through.
_BLOCKS = {0: (32, 128), 1: (32, 64), 30: (32, 64), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
           8: (32, 34), 12: (256, 144), 13: (256, 176), 14: (256, 210)}


class CpuKernelError(KilnError):
    """The CPU kernel library could not be used (bad input, or a build that failed)."""


ACTIVATIONS = {"i16": 16, "i8": 8, "f32": 32}  # the decode kernels' activation types and their bits


@dataclass(frozen=True)
class CpuOptions:
    """How the CPU kernels multiply at decode (x rows <= MAX_GEMV_ROWS) on `threads` threads.

    activations: block formats on x86 with AVX2 quantise x per 32 values and take integer dot products: "i16"
    (int16, outputs within ~2e-5 of float32's, 2-3x faster than "f32"), "i8" (llama.cpp's own Q8_0 activations,
    ~5e-3, 10-20% faster again) or "f32" (the dequantised model's float32 products, up to summation order).
    Prefill always multiplies in float32, and F16 / BF16 matrices always take float32 products."""

    threads: int = 1
    activations: str = "i16"

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise CpuKernelError(f"CPU activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        if self.threads < 1:
            raise CpuKernelError(f"threads must be at least 1, got {self.threads}")


@dataclass(frozen=True)
class GGMLMatrix:
    """A weight matrix kept in ggml's block layout on the CPU.

    ggml_type:  the GGUF/ggml tensor type id (2 = Q4_0, 8 = Q8_0, 14 = Q6_K, 1 = F16, ...).
    shape:      (N, K) = (out_features, in_features), rows in HF order.
    data:       uint8 (N, K // block * bytes_per_block): each row its K // block blocks, as in the file.
    dequantize: rows of `data` (R, row bytes) -> float32 (R, K); the format registry's reference, used by the
                pure-torch path and the tests (kernels sit below quant, so it is handed in, not imported).
    """

    ggml_type: int
    shape: tuple[int, int]
    data: torch.Tensor
    dequantize: Callable[[torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if not supports(self.ggml_type, self.shape[1]):
            raise CpuKernelError(f"ggml type {self.ggml_type} with {self.shape[1]} columns has no CPU kernel")
        block, nbytes = _BLOCKS[self.ggml_type]
        expected = (self.shape[0], self.shape[1] // block * nbytes)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != expected or not self.data.is_contiguous():
            raise CpuKernelError(f"a {self.shape} matrix of ggml type {self.ggml_type} needs contiguous uint8 data "
                                 f"{expected}, got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def nbytes(self) -> int:
        """Bytes the matrix holds in memory (the file's bytes)."""
        return self.data.numel()


def supports(ggml_type: int, columns: int) -> bool:
    """Whether the CPU kernels multiply through a matrix of `ggml_type` with `columns` input features."""
    return ggml_type in _BLOCKS and columns % _BLOCKS[ggml_type][0] == 0


# ------------------------------------------------------------------------------------------ the library


class _Library:
    """The compiled cpu.c, called through ctypes (the calls release the GIL)."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.kiln_matmul.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int, ctypes.c_int]
        lib.kiln_dequant_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
        lib.kiln_decode_attention.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, ctypes.c_int]
        lib.kiln_matmul.restype = lib.kiln_dequant_rows.restype = lib.kiln_decode_attention.restype = ctypes.c_int
        self._lib, self.path, self.openmp = lib, path, bool(lib.kiln_has_openmp())

    def matmul(self, x: torch.Tensor, w: GGMLMatrix, out: torch.Tensor, options: CpuOptions) -> None:
        """out (M, N) = x (M, K) · Wᵀ; x and out contiguous float32."""
        n, k = w.shape
        rc = self._lib.kiln_matmul(w.ggml_type, w.data.data_ptr(), w.data.shape[1], n, k, x.data_ptr(), x.shape[0],
                                   out.data_ptr(), options.threads, ACTIVATIONS[options.activations])
        if rc:
            raise CpuKernelError(f"kiln_matmul refused ggml type {w.ggml_type} {w.shape}")

    def rows(self, w: GGMLMatrix, index: torch.Tensor | None, first: int, count: int, out: torch.Tensor,
             threads: int) -> None:
        """out (count, K) float32 = rows index[0..count) of W, or rows first..first+count without an index."""
        base = w.data[first:] if index is None else w.data
        rc = self._lib.kiln_dequant_rows(w.ggml_type, base.data_ptr(), w.data.shape[1], w.shape[1],
                                         None if index is None else index.data_ptr(), count, out.data_ptr(), threads)
        if rc:
            raise CpuKernelError(f"kiln_dequant_rows refused ggml type {w.ggml_type} {w.shape}")


    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, window: int,
                         threads: int) -> None:
        """out (B, Hq, D) for q (B, Hq, D) over k, v (B, Hkv, S, D) with unit stride along D and contiguous rows."""
        batch, heads, dim = q.shape
        rc = self._lib.kiln_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), batch, heads,
                                             k.shape[1], k.shape[2], dim, k.stride(0), k.stride(1), window, threads)
        if rc:
            raise CpuKernelError(f"kiln_decode_attention refused q {tuple(q.shape)}, k {tuple(k.shape)} (rc {rc})")


@dataclass(frozen=True)
class KernelStatus:
    """Which CPU path multiplies through packed weights, and why."""

    compiled: bool
    detail: str  # the library's path and flags, or why it could not be built


@functools.cache
def _build() -> tuple[_Library | None, str]:
    # A cache of a compiled file keyed by everything that shapes it (source, compiler, CPU), like Triton's: the
    # one process-wide object here, holding no settings.
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        return None, "no C compiler found (install gcc or clang, or set CC)"
    native = "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else "-march=native"
    attempts = (["-O3", native, "-fopenmp"], ["-O3", native], ["-O3"])
    errors = []
    for flags in attempts:
        path = _cache_dir() / f"kilnlm_cpu-{_build_key(compiler, flags)}{_suffix()}"
        if not path.exists():
            error = _compile(compiler, flags, path)
            if error:
                errors.append(f"{' '.join([compiler, *flags])}: {error}")
                continue
        try:
            return _Library(path), f"{path} ({' '.join(flags)})"
        except OSError as err:
            errors.append(f"loading {path}: {err}")
    return None, "the C kernels did not build: " + " | ".join(errors)


def cpu_kernels() -> _Library | None:
    """The compiled CPU kernels, built on first use; None when this machine cannot build them (see kernel_status)."""
    return _build()[0]


def kernel_status() -> KernelStatus:
    """Whether packed CPU weights run through the compiled kernels or the pure-torch reference, and why."""
    library, detail = _build()
    return KernelStatus(library is not None, detail)


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "kilnlm"


def _suffix() -> str:
    return ".dll" if sys.platform == "win32" else ".dylib" if sys.platform == "darwin" else ".so"


def _build_key(compiler: str, flags: list[str]) -> str:
    digest = hashlib.sha256(_SOURCE.read_bytes())
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    cpu = ""
    if Path("/proc/cpuinfo").exists():  # -march=native code is only valid on the CPU it was built for
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    for part in (version, " ".join(flags), platform.machine(), platform.processor(), cpu):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _compile(compiler: str, flags: list[str], path: Path) -> str | None:
    """Compile to a temporary name beside `path` and rename it there (two processes may race; both win)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(handle)
    except OSError as err:
        return f"cannot write to {path.parent} ({err})"
    try:
        result = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", tmp, str(_SOURCE)], capture_output=True,
                                text=True, timeout=300)
        if result.returncode:
            lines = result.stderr.strip().splitlines()
            return next((line for line in lines if "error" in line), lines[-1] if lines else "failed")
        os.replace(tmp, path)
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------ matmul and gather


def ggml_matmul(x: torch.Tensor, w: GGMLMatrix, options: CpuOptions) -> torch.Tensor:
    """x (..., K) · Wᵀ -> (..., N) in x's dtype, through the compiled kernels (the reference without them)."""
    library = cpu_kernels()
    if library is None:
        return ggml_matmul_ref(x, w)
    n, k = w.shape
    if x.shape[-1] != k or not x.is_cpu:
        raise CpuKernelError(f"x {tuple(x.shape)} on {x.device} does not fit a CPU weight {w.shape}")
    rows = x.reshape(-1, k)
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.to(torch.float32).contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    if rows.shape[0] <= MAX_GEMV_ROWS:  # decode: this call is per token, so it stays lean
        library.matmul(rows, w, out, options)
    else:
        chunk = max(16, _CHUNK_FLOATS // k)
        buffer = torch.empty(min(chunk, n), k, dtype=torch.float32)
        for first in range(0, n, chunk):
            count = min(chunk, n - first)
            library.rows(w, None, first, count, buffer, options.threads)
            out[:, first:first + count] = rows @ buffer[:count].T
    out = out.view(*x.shape[:-1], n)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def ggml_matmul_ref(x: torch.Tensor, w: GGMLMatrix) -> torch.Tensor:
    """Pure-torch reference: dequantise a few rows at a time through the registry and multiply (float32)."""
    n, k = w.shape
    rows = x.reshape(-1, k).to(torch.float32)
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    chunk = max(16, _CHUNK_FLOATS // k)
    for first in range(0, n, chunk):
        out[:, first:first + chunk] = rows @ w.dequantize(w.data[first:first + chunk]).T
    return out.reshape(*x.shape[:-1], n).to(x.dtype)


def ggml_embedding(ids: torch.Tensor, w: GGMLMatrix, options: CpuOptions) -> torch.Tensor:
    """Rows `ids` (any shape) of W as float32 (*ids.shape, K)."""
    library = cpu_kernels()
    if library is None:
        return ggml_embedding_ref(ids, w)
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= w.shape[0]):
        raise IndexError(f"token id out of range for an embedding of {w.shape[0]} rows")
    out = torch.empty(flat.numel(), w.shape[1], dtype=torch.float32)
    library.rows(w, flat, 0, flat.numel(), out, options.threads)
    return out.reshape(*ids.shape, w.shape[1])


def ggml_embedding_ref(ids: torch.Tensor, w: GGMLMatrix) -> torch.Tensor:
    """Pure-torch reference of ggml_embedding."""
    flat = ids.reshape(-1).to(torch.int64)
    return w.dequantize(w.data[flat]).reshape(*ids.shape, w.shape[1])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, threads: int
                     ) -> torch.Tensor | None:
    """Attention of one query per sequence and head, q (B, Hq, 1, D), over float32 k, v (B, Hkv, S, D) whose rows
    are contiguous (a cache's buffers); None when the compiled kernels cannot take these tensors (the caller then
    runs kernels.attention's reference, which this matches up to float32 summation order)."""
    library = cpu_kernels()
    if library is None or q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32:
        return None
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride(2) != k.shape[-1] or v.stride() != k.stride():
        return None
    if q.shape[-1] % 16 or q.shape[-1] > 256:  # head sizes the kernel's registers hold
        return None
    if window == 0:  # no key is visible: the reference's zeros
        return torch.zeros_like(q)
    batch, heads, _, dim = q.shape
    query = q.reshape(batch, heads, dim).contiguous()
    out = torch.empty(batch, heads, dim, dtype=torch.float32)
    library.decode_attention(query, k, v, out, window or 0, threads)
    return out.view(batch, heads, 1, dim)
