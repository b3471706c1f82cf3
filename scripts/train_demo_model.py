#!/usr/bin/env python
"""Train kilnlm's bundled demo model: a SentencePiece tokenizer and a small Llama, saved as an HF folder.

The model is kilnlm's own LlamaModel, trained in fp32 on the CPU and stored in float16. The folder loads
in kilnlm and in transformers' LlamaForCausalLM; the script checks both give the same logits before it
writes TRAINING.md (how the model was made, its losses and a sample of its text).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from kilnlm.export.hf import open_hf_checkpoint
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.models import build_model
from kilnlm.runtime.models.llama import LlamaModel

EXAMPLE = (
    "example:\n  python scripts/train_demo_model.py --text /work/shared/text/tinyshakespeare.txt "
    "--out runtime/demo_model --minutes 20"
)
# Origin and licence of corpora we know, by sha256 of the file, so TRAINING.md can name them exactly.
KNOWN_CORPORA = {
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed": (
        "Tiny Shakespeare (40,000 lines from Shakespeare's plays, collected by Andrej Karpathy for char-rnn), "
        "public domain, as distributed in the pytorch/examples repository "
        "(distributed/minGPT-ddp/mingpt/data/input.txt)"
    ),
}
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
SPEED_REPORT_STEP = 10  # the step at which the measured speed and the expected step count are printed
LOGIT_TOLERANCE = 1e-3  # fp32 kilnlm vs fp32 transformers from the same fp16 weights


@dataclass
class TrainResult:
    """What training did, for the log and TRAINING.md."""

    steps: int
    ended_by: str  # "time budget" or "step count"
    tokens_seen: int
    seconds: float
    train_loss: float
    val_loss: float
    best_val_loss: float
    best_val_step: int
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train loss, val loss)

    @property
    def tokens_per_second(self) -> float:
        """Training throughput, evaluation time included."""
        return self.tokens_seen / self.seconds


def add_training_arguments(parser: argparse.ArgumentParser, *, vocab_size: int, lr: float) -> None:
    """The corpus, tokenizer, optimiser and schedule options every training script here shares."""
    parser.add_argument("--text", nargs="+", type=Path, required=True, help="plain-text training files (UTF-8)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (HF format)")
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget; 0 = no limit (default 20)")
    parser.add_argument("--steps", type=int, default=None, help="number of optimizer steps (default: fill --minutes)")
    parser.add_argument("--vocab-size", type=int, default=vocab_size)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validation passes")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="tail of the text held out")
    parser.add_argument("--doc-chars", type=int, default=2000, help="approximate characters per BOS..EOS document")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)


def parse_training_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, refusing a run with neither a time budget nor a step count."""
    args = parser.parse_args(argv)
    if args.minutes <= 0 and args.steps is None:
        parser.error("--minutes 0 (no time limit) needs --steps")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_arguments(parser, vocab_size=2048, lr=2e-3)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=688)
    return parse_training_args(parser, argv)


# ---------------------------------------------------------------- data


def read_corpus(paths: list[Path]) -> str:
    """The training files joined by blank lines, with Windows line ends normalised."""
    texts = [p.read_text(encoding="utf-8").replace("\r\n", "\n").strip("\n") for p in paths]
    return "\n\n".join(texts) + "\n"


def split_holdout(text: str, fraction: float) -> tuple[str, str]:
    """Split off the last `fraction` of the text as validation, at a blank line so no speech is cut."""
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - fraction)))
    if cut <= 0:
        raise SystemExit("the text has no blank line to split train/validation at; give more text")
    return text[: cut + 1], text[cut + 2 :]


def documents(text: str, min_chars: int) -> list[str]:
    """Cut the text at blank lines into documents of at least `min_chars` characters (each ends with a newline)."""
    docs, current = [], ""
    for block in text.split("\n\n"):
        current += block.strip("\n") + "\n\n"
        if len(current) >= min_chars:
            docs.append(current[:-1])
            current = ""
    if current.strip():
        docs.append(current[:-1])
    return docs


def train_tokenizer(text: str, vocab_size: int) -> bytes:
    """A Llama-style SentencePiece BPE model (byte fallback, split digits, "▁" dummy prefix), as bytes."""
    lines = [line for line in text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        # As Llama's tokenizer: text is kept as written (no NFKC, no whitespace squeezing); newlines and
        # any character outside the vocabulary become <0xNN> byte pieces.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def encode_documents(sp: spm.SentencePieceProcessor, text: str, doc_chars: int) -> torch.Tensor:
    """One stream of token ids: [BOS] doc [EOS] for every document, so prompts after BOS look like training."""
    ids: list[int] = []
    for doc in documents(text, doc_chars):
        ids += [BOS_ID, *sp.encode(doc), EOS_ID]
    return torch.tensor(ids, dtype=torch.long)


def random_batch(
    stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (B, T) from random windows of the stream."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    windows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def fixed_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Consecutive (N, T+1) windows covering the stream (each overlaps the next by one token)."""
    count = (len(stream) - 1) // seq_len
    return torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)])


