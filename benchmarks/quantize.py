"""Quantize throughput and output size of `write_gguf` for every target type, on a synthetic checkpoint.

    python benchmarks/quantize.py --hidden 1024 --layers 8 --intermediate 2816 --vocab 32000

Writes a random-weight Llama HF folder (no download) plus a small SentencePiece tokenizer into a temporary
folder, then exports it to each GGUF type and prints MB/s (fp32 source bytes per second), file size and
bits per weight (whole file, and tensor data only). Add --json for machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from kilnlm.export.checkpoint import open_checkpoint
from kilnlm.export.gguf import TARGET_TYPES, write_gguf
from kilnlm.export.gguf_file import GGUFFile


def make_checkpoint(folder: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    """A random Llama checkpoint in HF layout with a trained-in-place SentencePiece tokenizer; returns fp32 bytes."""
    import sentencepiece as spm

    heads = max(hidden // 64, 1)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": max(heads // 4, 1),
              "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    kv = config["num_key_value_heads"] * (hidden // heads)
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
               "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                        p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                        p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                        p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                        p + "post_attention_layernorm.weight": (hidden,)})
    save_file({k: torch.randn(s, generator=gen) * 0.02 for k, s in tensors.items()}, folder / "model.safetensors")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"sample line {i} with some words {i * 7}" for i in range(2000)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    return sum(math.prod(s) for s in tensors.values()) * 4


def main() -> None:
    """Run the benchmark and print a table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        folder.mkdir()
        source_bytes = make_checkpoint(folder, args.hidden, args.layers, args.intermediate, args.vocab)
        for _ in open_checkpoint(folder).tensors():
            pass  # warm the page cache so the first type is not charged for reading the source from disk
        for target in TARGET_TYPES:
            summary = write_gguf(open_checkpoint(folder), Path(tmp) / f"{target}.gguf", target)
            data_bytes = sum(t.nbytes for t in GGUFFile(summary.path).tensors.values())
            rows.append({"type": target, "seconds": summary.seconds, "MB_per_s": source_bytes / 1e6 / summary.seconds,
                         "file_MiB": summary.file_bytes / 2**20, "bpw_file": summary.bits_per_weight,
                         "bpw_tensors": data_bytes * 8 / summary.parameters, "parameters": summary.parameters})
            (Path(tmp) / f"{target}.gguf").unlink()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{rows[0]['parameters'] / 1e6:.1f}M parameters, {source_bytes / 1e6:.0f} MB of fp32 source, "
          f"{torch.get_num_threads()} threads")
    print(f"{'type':<6} {'seconds':>8} {'MB/s':>8} {'MiB':>8} {'bpw file':>9} {'bpw data':>9}")
    for r in rows:
        print(f"{r['type']:<6} {r['seconds']:>8.2f} {r['MB_per_s']:>8.1f} {r['file_MiB']:>8.1f} "
              f"{r['bpw_file']:>9.2f} {r['bpw_tensors']:>9.2f}")


if __name__ == "__main__":
    main()
