"""CPU decode and prefill of the same GGUF files in kilnlm and llama.cpp (llama-cpp-python), same thread count.

    python benchmarks/cpu.py --workdir /tmp/cpu-bench               # 155M and 1B-shaped Llamas, F16 / Q8_0 / Q4_0
    python benchmarks/cpu.py --shapes 155m --types q4_0 --threads 2
    python benchmarks/cpu.py --shapes 1b --types q4_0,q4_k_m --cpu-activations i8   # llama.cpp's Q8 activations
    python benchmarks/cpu.py --kernels                              # one layer's matmuls: the measured alternatives

Files are written once into --workdir by kilnlm's own GGUF writer from random weights (a model's speed does not
depend on its values; the bundled demo model's tokenizer, padded to the vocabulary as llama.cpp's converters pad).
Every (runtime, file) pair runs in a fresh subprocess, so each resident-memory figure is that runtime's alone:
RSS before load (the interpreter with torch imported), after load, and after a 512-token prefill plus 128
greedy decode steps. llama.cpp maps the file, so its RSS
after load is small and grows as pages are touched; kilnlm copies the tensors into memory at load.

Columns: decode and prefill tokens/s, the ratio to llama.cpp's, and decode as a share of the memory roofline
(copy bandwidth measured in the same process / bytes of weights read per token). llama.cpp is optional
(`pip install llama-cpp-python`); without it only kilnlm's figures print.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

GGML_TYPES = {"f16": 1, "f32": 0}  # KV cache types both runtimes take, by ggml type id (llama.cpp's type_k / type_v)
SHAPES = {  # a 155M Llama (the measurement) and Llama 3.2 1B's sizes with a 32000-token vocabulary
    "155m": dict(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=16, head_dim=64,
                 vocab_size=32000, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
               vocab_size=32000, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                 vocab_size=2048, tie_word_embeddings=True),  # --dry-run
}


class SyntheticCheckpoint:
    """A Llama of `shape` with seeded random weights, as the GGUF writer reads a checkpoint."""

    def __init__(self, shape: str):
        from kilnlm.runtime.config import ModelConfig
        from kilnlm.runtime.models import expected_shapes

        self.config = ModelConfig(architecture="llama", max_position_embeddings=4096, rope_theta=500000.0,
                                  rms_norm_eps=1e-5, **SHAPES[shape])
        self._shapes = expected_shapes(self.config)

    def tensor_names(self) -> list[str]:
        return list(self._shapes)

    def tensor(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        if len(shape) == 1:
            return torch.ones(shape)
        generator = torch.Generator().manual_seed(sum(map(ord, name)))
        return torch.randn(shape, generator=generator) * 0.02

    def tokenizer(self):
        from kilnlm.runtime.engine import demo_model_path
        from kilnlm.runtime.tokenizer import Tokenizer

        return Tokenizer.from_hf_folder(demo_model_path())


def write_files(workdir: Path, shapes: list[str], types: list[str]) -> list[Path]:
    """The benchmark's GGUF files, written once (kept in `workdir` between runs)."""
    from kilnlm.export.gguf import write_gguf

    files = []
    for shape in shapes:
        checkpoint = None
        for target in types:
            path = workdir / f"llama-{shape}-{target}.gguf"
            if not path.exists():
                checkpoint = checkpoint or SyntheticCheckpoint(shape)
                started = time.perf_counter()
                write_gguf(checkpoint, path, target)
                print(f"wrote {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s",
                      file=sys.stderr)
            files.append(path)
    return files


def rss_mib() -> float:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure_kilnlm(path: Path, threads: int, prompt_tokens: int, new_tokens: int, kv_type: str,
                   activations: str = "i16") -> dict:
    from kilnlm import Engine
    from kilnlm.kernels.cpu import kernel_status
    from kilnlm.runtime.bench import measure_bandwidth, run_bench, weight_bytes_per_token

    torch.set_num_threads(threads)
    rss_base = rss_mib()  # the interpreter with torch and kilnlm imported, before any weight
    started = time.perf_counter()
    engine = Engine.load(path, threads=threads, kv_type=kv_type, cpu_activations=activations, progress=False)
    load_s, rss_load = time.perf_counter() - started, rss_mib()
    result = run_bench(engine.model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, bandwidth=False,
                       kv_options={"k_type": kv_type, "v_type": kv_type})
    rss_run = rss_mib()
    return dict(decode=result.decode_tokens_per_s, prefill=result.prefill_tokens_per_s, load_s=load_s,
                rss_base=rss_base, rss_load=rss_load, rss_run=rss_run, bytes_per_token=weight_bytes_per_token(engine.model),
                bandwidth=measure_bandwidth(torch.device("cpu")), kernels=kernel_status().compiled)