# ---------------------------------------------------------------- model


def model_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """The demo model's shape."""
    return ModelConfig(
        architecture="llama",
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )


def init_weights(model: LlamaModel) -> None:
    """Normal(0, 0.02) weights, residual output projections scaled by 1/sqrt(2 * layers) as in GPT-2."""
    residual_std = 0.02 / math.sqrt(2 * model.config.num_layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    """Parameters, the tied embedding counted once."""
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norm scales)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def learning_rate(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over the first steps, times a cosine from peak to min_lr_ratio * peak as progress goes 0 -> 1."""
    warmup = min(1.0, (step + 1) / args.warmup)
    floor = args.min_lr_ratio
    return args.lr * warmup * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    logits = model(inputs)  # (B, T, V) fp32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch: int) -> float:
    """Mean loss over (N, T+1) windows."""
    model.eval()
    total = 0.0
    for chunk in windows.split(batch):
        total += lm_loss(model, chunk[:, :-1], chunk[:, 1:]).item() * len(chunk)
    model.train()
    return total / len(windows)


# ---------------------------------------------------------------- training


class Progress:
    """How far training is, from 0 to 1: by steps (--steps) or by time (--minutes), whichever is further along.

    Measuring it by time makes the cosine schedule end exactly when the budget does, however the machine's
    speed changes with its load. With --minutes 0 it depends on the step alone, so the run is repeatable.
    """

    def __init__(self, args: argparse.Namespace):
        self.steps = args.steps
        self.budget = args.minutes * 60  # seconds; 0 = no limit
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since training started."""
        return time.perf_counter() - self.start

    def __call__(self, step: int) -> float:
        """The fraction of training done after `step` steps."""
        by_steps = step / self.steps if self.steps else 0.0
        by_time = self.elapsed() / self.budget if self.budget > 0 else 0.0
        return min(1.0, max(by_steps, by_time))

    def ended_by(self, step: int) -> str:
        """What ended training."""
        return "step count" if self.steps and step >= self.steps else "time budget"


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor
) -> float:
    """One AdamW step with gradient clipping; returns the loss."""
    loss = lm_loss(model, inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def train(model: LlamaModel, train_ids: torch.Tensor, val_ids: torch.Tensor, args: argparse.Namespace) -> TrainResult:
    """AdamW with warmup + cosine LR and periodic validation, until --steps or --minutes is used up."""
    gen = torch.Generator().manual_seed(args.seed)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    val_windows = fixed_windows(val_ids, args.seq_len)
    history: list[tuple[int, float, float]] = []
    recent: list[float] = []
    bar = tqdm(total=args.steps, unit="step", file=sys.stderr, dynamic_ncols=True)
    model.train()
    progress = Progress(args)
    step, done = 0, 0.0
    while done < 1.0:
        lr = learning_rate(step, done, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        recent.append(train_step(model, optimizer, *random_batch(train_ids, args.batch_size, args.seq_len, gen)))
        step += 1
        done = progress(step)
        bar.total = max(step, round(step / done))  # the expected number of steps at the current speed
        bar.update(1)
        bar.set_postfix(loss=f"{recent[-1]:.3f}", lr=f"{lr:.2e}")
        if step == SPEED_REPORT_STEP:
            tokens_per_s = step * args.batch_size * args.seq_len / progress.elapsed()
            tqdm.write(f"{tokens_per_s:.0f} tokens/s: about {bar.total} steps")
        if step % args.eval_every == 0 or done >= 1.0:
            history.append((step, sum(recent) / len(recent), evaluate(model, val_windows, args.batch_size)))
            tqdm.write(f"step {step:5d}  train {history[-1][1]:.4f}  val {history[-1][2]:.4f}  "
                       f"lr {lr:.2e}  ({progress.elapsed() / 60:.1f} min)")
            recent = []
    bar.close()
    seconds = progress.elapsed()
    # Final train loss on as many random training windows as there are validation windows, in eval mode.
    train_windows = fixed_windows(train_ids, args.seq_len)
    train_windows = train_windows[torch.randperm(len(train_windows), generator=gen)[: len(val_windows)]]
    best_val, best_step = min((val, s) for s, _, val in history)
    return TrainResult(
        steps=step,
        ended_by=progress.ended_by(step),
        tokens_seen=step * args.batch_size * args.seq_len,
        seconds=seconds,
        train_loss=evaluate(model, train_windows, args.batch_size),
        val_loss=history[-1][2],
        best_val_loss=best_val,
        best_val_step=best_step,
        history=history,
    )


# ---------------------------------------------------------------- saving


def hf_config(config: ModelConfig) -> dict:
    """config.json for transformers' LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "initializer_range": 0.02,
        "torch_dtype": "float16",
        "use_cache": True,
    }


def write_json(path: Path, data: dict) -> None:
    """Pretty-printed JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_hf_folder(model: LlamaModel, tokenizer: bytes, out: Path) -> None:
    """Write weights (float16, HF names), config, tokenizer and generation config to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{name}": p.detach().to(torch.float16).contiguous() for name, p in model.named_parameters()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors creates it owner-only
    write_json(out / "config.json", hf_config(model.config))
    (out / "tokenizer.model").write_bytes(tokenizer)
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": model.config.max_position_embeddings,
    })
    write_json(out / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})


# ---------------------------------------------------------------- checking the saved folder


def load_saved(out: Path) -> nn.Module:
    """The saved folder read back through kilnlm's own HF reader, in fp32."""
    checkpoint = open_hf_checkpoint(out)
    return build_model(checkpoint.config, checkpoint.tensors(), dtype=torch.float32, source=str(out))


def pick_token(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    """Greedy when temperature is 0, else a draw from the top-k tokens at `temperature`."""
    if temperature == 0:
        return int(logits.argmax())
    top, index = logits.topk(top_k)
    return int(index[torch.multinomial(torch.softmax(top / temperature, -1), 1, generator=gen)])


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], new_tokens: int, temperature: float = 0.0,
             top_k: int = 40, seed: int = 0) -> list[int]:
    """Prompt plus up to `new_tokens` generated ids (stopping at EOS), decoded with kilnlm's KV cache."""
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(min(len(prompt_ids) + new_tokens, model.config.max_position_embeddings))
    logits = model(torch.tensor([prompt_ids]), cache, last_logits_only=True)[0, -1]
    ids = list(prompt_ids)
    for _ in range(min(new_tokens, cache.capacity - len(prompt_ids))):
        token = pick_token(logits, temperature, top_k, gen)
        if token == EOS_ID:
            break
        ids.append(token)
        logits = model(torch.tensor([[token]]), cache)[0, -1]
    return ids


@torch.no_grad()
def compare_with_transformers(out: Path, ours: nn.Module, ids: list[int], prompt_len: int, greedy: list[int]) -> str:
    """Check transformers loads the folder and agrees with kilnlm; returns a one-line summary."""
    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError:
        return "skipped: transformers is not installed"
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    inputs = torch.tensor([ids])
    diff = (hf(inputs).logits - ours(inputs)).abs().max().item()
    if diff > LOGIT_TOLERANCE:
        raise SystemExit(f"kilnlm and transformers disagree on {out}: max |logit diff| {diff:.2e} > {LOGIT_TOLERANCE}")
    prompt = torch.tensor([greedy[:prompt_len]])
    hf_greedy = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(greedy) - prompt_len,
                            do_sample=False, eos_token_id=EOS_ID, pad_token_id=EOS_ID)[0].tolist()
    agree = "identical to kilnlm's" if hf_greedy[: len(greedy)] == greedy else "DIFFERENT from kilnlm's"
    return (f"transformers {transformers.__version__} LlamaForCausalLM: max |logit diff| {diff:.2e} over "
            f"{len(ids)} validation tokens (fp32, same fp16 weights); "
            f"{len(greedy) - prompt_len}-token greedy continuation {agree}")


