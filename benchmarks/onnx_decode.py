"""Decode speed of one model through kilnlm's torch path, onnxruntime (kilnlm's OnnxDecoder) and
onnxruntime-genai, in one run, with the memory roofline beside them.

    python benchmarks/onnx_decode.py MODEL                 # an HF folder or GGUF file; exported to ONNX in a temp folder
    python benchmarks/onnx_decode.py MODEL --type q4_0 --device cuda --json
    python benchmarks/onnx_decode.py --dry-run             # the bundled demo model, a few tokens, on the CPU

Each path runs the same prompt (greedy, batch 1) and then `--new-tokens` decode steps; tokens/s is the decode
phase only. The roofline is the copy bandwidth measured in the same run divided by the bytes of weights each
path reads per token (the torch path's parameters; the ONNX graph's weight file).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _torch_rate(engine, prompt: list[int], new_tokens: int) -> float:
    engine.reset()
    engine.generate(prompt, max_tokens=new_tokens, temperature=0, ignore_eos=True)
    return engine.last_stats.decode_tokens_per_second


def _genai_rate(folder: Path, prompt: list[int], new_tokens: int, device: str) -> float | None:
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)  # prefill
    started, steps = time.perf_counter(), 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    return (steps - 1) / (time.perf_counter() - started) if steps > 1 else 0.0


def run(model: str | None, target: str, device: str, prompt_tokens: int, new_tokens: int) -> dict:
    """Decode tokens/s of the three paths, the weight bytes they read and the roofline."""
    import torch

    from kilnlm import Engine
    from kilnlm.export.checkpoint import open_checkpoint
    from kilnlm.export.onnx import write_onnx
    from kilnlm.runtime.bench import measure_bandwidth, weight_bytes_per_token
    from kilnlm.runtime.engine import demo_model_path

    source = Path(model) if model else demo_model_path()
    torch_engine = Engine.load(source, device=device, progress=False)
    prompt = torch.randint(3, torch_engine.config.vocab_size, (prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "onnx"
        write_onnx(open_checkpoint(source), folder, target, ep="cuda" if device == "cuda" else "cpu",
                   source_folder=source if source.is_dir() else None,
                   context_length=prompt_tokens + new_tokens + 8)
        onnx_engine = Engine.load(folder, device=device, progress=False)
        rates = {"kilnlm_torch": _torch_rate(torch_engine, prompt, new_tokens),
                 "onnxruntime": _torch_rate(onnx_engine, prompt, new_tokens),
                 "onnxruntime_genai": _genai_rate(folder, prompt, new_tokens, device)}
        bytes_per_token = {"kilnlm_torch": weight_bytes_per_token(torch_engine.model),
                           "onnx": weight_bytes_per_token(onnx_engine.model)}
    bandwidth = measure_bandwidth(torch.device(device))
    return {"model": str(source), "type": target, "device": device, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "decode_tokens_per_s": rates, "weight_bytes_per_token": bytes_per_token,
            "bandwidth_gb_per_s": bandwidth,
            "roofline_tokens_per_s": {k: bandwidth * 1e9 / v for k, v in bytes_per_token.items()}}


def main() -> None:
    """Parse the options, run, print a table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="HF folder or GGUF file (default: the demo model)")
    parser.add_argument("--type", default="f32", help="ONNX weight type: f32, f16, q8_0, q4_0, q4_1 (default f32)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--dry-run", action="store_true", help="the demo model, 8 + 4 tokens: checks the harness")
    args = parser.parse_args()
    if args.dry_run:
        args.model, args.prompt_tokens, args.new_tokens = None, 8, 4
    result = run(args.model, args.type, args.device, args.prompt_tokens, args.new_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']} ({args.type}, {args.device}; copy bandwidth {result['bandwidth_gb_per_s']:.1f} GB/s)")
    for path, rate in result["decode_tokens_per_s"].items():
        shown = "not installed" if rate is None else f"{rate:8.1f} tokens/s"
        print(f"  {path:18s} {shown}")
    for path, roof in result["roofline_tokens_per_s"].items():
        print(f"  roofline ({path}): {roof:.1f} tokens/s")
    if args.dry_run:
        print("(dry run: the figures are not meaningful)", file=sys.stderr)


if __name__ == "__main__":
    main()
