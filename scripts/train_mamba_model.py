#!/usr/bin/env python
"""Train kilnlm's small Mamba-2 test checkpoint: a SentencePiece tokenizer and a Mamba-2 model, as an HF folder.

The model is kilnlm's own MambaModel (runtime/models/mamba.py, through the pure-torch chunked SSD scan),
trained in fp32 on the CPU and stored in float16. The folder loads in kilnlm and in transformers'
Mamba2ForCausalLM; the script checks both give the same logits and greedy tokens before it writes
TRAINING.md. Data handling, the optimiser, the schedule and the training loop are the demo model's
(scripts/train_demo_model.py); only the architecture, its initialisation and the HF config differ.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_model as demo  # noqa: E402  (the shared data, training and sampling helpers)

from kilnlm.runtime.config import ModelConfig, SSMConfig  # noqa: E402
from kilnlm.runtime.models.mamba import MambaModel  # noqa: E402

EXAMPLE = (
    "example:\n  python scripts/train_mamba_model.py --text /work/shared/text/tinyshakespeare.txt "
    "--out tests/data/mamba2-shakespeare --minutes 20"
)
LOGIT_TOLERANCE = 1e-3  # fp32 kilnlm vs fp32 transformers from the same fp16 weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (the demo script's, with Mamba-2 sizes instead of attention ones)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_training_arguments(parser, vocab_size=1024, lr=3e-3)
    parser.add_argument("--hidden-size", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--state-size", type=int, default=32)
    parser.add_argument("--groups", type=int, default=1)
    return demo.parse_training_args(parser, argv)


def model_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """The checkpoint's shape: Mamba-2 with expand 2, conv kernel 4."""
    inner = 2 * args.hidden_size
    ssm = SSMConfig(version=2, inner_size=inner, state_size=args.state_size, conv_kernel=4,
                    time_step_rank=inner // args.head_dim, n_groups=args.groups, chunk_size=64)
    return ModelConfig(architecture="mamba2", vocab_size=vocab_size, hidden_size=args.hidden_size,
                       intermediate_size=0, num_layers=args.layers, num_heads=0, num_kv_heads=0, head_dim=0,
                       max_position_embeddings=1 << 20, rms_norm_eps=1e-5, tie_word_embeddings=True, ssm=ssm)


def init_weights(model: MambaModel, seed: int) -> None:
    """mamba_ssm's initialisation: A = 1..H per head, D = 1, dt_bias = softplus^-1 of log-uniform dt in
    [1e-3, 0.1]; linears normal(0, 0.02) with out_proj scaled by 1/sqrt(2 * layers); conv as nn.Conv1d."""
    gen = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.config.num_layers)
    nn.init.normal_(model.embed_tokens.weight, std=0.02, generator=gen)
    for layer in model.layers:
        mixer = layer.mixer
        heads = mixer.ssm.num_heads
        nn.init.ones_(layer.norm.weight)
        nn.init.ones_(mixer.norm.weight)
        nn.init.normal_(mixer.in_proj.weight, std=0.02, generator=gen)
        nn.init.normal_(mixer.out_proj.weight, std=residual_std, generator=gen)
        bound = 1 / math.sqrt(mixer.ssm.conv_kernel)  # nn.Conv1d's default for a depthwise kernel
        nn.init.uniform_(mixer.conv1d.weight, -bound, bound, generator=gen)
        nn.init.uniform_(mixer.conv1d.bias, -bound, bound, generator=gen)
        with torch.no_grad():
            mixer.A_log.copy_(torch.log(torch.arange(1, heads + 1, dtype=torch.float32)))
            mixer.D.fill_(1.0)
            dt = torch.exp(torch.rand(heads, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def hf_config(config: ModelConfig) -> dict:
    """config.json for transformers' Mamba2ForCausalLM."""
    ssm = config.ssm
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers, "expand": 2,
        "num_heads": ssm.num_heads, "head_dim": ssm.head_dim, "state_size": ssm.state_size,
        "n_groups": ssm.n_groups, "conv_kernel": ssm.conv_kernel, "chunk_size": ssm.chunk_size,
        "layer_norm_epsilon": config.rms_norm_eps, "use_bias": False, "use_conv_bias": True,
        "residual_in_fp32": True, "tie_word_embeddings": True, "hidden_act": "silu",
        "bos_token_id": demo.BOS_ID, "eos_token_id": demo.EOS_ID, "pad_token_id": demo.EOS_ID,
        "torch_dtype": "float16", "use_cache": True,
    }


def hf_name(name: str) -> str:
    """transformers' name for a kilnlm Mamba parameter (the inverse of export.hf.internal_name)."""
    renamed = {"embed_tokens.weight": "backbone.embeddings.weight", "norm.weight": "backbone.norm_f.weight"}
    return renamed.get(name, f"backbone.{name}")


def save_hf_folder(model: MambaModel, tokenizer: bytes, out: Path) -> None:
    """Write weights (float16, HF names), config, tokenizer and generation config to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {hf_name(n): p.detach().to(torch.float16).contiguous() for n, p in model.named_parameters()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    demo.write_json(out / "config.json", hf_config(model.config))
    (out / "tokenizer.model").write_bytes(tokenizer)
    demo.write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "legacy": False,
    })
    demo.write_json(out / "generation_config.json", {"bos_token_id": demo.BOS_ID, "eos_token_id": demo.EOS_ID})


@torch.no_grad()
def compare_with_transformers(out: Path, ours: nn.Module, ids: list[int], prompt_len: int, greedy: list[int]) -> str:
    """Check transformers loads the folder and agrees with kilnlm; returns a one-line summary."""
    try:
        import transformers
        from transformers import Mamba2ForCausalLM
    except ImportError:
        return "skipped: transformers is not installed"
    hf = Mamba2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    inputs = torch.tensor([ids])
    diff = (hf(inputs).logits - ours(inputs)).abs().max().item()
    if diff > LOGIT_TOLERANCE:
        raise SystemExit(f"kilnlm and transformers disagree on {out}: max |logit diff| {diff:.2e} > {LOGIT_TOLERANCE}")
    prompt = torch.tensor([greedy[:prompt_len]])
    hf_greedy = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(greedy) - prompt_len,
                            do_sample=False, eos_token_id=demo.EOS_ID, pad_token_id=demo.EOS_ID)[0].tolist()
    agree = "identical to kilnlm's" if hf_greedy[: len(greedy)] == greedy else "DIFFERENT from kilnlm's"
    return (f"transformers {transformers.__version__} Mamba2ForCausalLM: max |logit diff| {diff:.2e} over "
            f"{len(ids)} validation tokens (fp32, same fp16 weights); "
            f"{len(greedy) - prompt_len}-token greedy continuation {agree}")


def training_md(args: argparse.Namespace, result: demo.TrainResult, params: int, samples: dict[str, str],
                check: str, data_stats: str) -> str:
    """The TRAINING.md text."""
    command = "python scripts/train_mamba_model.py " + shlex.join(sys.argv[1:])
    curve = "\n".join(f"| {s} | {t:.3f} | {v:.3f} |" for s, t, v in result.history)
    sample_text = "\n\n".join(f"{title}:\n\n```text\n{text}\n```" for title, text in samples.items())
    inner = 2 * args.hidden_size
    return f"""# kilnlm's small trained Mamba-2 checkpoint

A {params / 1e6:.2f}M-parameter Mamba-2 model and a SentencePiece tokenizer, trained from scratch on the CPU by
`scripts/train_mamba_model.py`, for tests and quantization measurements of the Mamba path on real (trained)
weights. It writes text in the style of its corpus; it knows nothing.

## Command

```bash
{command}
```

## Corpus

{demo.describe_corpus(args.text)}

{data_stats}

## Tokenizer

SentencePiece BPE, {args.vocab_size} pieces, byte fallback, digits split, identity normalisation, "▁" dummy
prefix; `<unk>` 0, `<s>` 1, `</s>` 2. Documents of about {args.doc_chars} characters are encoded as `<s> text </s>`.

## Model

MambaModel (kilnlm.runtime.models.mamba), Mamba-2: hidden {args.hidden_size}, {args.layers} layers, inner
{inner} = {inner // args.head_dim} heads x {args.head_dim}, state {args.state_size}, {args.groups} group(s), conv
kernel 4, RMSNorm eps 1e-5, tied embeddings: **{params:,} parameters**. Stored as float16.

## Training

fp32 on {args.threads} threads; AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak LR
{args.lr}, {args.warmup} warmup steps, cosine decay to {args.min_lr_ratio} x peak, gradient clipping 1.0;
batch {args.batch_size} x {args.seq_len} tokens; mamba_ssm's initialisation.

- steps: {result.steps} (ended by the {result.ended_by})
- tokens seen: {result.tokens_seen:,}
- wall time of training: {result.seconds / 60:.1f} min ({result.tokens_per_second:.0f} tokens/s, evaluation included)
- final train loss {result.train_loss:.3f}, validation loss {result.val_loss:.3f}
  (perplexity {math.exp(result.val_loss):.1f})
- best validation loss {result.best_val_loss:.3f} at step {result.best_val_step}
- machine: {os.cpu_count()} CPU cores ({platform.machine()}, {demo.cpu_name()}),
  torch {torch.__version__}, sentencepiece {spm.__version__}, Python {platform.python_version()}

| step | train loss (mean since last row) | validation loss |
|---:|---:|---:|
{curve}

## Check

Reloaded from this folder by kilnlm's HF reader; {check}.

## Samples

{sample_text}
"""


def main(argv: list[str] | None = None) -> None:
    """Train, save, check and document the Mamba-2 checkpoint."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()

    train_text, val_text = demo.split_holdout(demo.read_corpus(args.text), args.val_fraction)
    tokenizer = demo.train_tokenizer(train_text, args.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    train_ids = demo.encode_documents(sp, train_text, args.doc_chars)
    val_ids = demo.encode_documents(sp, val_text, args.doc_chars)
    data_stats = (f"Training split {len(train_text):,} characters = {len(train_ids):,} tokens; validation (last "
                  f"{args.val_fraction:.0%}) {len(val_text):,} characters = {len(val_ids):,} tokens.")
    print(data_stats)

    model = MambaModel(model_config(args, sp.get_piece_size()))
    init_weights(model, args.seed)
    params = demo.count_parameters(model)
    print(f"model: {params:,} parameters")
    result = demo.train(model, train_ids, val_ids, args)
    print(f"trained {result.steps} steps in {result.seconds / 60:.1f} min; train {result.train_loss:.4f}, "
          f"val {result.val_loss:.4f} (ppl {math.exp(result.val_loss):.1f})")

    save_hf_folder(model, tokenizer, args.out)
    saved = demo.load_saved(args.out)
    prompt = [demo.BOS_ID, *sp.encode("ROMEO:\n")]
    greedy = demo.generate(saved, prompt, 120)
    samples = {
        "Greedy (temperature 0), prompt `ROMEO:` and a newline": sp.decode(greedy[1:]),
        "Sampled (temperature 0.8, top-k 40, seed 0), prompt `JULIET:` and a newline":
            sp.decode(demo.generate(saved, [demo.BOS_ID, *sp.encode("JULIET:\n")], 200, temperature=0.8)[1:]),
    }
    check = compare_with_transformers(args.out, saved, val_ids[:256].tolist(), len(prompt), greedy)
    print(check)
    for title, text in samples.items():
        print(f"--- {title}\n{text}")
    (args.out / "TRAINING.md").write_text(training_md(args, result, params, samples, check, data_stats),
                                          encoding="utf-8")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {(time.perf_counter() - wall_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
