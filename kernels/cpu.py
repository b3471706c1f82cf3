"""CPU kernels: Y = X · Wᵀ straight from ggml blocks (the GGUF file's bytes), embedding rows gathered from them,
float32 RMSNorm and RoPE, decode attention over a float cache, and a whole decode step of Llama-family blocks
(decode_blocks, whose reference is the model's own modules: runtime.models.cpu_decode).

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

Decode steps and short prompts (M <= MAX_GEMV_ROWS) stream each weight row once for all x rows (memory-bound,
the file's bytes per weight); longer prompts dequantise chunks of rows into one float32 buffer and hand them to
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

__all__ = ["CpuOptions", "GGMLMatrix", "MAX_GEMV_ROWS", "apply_rotary", "cpu_kernels", "decode_attention", "ggml_embedding",
           "ggml_embedding_ref", "ggml_matmul", "ggml_matmul_ref", "kernel_status", "rms_norm", "supports",
           "DecodeBlock", "DecodeBlocks", "decode_blocks"]

# x rows up to which cpu.c streams W once (each dequantised group serving 8 x rows a pass, MAX_ROWS there); more
# dequantise chunks for torch's GEMM. Measured on 2 Zen 4 cores, 8192x2048, ms row kernels / dequant + GEMM:
# Q4_0 16 rows 7.2 / 15.0, 32 rows 14.4 / 16.5, 64 rows 26.1 / 23.4; Q4_K 32 rows 13.8 / 17.7; F16 32 rows
# 14.4 / 17.0. On a 1B-parameter Q8_0 model a 12-token prompt took 0.52 s against 2.47 s.
MAX_GEMV_ROWS = 32
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
    """How the CPU kernels multiply on `threads` threads.

    activations: a decode step of one sequence (one x row) through a block format, on x86 with AVX2, quantises x
    per 32 values and takes integer dot products: "i16" (int16, outputs within ~2e-5 of float32's, ~2x faster
    than "f32"), "i8" (llama.cpp's own Q8_0 activations, ~5e-3, faster again on Q4_0 and the K-quants) or "f32"
    (the dequantised model's float32 products, up to summation order). Several rows (batched decode, prompts)
    and F16 / BF16 matrices always take float32 products."""

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
    data:       uint8 (N, K // block * bytes_per_block): each row its K // block blocks, as in the file (float
                types: K elements, any K).
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
        expected = (self.shape[0], self.shape[1] * nbytes // block)  # whole blocks, or float elements
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != expected or not self.data.is_contiguous():
            raise CpuKernelError(f"a {self.shape} matrix of ggml type {self.ggml_type} needs contiguous uint8 data "
                                 f"{expected}, got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def nbytes(self) -> int:
        """Bytes the matrix holds in memory (the file's bytes)."""
        return self.data.numel()


def supports(ggml_type: int, columns: int) -> bool:
    """Whether the CPU kernels multiply through a matrix of `ggml_type` with `columns` input features."""
    return ggml_type in _BLOCKS and (ggml_type in _FLOAT_TYPES.values() or columns % _BLOCKS[ggml_type][0] == 0)


# ------------------------------------------------------------------------------------------ the library


class _Library:
    """The compiled cpu.c, called through ctypes (the calls release the GIL)."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.kiln_matmul.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int, ctypes.c_int]
        lib.kiln_dequant_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
        lib.kiln_decode_attention.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_int, i64, i64, i64, i64, i64, i64, i64,
                                              i64, ctypes.c_int]
        lib.kiln_rms_norm.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
        lib.kiln_rotary.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr]
        lib.kiln_decode_layers.argtypes = [ctypes.POINTER(_Dims), ctypes.POINTER(_Block), i64, ptr, i64, ptr, ptr]
        for function in (lib.kiln_matmul, lib.kiln_dequant_rows, lib.kiln_decode_attention, lib.kiln_rms_norm,
                         lib.kiln_rotary, lib.kiln_decode_layers):
            function.restype = ctypes.c_int
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
        """out (B, Hq, D) for q (B, Hq, D) over k, v (B, Hkv, S, D) (float32, float16 or bfloat16, as stored) with
        unit stride along D and contiguous rows."""
        batch, heads, dim = q.shape
        rc = self._lib.kiln_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                             _FLOAT_TYPES[k.dtype], batch, heads, k.shape[1], k.shape[2], dim,
                                             k.stride(0), k.stride(1), window, threads)
        if rc:
            raise CpuKernelError(f"kiln_decode_attention refused q {tuple(q.shape)}, k {tuple(k.shape)} (rc {rc})")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float, threads: int) -> None:
        """out = RMSNorm of the rows of x (contiguous float32, like weight and out)."""
        dim = x.shape[-1]
        self._lib.kiln_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps, threads)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
        """out (B, H, T, D) contiguous = x rotated; x float32 with unit stride along D, cos / sin contiguous (T, D) or
        (B, T, D)."""
        batch, heads, length, dim = x.shape
        table_stride = length * dim if cos.ndim == 3 else 0
        rc = self._lib.kiln_rotary(x.data_ptr(), batch, heads, length, dim, x.stride(0), x.stride(1), x.stride(2),
                                   cos.data_ptr(), sin.data_ptr(), table_stride, out.data_ptr())
        if rc:
            raise CpuKernelError(f"kiln_rotary refused x {tuple(x.shape)}")


_FLOAT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}  # the ggml ids cpu.c names them by


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
    """Attention of one float32 query per sequence and head, q (B, Hq, 1, D), over k, v (B, Hkv, S, D) stored as
    float32, float16 or bfloat16 (read as stored, not converted) with contiguous rows (a cache's buffers); None when
    the compiled kernels cannot take these tensors (the caller then runs kernels.attention's reference, which this
    matches up to float32 summation order)."""
    library = cpu_kernels()
    if library is None or q.dtype != torch.float32 or k.dtype not in _FLOAT_TYPES or v.dtype != k.dtype:
        return None
    if _tracks_grad(q, k, v):
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


def _tracks_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd follows these tensors (quant.tune trains through the model): the C kernels have no backward,
    so the references run then."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, threads: int) -> torch.Tensor | None:
    """kernels.norm.rms_norm_ref of float32 x and weight in one pass per row; None when the compiled kernels cannot
    take them."""
    library = cpu_kernels()
    if library is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != x.shape[-1:]:
        return None
    if _tracks_grad(x, weight):
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    library.rms_norm(x, weight.contiguous(), out, eps, threads)
    return out


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """kernels.rope.apply_rotary_ref for float32 q, k and tables, into new contiguous tensors; None when the compiled
    kernels cannot take them."""
    library = cpu_kernels()
    tensors = (q, k, cos, sin)
    if library is None or any(t.dtype != torch.float32 for t in tensors) or q.stride(-1) != 1 or k.stride(-1) != 1:
        return None
    if _tracks_grad(*tensors):
        return None
    batch, _, length, dim = q.shape
    if cos.shape not in ((length, dim), (batch, length, dim)) or sin.shape != cos.shape:
        return None
    cos, sin = cos.contiguous(), sin.contiguous()
    rotated = []
    for x in (q, k):
        out = torch.empty(x.shape, dtype=torch.float32)
        library.rotary(x, cos, sin, out)
        rotated.append(out)
    return rotated[0], rotated[1]


# ------------------------------------------------------------------------------ a whole decode step of blocks


class _Matrix(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int64), ("data", ctypes.c_void_p), ("row_bytes", ctypes.c_int64),
                ("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("bias", ctypes.c_void_p)]


_MAX_PARTS = 4  # MAX_PARTS in cpu.c: matrices whose outputs make up q|k|v or gate|up


class _Block(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv", _Matrix * _MAX_PARTS),
                ("qkv_parts", ctypes.c_int64), ("o", _Matrix), ("gate_up", _Matrix * _MAX_PARTS),
                ("gate_up_parts", ctypes.c_int64), ("down", _Matrix), ("keys", ctypes.c_void_p),
                ("values", ctypes.c_void_p), ("window", ctypes.c_int64)]


class _Dims(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64), ("capacity", ctypes.c_int64),
                ("cache_type", ctypes.c_int64), ("eps", ctypes.c_float), ("threads", ctypes.c_int32),
                ("activation_bits", ctypes.c_int32)]


Part = tuple[GGMLMatrix, "torch.Tensor | None"]  # a matrix and its float32 bias (None: no bias)


@dataclass(frozen=True)
class DecodeBlock:
    """One pre-norm block (RMSNorm -> GQA attention with RoPE -> residual, RMSNorm -> SwiGLU -> residual) of one
    sequence, as decode_blocks takes it: float32 norm weights, the projections in ggml blocks (qkv: parts whose
    outputs concatenate to q | k | v; gate_up: to gate | up), and the layer's cache buffers keys / values
    (kv_heads, capacity, head_dim) in float32, float16 or bfloat16, contiguous."""

    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    qkv: tuple[Part, ...]
    o: Part
    gate_up: tuple[Part, ...]
    down: Part
    keys: torch.Tensor
    values: torch.Tensor
    window: int | None


class DecodeBlocks:
    """Blocks prepared once (ctypes structures pointing at their tensors, which this object keeps alive) for
    decode steps of one sequence; calling it runs every block on x in place, in one call into cpu.c."""

    def __init__(self, library: _Library, blocks: list[DecodeBlock], heads: int, eps: float, options: CpuOptions):
        first = blocks[0]
        kv_heads, capacity, head_dim = first.keys.shape
        hidden = first.attn_norm.shape[0]
        intermediate = sum(w.shape[0] for w, _ in first.gate_up) // 2
        self._dims = _Dims(hidden, heads, kv_heads, head_dim, intermediate, capacity, _FLOAT_TYPES[first.keys.dtype],
                           eps, options.threads, ACTIVATIONS[options.activations])
        self._blocks = (_Block * len(blocks))(*(self._block(b) for b in blocks))
        self._held = blocks
        self._library, self.capacity = library, capacity

    @staticmethod
    def _matrix(part: Part) -> _Matrix:
        w, bias = part
        return _Matrix(w.ggml_type, w.data.data_ptr(), w.data.shape[1], w.shape[0], w.shape[1],
                       None if bias is None else bias.data_ptr())

    def _block(self, block: DecodeBlock) -> _Block:
        for part in (*block.qkv, *block.gate_up, block.o, block.down):
            if part[1] is not None and (part[1].dtype != torch.float32 or not part[1].is_contiguous()):
                raise CpuKernelError("decode_blocks takes contiguous float32 biases")
        qkv = (_Matrix * _MAX_PARTS)(*(self._matrix(p) for p in block.qkv))
        gate_up = (_Matrix * _MAX_PARTS)(*(self._matrix(p) for p in block.gate_up))
        return _Block(block.attn_norm.data_ptr(), block.mlp_norm.data_ptr(), qkv, len(block.qkv),
                      self._matrix(block.o), gate_up, len(block.gate_up), self._matrix(block.down),
                      block.keys.data_ptr(), block.values.data_ptr(), block.window or 0)

    def __call__(self, x: torch.Tensor, position: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """x: (hidden,) float32 contiguous, updated in place; cos / sin: (head_dim,) float32 for `position`."""
        rc = self._library._lib.kiln_decode_layers(ctypes.byref(self._dims), self._blocks, len(self._held),
                                                   x.data_ptr(), position, cos.data_ptr(), sin.data_ptr())
        if rc:
            raise CpuKernelError(f"kiln_decode_layers failed at position {position} (rc {rc})")


def decode_blocks(blocks: list[DecodeBlock], heads: int, eps: float, options: CpuOptions) -> DecodeBlocks | None:
    """The compiled decode step over `blocks`, or None when the kernels cannot take them (no compiler, a part
    split more than cpu.c holds, a head size or cache type it does not read); the caller runs its modules then,
    which are this step's reference (tests/test_cpu_kernels.py compares the two)."""
    library = cpu_kernels()
    if library is None or not blocks:
        return None
    kv_heads, _, head_dim = blocks[0].keys.shape
    for block in blocks:
        tensors = (block.attn_norm, block.mlp_norm, block.keys, block.values)
        if len(block.qkv) > _MAX_PARTS or len(block.gate_up) > _MAX_PARTS or not all(t.is_contiguous() for t in tensors):
            return None
        if block.keys.dtype not in _FLOAT_TYPES or block.values.dtype != block.keys.dtype or \
                block.keys.shape != blocks[0].keys.shape or block.values.shape != block.keys.shape:
            return None
        if block.attn_norm.dtype != torch.float32 or block.mlp_norm.dtype != torch.float32:
            return None
    if head_dim % 16 or head_dim > 256 or heads % kv_heads:
        return None
    if not all(_shapes_fit(block, heads, kv_heads, head_dim) for block in blocks):
        return None  # cpu.c trusts the shapes: anything else stays with the modules
    return DecodeBlocks(library, blocks, heads, eps, options)


def _shapes_fit(block: DecodeBlock, heads: int, kv_heads: int, head_dim: int) -> bool:
    hidden = block.attn_norm.shape[0]
    intermediate = sum(w.shape[0] for w, _ in block.gate_up) // 2

    def rows(parts: tuple[Part, ...], total: int, columns: int) -> bool:
        return sum(w.shape[0] for w, _ in parts) == total and all(
            w.shape[1] == columns and (bias is None or bias.shape == (w.shape[0],)) for w, bias in parts)

    return (block.mlp_norm.shape == (hidden,) and rows(block.qkv, (heads + 2 * kv_heads) * head_dim, hidden)
            and rows((block.o,), hidden, heads * head_dim) and rows(block.gate_up, 2 * intermediate, hidden)
            and rows((block.down,), hidden, intermediate))