def measure_llama_cpp(path: Path, threads: int, prompt_tokens: int, new_tokens: int, kv_type: str,
                      activations: str = "i16") -> dict:  # llama.cpp's CPU backend always takes Q8 activations
    import numpy as np
    from llama_cpp import Llama

    rss_base = rss_mib()
    started = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=prompt_tokens + new_tokens + 16, n_batch=prompt_tokens,
                n_ubatch=prompt_tokens, n_threads=threads, n_threads_batch=threads, verbose=False,
                type_k=GGML_TYPES[kv_type], type_v=GGML_TYPES[kv_type])
    load_s, rss_load = time.perf_counter() - started, rss_mib()
    vocab = llm.n_vocab()
    prompt = torch.randint(3, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.eval(prompt[:8])  # warm-up, as kilnlm's run_bench does
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - started

    def greedy() -> int:  # the last position's logits, as llama.cpp leaves them (eval keeps no copy)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    token = greedy()
    started = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = greedy()
    decode_s = time.perf_counter() - started
    return dict(decode=new_tokens / decode_s, prefill=prompt_tokens / prefill_s, load_s=load_s, rss_base=rss_base,
                rss_load=rss_load,
                rss_run=rss_mib())


def run_isolated(runtime: str, path: Path, args) -> dict | None:
    """One measurement in a fresh interpreter (clean RSS); None when that runtime is not installed."""
    command = [sys.executable, __file__, "--measure", runtime, str(path), "--threads", str(args.threads),
               "--prompt", str(args.prompt), "--new", str(args.new), "--kv-type", args.kv_type,
               "--cpu-activations", args.cpu_activations]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        if "No module named 'llama_cpp'" in done.stderr:
            return None
        raise RuntimeError(f"{runtime} on {path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[tuple[Path, dict, dict | None]]) -> None:
    print("| file | MiB | kilnlm decode tok/s | llama.cpp | ratio | roofline share | kilnlm prefill tok/s | "
          "llama.cpp | ratio | kilnlm RSS base / load / run MiB | llama.cpp RSS base / load / run MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for path, ours, peer in rows:
        size = path.stat().st_size / 2**20
        roofline = ours["bandwidth"] * 1e9 / ours["bytes_per_token"]
        peer_decode = f"{peer['decode']:.1f}" if peer else "-"
        peer_prefill = f"{peer['prefill']:.1f}" if peer else "-"
        decode_ratio = f"{ours['decode'] / peer['decode']:.2f}x" if peer else "-"
        prefill_ratio = f"{ours['prefill'] / peer['prefill']:.2f}x" if peer else "-"
        peer_rss = f"{peer['rss_base']:.0f} / {peer['rss_load']:.0f} / {peer['rss_run']:.0f}" if peer else "-"
        print(f"| {path.name} | {size:.0f} | {ours['decode']:.1f} | {peer_decode} | {decode_ratio} | "
              f"{ours['decode'] / roofline:.0%} | {ours['prefill']:.1f} | {peer_prefill} | {prefill_ratio} | "
              f"{ours['rss_base']:.0f} / {ours['rss_load']:.0f} / {ours['rss_run']:.0f} | {peer_rss} |", flush=True)


def kernel_alternatives(threads: int) -> None:
    """One 155M layer's matmul shapes at M = 1 through each CPU path that could hold packed weights."""
    from kilnlm.kernels.cpu import kernel_status

    torch.set_num_threads(threads)
    print(f"C kernels: {kernel_status().detail}")

    def timed(fn, repeats=50):
        for _ in range(5):
            fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) / repeats * 1e6

    print("| N x K | path | µs | weight bytes | GB/s |")
    print("|---|---|---:|---:|---:|")
    for n, k in ((2816, 1024), (1024, 2816), (32000, 1024)):
        for label, fn, nbytes in _alternatives(n, k, threads):
            micros = timed(fn)
            print(f"| {n} x {k} | {label} | {micros:.0f} | {nbytes / 2**20:.1f} MiB | {nbytes / micros / 1e3:.1f} |",
                  flush=True)


def _alternatives(n: int, k: int, threads: int) -> list[tuple[str, object, int]]:
    """(label, call, weight bytes) for an n x k weight at M = 1: torch's dense and packed CPU ops, then kilnlm's."""
    from functools import partial

    from kilnlm.kernels.cpu import ACTIVATIONS, CpuOptions, ggml_matmul
    from kilnlm.quant.formats import QuantizedTensor, get_format
    from kilnlm.runtime.models.quantized_linear import cpu_matrix

    aten, linear = torch.ops.aten, torch.nn.functional.linear
    weight, x = torch.randn(n, k) * 0.02, torch.randn(1, k)
    codes, scales = torch.randint(-127, 127, (n, k), dtype=torch.int8), torch.rand(n)
    rows = [("torch fp32 F.linear (dequantised copy)", partial(linear, x, weight), 4 * n * k),
            ("torch fp16 F.linear (fp16 activations)", partial(linear, x.half(), weight.half()), 2 * n * k),
            ("torch _weight_int8pack_mm, bf16 x (one scale per row: not Q8_0)",
             partial(aten._weight_int8pack_mm, x.bfloat16(), codes, scales.bfloat16()), n * k),
            ("torch _weight_int8pack_mm, fp32 x", partial(aten._weight_int8pack_mm, x, codes, scales), n * k)]
    if hasattr(aten, "_convert_weight_to_int4pack_for_cpu"):
        packed = aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        rows.append(("torch _weight_int4pack_mm_for_cpu, bf16 x and bf16 scales (rounds Q4_0's fp16 d)",
                     partial(aten._weight_int4pack_mm_for_cpu, x.bfloat16(), packed, 32,
                             torch.rand(k // 32, n, 2).bfloat16()), n * k // 2))
        rows.append(("torch _weight_int4pack_mm_for_cpu, fp32 x",
                     partial(aten._weight_int4pack_mm_for_cpu, x, packed, 32, torch.rand(k // 32, n, 2)), n * k // 2))
    for name in ("f16", "q8_0", "q4_0", "q4_k", "q6_k"):
        matrix = cpu_matrix(QuantizedTensor.from_float(weight, get_format(name)))
        for activations in ACTIVATIONS:
            options = CpuOptions(threads=threads, activations=activations)
            rows.append((f"kilnlm C kernel, {name}, {activations} activations", partial(ggml_matmul, x, matrix, options),
                         matrix.nbytes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/.cpu-files"))
    parser.add_argument("--shapes", default="155m,1b", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--types", default="f16,q8_0,q4_0", help="GGUF types (kiln quantize --type)")
    from kilnlm.runtime.threads import physical_cores

    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--kv-type", choices=tuple(GGML_TYPES), default="f16",
                        help="KV cache element type of both runtimes (default: f16, llama.cpp's default)")
    parser.add_argument("--cpu-activations", choices=("i16", "i8", "f32"), default="i16",
                        help="kilnlm's decode products (default i16; i8 is llama.cpp's Q8 activations)")
    parser.add_argument("--kernels", action="store_true", help="time the matmul alternatives instead")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape and lengths: checks the harness")
    parser.add_argument("--measure", nargs=2, metavar=("RUNTIME", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        runtime, path = args.measure
        measure = measure_kilnlm if runtime == "kilnlm" else measure_llama_cpp
        print(json.dumps(measure(Path(path), args.threads, args.prompt, args.new, args.kv_type, args.cpu_activations)))
        return
    if args.kernels:
        kernel_alternatives(args.threads)
        return
    if args.dry_run:
        args.shapes, args.prompt, args.new = "tiny", 16, 8
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = write_files(args.workdir, args.shapes.split(","), args.types.split(","))
    print(f"threads {args.threads}, prompt {args.prompt}, decode {args.new}, {args.kv_type} KV cache, kilnlm "
          f"{args.cpu_activations} activations; {os.cpu_count()} CPUs\n")
    rows = []
    for path in files:
        ours = run_isolated("kilnlm", path, args)
        peer = run_isolated("llama_cpp", path, args)
        rows.append((path, ours, peer))
    print_table(rows)
    if any(not ours["kernels"] for _, ours, _ in rows):
        print("\nkilnlm ran the pure-torch path: the C kernels did not build (see kilnlm.kernels.cpu)")
    if not math.isfinite(sum(ours["decode"] for _, ours, _ in rows)):
        sys.exit(1)


if __name__ == "__main__":
    main()