# ---------------------------------------------------------------- report


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, where there is one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def describe_corpus(paths: list[Path]) -> str:
    """Markdown lines naming each training file, its size, sha256 and (when known) origin and licence."""
    lines = []
    for path in paths:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        origin = KNOWN_CORPORA.get(digest, "origin and licence not recorded")
        lines.append(f"- `{path.name}` ({path.stat().st_size:,} bytes, sha256 `{digest}`): {origin}")
    return "\n".join(lines)


def training_md(args: argparse.Namespace, result: TrainResult, params: int, samples: dict[str, str],
                check: str, data_stats: str) -> str:
    """The TRAINING.md text."""
    command = "python scripts/train_demo_model.py " + shlex.join(sys.argv[1:])
    curve = "\n".join(f"| {s} | {t:.3f} | {v:.3f} |" for s, t, v in result.history)
    sample_text = "\n\n".join(f"{title}:\n\n```text\n{text}\n```" for title, text in samples.items())
    return f"""# The kilnlm demo model

A {params / 1e6:.2f}M-parameter Llama-architecture model and a SentencePiece tokenizer, trained from scratch on
the CPU by `scripts/train_demo_model.py`. It writes plausible-looking text in the style of its corpus; it
knows nothing and follows no instructions.

## Command

```bash
{command}
```

Training is seeded (`--seed {args.seed}`). With `--minutes` the LR schedule follows elapsed time, so the
step count depends on the machine's speed and the run is not exactly repeatable;
`--steps {result.steps} --minutes 0` trains as many steps with the schedule following the step, repeatably.

## Corpus

{describe_corpus(args.text)}

{data_stats}

## Tokenizer

SentencePiece BPE, {args.vocab_size} pieces, byte fallback (any UTF-8 text is encodable; newlines are `<0x0A>`),
digits split, identity normalisation, "▁" dummy prefix; `<unk>` 0, `<s>` 1, `</s>` 2, no pad. Trained on
the training split only. Documents of about {args.doc_chars} characters (cut at blank lines) are encoded as
`<s> text </s>`.

## Model

LlamaModel (kilnlm.runtime.models.llama): hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads,
{args.kv_heads} KV heads (GQA), head dim {args.hidden_size // args.heads}, SwiGLU intermediate {args.intermediate_size},
RMSNorm eps 1e-5, RoPE theta 10000, 512 positions, tied embeddings: **{params:,} parameters**. Stored as float16.

## Training

fp32 on {args.threads} threads; AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak LR
{args.lr}, {args.warmup} warmup steps, cosine decay to {args.min_lr_ratio} x peak, gradient clipping 1.0;
batch {args.batch_size} x {args.seq_len} tokens; init normal(0, 0.02), residual projections / sqrt(2 x layers).

- steps: {result.steps} (ended by the {result.ended_by})
- tokens seen: {result.tokens_seen:,}
- wall time of training: {result.seconds / 60:.1f} min ({result.tokens_per_second:.0f} tokens/s, evaluation included)
- final train loss {result.train_loss:.3f}, validation loss {result.val_loss:.3f}
  (perplexity {math.exp(result.val_loss):.1f})
- best validation loss {result.best_val_loss:.3f} at step {result.best_val_step}
- machine: {os.cpu_count()} CPU cores ({platform.machine()}, {cpu_name()}),
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
    """Train, save, check and document the demo model."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    wall_start = time.perf_counter()

    train_text, val_text = split_holdout(read_corpus(args.text), args.val_fraction)
    tokenizer = train_tokenizer(train_text, args.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    train_ids = encode_documents(sp, train_text, args.doc_chars)
    val_ids = encode_documents(sp, val_text, args.doc_chars)
    data_stats = (f"Training split {len(train_text):,} characters = {len(train_ids):,} tokens; validation (last "
                  f"{args.val_fraction:.0%}) {len(val_text):,} characters = {len(val_ids):,} tokens.")
    print(data_stats)

    model = LlamaModel(model_config(args, sp.get_piece_size()))
    init_weights(model)
    params = count_parameters(model)
    print(f"model: {params:,} parameters")
    result = train(model, train_ids, val_ids, args)
    print(f"trained {result.steps} steps, {result.tokens_seen:,} tokens in {result.seconds / 60:.1f} min "
          f"({result.tokens_per_second:.0f} tokens/s); train {result.train_loss:.4f}, val {result.val_loss:.4f} "
          f"(ppl {math.exp(result.val_loss):.1f})")

    save_hf_folder(model, tokenizer, args.out)
    saved = load_saved(args.out)
    prompt = [BOS_ID, *sp.encode("ROMEO:\n")]
    greedy = generate(saved, prompt, 120)
    samples = {
        "Greedy (temperature 0), prompt `ROMEO:` and a newline": sp.decode(greedy[1:]),
        "Sampled (temperature 0.8, top-k 40, seed 0), prompt `JULIET:` and a newline":
            sp.decode(generate(saved, [BOS_ID, *sp.encode("JULIET:\n")], 200, temperature=0.8)[1:]),
    }
    check = compare_with_transformers(args.out, saved, val_ids[:256].tolist(), len(prompt), greedy)
    print(check)
    for title, text in samples.items():
        print(f"--- {title}\n{text}")
    report = training_md(args, result, params, samples, check, data_stats)
    (args.out / "TRAINING.md").write_text(report, encoding="utf-8")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {(time.perf_counter() - wall_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
