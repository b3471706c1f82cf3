"""Greedy tokens of quantized GGUF files on CUDA against the CPU reference path (issue 16's device check).

For the demo model written as Q4_0, Q8_0, Q4_K_M and LLM.int8 GGUF files: 64 greedy tokens from the CPU
(float32, dequantised weights) and from CUDA (packed weights through the Triton kernels, in the device's
default dtype), and the first position where they differ. A difference is expected only from bf16/fp16
rounding; the report says where, so a kernel bug (a difference at the first tokens) stands out.

    python scripts/gpu_greedy_check.py --json out.json          # on a CUDA machine
    python scripts/gpu_greedy_check.py --device cpu --json x     # the plumbing, on the CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo! wherefore art thou"]


def _files(folder: Path) -> dict[str, Path]:
    from kilnlm.export.checkpoint import open_checkpoint
    from kilnlm.export.gguf import write_gguf
    from kilnlm.quant.llm_int8 import llm_int8_quantizer
    from kilnlm.runtime.engine import demo_model_path

    files = {}
    for target in ("q4_0", "q8_0", "q4_k_m"):
        files[target] = folder / f"demo-{target}.gguf"
        write_gguf(open_checkpoint(demo_model_path()), files[target], target)
    checkpoint = open_checkpoint(demo_model_path())
    files["llm-int8"] = folder / "demo-int8.gguf"
    write_gguf(checkpoint, files["llm-int8"], "f16", quantizer=llm_int8_quantizer(checkpoint, calib_files=[],
                                                                                nsamples=8, seqlen=64))
    return files


def _tokens(path: Path, device: str, prompt: str, n: int) -> list[int]:
    from kilnlm import Engine

    with Engine.load(path, device=device, progress=False, context_length=256) as engine:
        engine.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)
        return list(engine.last_stats.token_ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="write the report here too")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in _files(Path(tmp)).items():
            for prompt in PROMPTS:
                reference = _tokens(path, "cpu", prompt, args.tokens)
                tested = _tokens(path, args.device, prompt, args.tokens)
                first = next((i for i, (a, b) in enumerate(zip(reference, tested)) if a != b), None)
                rows.append({"file": kind, "prompt": prompt, "device": args.device, "tokens": len(reference),
                             "equal": reference == tested, "first_difference": first})
                print(f"{kind:9} {prompt[:20]!r:24} {'equal' if first is None else f'differs at token {first}'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    # Early differences point at a kernel bug rather than rounding: fail then.
    return 1 if any(r["first_difference"] is not None and r["first_difference"] < 4 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
