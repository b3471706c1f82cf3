"""Write tests/data/kquant_reference.npz: llama.cpp's own K-quant bytes for fixed inputs, the oracle of
tests/test_kquants.py.

The bytes come from ggml-quants.c itself (quantize_row_*_ref, and quantize_* with an importance matrix),
compiled here into a small shared library with a few stubs for the ggml symbols it calls:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    python scripts/make_kquant_reference.py llama_cpp_python-*/vendor/llama.cpp

It compiles with -ffp-contract=off: the reference is the C code's float32 arithmetic, without fused
multiply-adds (a build with -march=native may contract some products into FMAs and round differently).
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "abort %s:%d\n", file, line); abort(); }
static size_t block(enum ggml_type t) { return t == GGML_TYPE_Q4_0 || t == GGML_TYPE_Q4_1 || t == GGML_TYPE_Q5_0 ||
                                               t == GGML_TYPE_Q5_1 ? 32 : 256; }
size_t ggml_type_size(enum ggml_type t) { switch (t) {
  case GGML_TYPE_Q2_K: return 84; case GGML_TYPE_Q3_K: return 110; case GGML_TYPE_Q4_K: return 144;
  case GGML_TYPE_Q5_K: return 176; case GGML_TYPE_Q6_K: return 210; case GGML_TYPE_Q5_0: return 22;
  case GGML_TYPE_Q5_1: return 24; case GGML_TYPE_Q4_0: return 18; case GGML_TYPE_Q4_1: return 20;
  default: abort(); } }
size_t ggml_row_size(enum ggml_type t, int64_t ne) { return ggml_type_size(t) * ne / block(t); }
const char * ggml_type_name(enum ggml_type t) { return "?"; }
"""
FORMATS = {"q2_k": ("q2_K", 256, 84), "q3_k": ("q3_K", 256, 110), "q4_k": ("q4_K", 256, 144),
           "q5_k": ("q5_K", 256, 176), "q6_k": ("q6_K", 256, 210)}
# Legacy formats: without an importance matrix gguf-py's numpy port is the oracle; with one, only ggml's C.
WEIGHTED_LEGACY = {"q4_0": ("q4_0", 32, 18), "q4_1": ("q4_1", 32, 20), "q5_0": ("q5_0", 32, 22),
                   "q5_1": ("q5_1", 32, 24)}


def reference_inputs() -> dict[str, np.ndarray]:
    """The inputs, (rows, 512) float32 each: shapes of weights that stress different parts of the searches."""
    rng = np.random.default_rng(20261202)
    zeros = rng.standard_normal((6, 512)).astype(np.float32)
    zeros[0] = 0  # all-zero blocks
    zeros[1, :256] = 0
    zeros[2, ::3] = 0
    zeros[3] = np.abs(zeros[3])  # no negative weights: the min is clamped to 0
    zeros[4] = -np.abs(zeros[4])
    zeros[5] = 0.25  # constant blocks
    return {
        "normal": rng.standard_normal((8, 512)).astype(np.float32),
        "scaled": (rng.standard_normal((8, 512)) * rng.uniform(1e-3, 30, (8, 1))).astype(np.float32),
        "heavy_tailed": rng.standard_t(2.5, (8, 512)).astype(np.float32),
        "edge_cases": zeros,
        "ties": rng.integers(-4, 5, (6, 512)).astype(np.float32) / 4,
    }


def importance(x: np.ndarray, seed: int) -> np.ndarray:
    """An importance matrix row (per column, positive) as llama-imatrix's mean squared activations look."""
    return (np.random.default_rng(seed).gamma(0.5, 2.0, x.shape[1]) + 1e-3).astype(np.float32)


def build(llama_cpp: Path, folder: Path) -> ctypes.CDLL:
    ggml = llama_cpp / "ggml"
    (folder / "stubs.c").write_text(STUBS)
    flags = ["-O2", "-ffp-contract=off", "-fPIC", f"-I{ggml / 'include'}", f"-I{ggml / 'src'}"]
    for source in (ggml / "src" / "ggml-quants.c", folder / "stubs.c"):
        subprocess.run(["gcc", *flags, "-c", str(source), "-o", str(folder / (source.stem + ".o"))], check=True)
    library = folder / "libggmlq.so"
    subprocess.run(["gcc", "-shared", "-o", str(library), str(folder / "ggml-quants.o"), str(folder / "stubs.o"),
                    "-lm"], check=True)
    return ctypes.CDLL(str(library))


def quantize(lib: ctypes.CDLL, kind: str, x: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    c_name, block, size = {**FORMATS, **WEIGHTED_LEGACY}[kind]
    out = np.zeros(x.size // block * size, dtype=np.uint8)
    function = getattr(lib, f"quantize_{c_name}")
    function.restype = ctypes.c_size_t
    pointer = None if weights is None else weights.ctypes.data_as(ctypes.c_void_p)
    function(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.shape[0]),
             ctypes.c_int64(x.shape[1]), pointer)
    return out.reshape(x.shape[0], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("llama_cpp", type=Path, help="a llama.cpp source tree (ggml/src/ggml-quants.c)")
    parser.add_argument("-o", "--output", type=Path,
                        default=Path(__file__).resolve().parents[1] / "tests" / "data" / "kquant_reference.npz")
    args = parser.parse_args()
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(args.llama_cpp, Path(tmp))
        for case, x in reference_inputs().items():
            for kind in FORMATS:
                arrays[f"{kind}/{case}"] = quantize(lib, kind, x, None)
            for kind in [*FORMATS, *WEIGHTED_LEGACY]:
                arrays[f"{kind}/{case}/imatrix"] = quantize(lib, kind, x, importance(x, 7))
    np.savez_compressed(args.output, **arrays)
    print(f"wrote {args.output}: {len(arrays)} arrays", file=sys.stderr)


if __name__ == "__main__":
    main()
