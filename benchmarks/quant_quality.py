"""Quality of each GGUF type and method at its file size: perplexity and KL divergence from the F16 model.

For one model (an HF folder) and an evaluation text, writes F16 (the base), then each type with
round-to-nearest, with an importance matrix computed on a separate calibration text (`kiln imatrix`), and,
for Q4_0, Q4_K_M and Q5_K_M, with GPTQ; when llama-cpp-python is installed, llama.cpp's own llama_model_quantize writes the same
types from an F32 file of the model, and its files are scored by the same code (kilnlm's RTN files are byte
for byte llama.cpp's, which the row shows). Prints a table (or JSON) of bits per weight, perplexity,
KL(F16 || type) and how often both pick the same top token.

    python benchmarks/quant_quality.py runtime/demo_model --text eval.txt --calib calib.txt
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
from pathlib import Path

import gguf

from kilnlm import Engine
from kilnlm.export.checkpoint import open_checkpoint
from kilnlm.export.gguf import GGUF_ARCHITECTURES, gguf_name, write_gguf
from kilnlm.quant.imatrix import collect
from kilnlm.quant.rtn import RoundToNearest
from kilnlm.runtime.perplexity import perplexity

TYPES = ["q4_0", "q4_k_m", "q5_k_m", "q6_k"]


def _score(path: Path, base: Engine, text: str, ctx: int, chunks: int | None) -> dict:
    engine = Engine.load(path, progress=False, context_length=ctx)
    result = perplexity(engine.model, engine.tokenizer, text, ctx=ctx, chunks=chunks, base=base.model)
    d = result.divergence
    return {"ppl": result.ppl, "kl": d.kl_mean, "kl_stderr": d.kl_stderr, "same_top": d.same_top,
            "bpw": sum(t.n_bytes for t in gguf.GGUFReader(path).tensors) * 8 / sum(
                int(t.n_elements) for t in gguf.GGUFReader(path).tensors)}


def _llama_cpp_files(f32: Path, folder: Path, types: list[str]) -> dict[str, Path]:
    try:
        import llama_cpp
    except ImportError:
        return {}
    out = {}
    for target in types:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(getattr(gguf.LlamaFileType, f"MOSTLY_{target.upper()}"))
        path = folder / f"llamacpp-{target}.gguf"
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params)) == 0:
            out[target] = path
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="HF checkpoint folder")
    parser.add_argument("--text", required=True, help="evaluation text")
    parser.add_argument("--calib", required=True, help="calibration text for the importance matrix and GPTQ")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=None)
    parser.add_argument("--types", nargs="+", default=TYPES)
    parser.add_argument("--no-gptq", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = open_checkpoint(args.model)
        write_gguf(checkpoint, folder / "f16.gguf", "f16")
        write_gguf(open_checkpoint(args.model), folder / "f32.gguf", "f32")
        base = Engine.load(folder / "f16.gguf", progress=False, context_length=args.ctx)
        rows.append({"type": "f16", "method": "-", **_score(folder / "f16.gguf", base, text, args.ctx, args.chunks)})
        arch = GGUF_ARCHITECTURES[checkpoint.config.architecture]
        tokens = base.tokenizer.encode(Path(args.calib).read_text(encoding="utf-8"), add_bos=False)
        matrix = collect(base.model, tokens, ctx=args.ctx, bos_id=base.tokenizer.bos_id, source=args.calib,
                         gguf_name=lambda name: gguf_name(name, arch), max_chunks=64, progress=False)
        theirs = _llama_cpp_files(folder / "f32.gguf", folder, args.types)
        for target in args.types:
            methods = {"rtn": None, "imatrix": RoundToNearest(matrix)}
            for method, quantizer in methods.items():
                path = folder / f"{target}-{method}.gguf"
                write_gguf(open_checkpoint(args.model), path, target, quantizer=quantizer)
                rows.append({"type": target, "method": method, **_score(path, base, text, args.ctx, args.chunks)})
            if target in theirs:
                rows.append({"type": target, "method": "llama.cpp rtn",
                             **_score(theirs[target], base, text, args.ctx, args.chunks)})
            if target in ("q4_0", "q4_k_m", "q5_k_m") and not args.no_gptq:
                from kilnlm.quant.gptq import gptq_quantizer

                path = folder / f"{target}-gptq.gguf"
                write_gguf(open_checkpoint(args.model), path, target,
                           quantizer=gptq_quantizer(open_checkpoint(args.model), calib_files=[args.calib],
                                                    nsamples=64, seqlen=args.ctx, seed=0))
                rows.append({"type": target, "method": "gptq", **_score(path, base, text, args.ctx, args.chunks)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'type':8} {'method':14} {'bpw':>6} {'ppl':>10} {'KL vs f16':>12} {'same top':>9}")
    for r in rows:
        print(f"{r['type']:8} {r['method']:14} {r['bpw']:6.2f} {r['ppl']:10.4f} {r['kl']:12.6f} "
              f"{100 * r['same_top']:8.2f}%", file=sys.stdout)


if __name__ == "__main__":
    main()
