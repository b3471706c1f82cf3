"""`kiln`: the command line. It parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from kilnlm.errors import KilnError

GENERATE_EXAMPLE = """example:
  kiln generate ./Llama-3.2-1B -p "The capital of France is" --max-tokens 32 --temperature 0
  kiln generate ./Llama-3.2-1B -p "A person as JSON:" --json-schema '{"type": "object", "properties": {"name": {"type": "string"}}}'
  kiln generate ./Llama-3.2-1B -p "Answer yes or no:" --grammar-file yes_no.gbnf
"""
CHAT_EXAMPLE = """example:
  kiln chat ./Qwen2-0.5B-Instruct --system "You are terse."
  (inside the chat: /reset clears the conversation, /exit quits, Ctrl-C stops the current answer)
"""
DEMO_EXAMPLE = """example:
  kiln demo --prompt "ROMEO:" --max-tokens 200
"""
IMATRIX_EXAMPLE = """example:
  kiln imatrix ./Llama-3.2-1B --text wiki.txt -o llama1b.imatrix --ctx 512
  kiln quantize ./Llama-3.2-1B -o llama1b-q4_k_m.gguf --type q4_k_m --imatrix llama1b.imatrix
"""
QUANTIZE_EXAMPLE = """examples:
  kiln quantize ./Llama-3.2-1B -o llama1b-q4_k_m.gguf --type q4_k_m
  kiln quantize ./Llama-3.2-1B -o llama1b-q4_k_m.gguf --type q4_k_m --imatrix llama1b.imatrix
  kiln quantize ./Llama-3.2-1B -o llama1b-q8_0.gguf --type q8_0
  kiln quantize model-f16.gguf -o model-q4_0.gguf --type q4_0
  kiln quantize ./Llama-3.2-1B -o llama1b-gptq-q4_0.gguf --type q4_0 --method gptq --calib wiki.txt --act-order
  kiln quantize ./my-model -o my-gptq-q4_0.gguf --type q4_0 --method gptq --calib c4.txt --model-samples 64
  kiln quantize ./small-model -o small-q4_0.gguf --type q4_0 --method gptq --calib c4.txt --nsamples 256 \
      --model-samples 128 --tune-steps 300
  kiln quantize ./Llama-3.2-1B -o llama1b-int8.gguf --method llm-int8 --calib wiki.txt
"""
SERVE_EXAMPLE = """examples:
  kiln serve llama1b-q4_0.gguf --port 8080 --parallel 8            # 8 streams decoded in one batch
  kiln serve ./Qwen2-0.5B-Instruct --host 0.0.0.0 --api-key "$KEY"     # beyond loopback only with a key
  python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8080/v1', api_key='x'); \\
print(c.chat.completions.create(model='kilnlm', messages=[{'role': 'user', 'content': 'Hi'}]).choices[0].message.content)"
"""
PLAN_EXAMPLE = """examples:
  kiln plan llama8b-q4_0.gguf --device cuda                  # the largest context that fits this GPU
  kiln plan llama8b-q4_0.gguf --device cuda --free-gib 8 --cache-type-k q8_0 --cache-type-v q8_0
  kiln plan ./Llama-3.2-1B --ctx 8192 --parallel 4 --json
"""
EXPORT_EXAMPLE = """examples:
  kiln export ./Llama-3.2-1B-Instruct -o llama1b-onnx --format onnx --type f16 --ep cuda
  kiln export ./Qwen2-0.5B -o qwen-onnx                    # f32, CPU
  kiln export llama1b-gptq-q4_0.gguf -o llama1b-q4-onnx   # GPTQ blocks kept exactly (MatMulNBits)
  python -c "import onnxruntime_genai as og; og.Model('qwen-onnx')"   # the folder loads in onnxruntime-genai
"""
BENCH_EXAMPLE = """examples:
  kiln bench --shape llama-8b --device cuda          # random weights, no download
  kiln bench llama1b-q4_0.gguf --device cuda --json
  kiln bench --dry-run                               # the harness on a tiny model, on the CPU
  kiln bench --shape llama-8b --device cuda --ctx 32768 --cache-type-k q8_0 --cache-type-v q8_0
  kiln bench --shape mamba-2.8b --device cuda --ctx 8192     # decode cost stays flat with context
"""
INSPECT_EXAMPLE = """examples:
  kiln inspect llama1b-q8_0.gguf
  kiln inspect llama1b-q8_0.gguf --json > info.json
"""
TOKENIZE_EXAMPLE = """examples:
  kiln tokenize ggml-vocab-llama-bpe.gguf --text "Hello world"
  kiln tokenize ./Llama-3.2-1B --text "Hello world" --add-bos
  kiln tokenize ggml-vocab-qwen2.gguf --cases ggml-vocab-qwen2.gguf.inp > qwen2.out   # llama.cpp's test files
"""
LLAMA_CPP_CASE_SEPARATOR = "\n__ggml_vocab_test__\n"
PERPLEXITY_EXAMPLE = """examples:
  kiln perplexity llama1b-q8_0.gguf --text wiki.test.raw --ctx 512
  kiln perplexity ./Llama-3.2-1B --text wiki.test.raw --chunks 20 --device cuda
  kiln perplexity llama1b-q4_0.gguf --text wiki.test.raw --kl-base llama1b-f16.gguf
(llama.cpp's protocol: chunks of --ctx tokens, BOS first, the second half of each chunk scored)
"""


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bf16 or fp16 (auto: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: model's, at most 4096)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading pytorch_model.bin pickle weights (only for checkpoints you trust)")
    _add_cache_options(parser)
    _add_cpu_options(parser)


def _add_cpu_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the packed-weight kernels and torch (default: the physical cores)")
    parser.add_argument("--cpu-activations", choices=("i16", "i8", "f32"), default="i16",
                        help="how a CPU decode step of one sequence multiplies block formats: i16 quantizes each "
                             "matmul's input to int16 per 32 values (outputs within ~2e-5 of f32's), i8 to int8 as "
                             "llama.cpp does (faster, ~5e-3), f32 keeps float32 products (slowest); batches and "
                             "prompts always take float32 products (default: i16)")


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    from kilnlm.runtime.kv_stores import KV_TYPES

    for side in ("k", "v"):
        parser.add_argument(f"--cache-type-{side}", default=None, choices=KV_TYPES,
                            help=f"KV cache element type for {'keys' if side == 'k' else 'values'} "
                                 "(default: the model's dtype)")
    parser.add_argument("--no-kv-rotation", action="store_true",
                        help="do not Hadamard-rotate quantized keys and values before packing them")


def _cache_kwargs(args: argparse.Namespace) -> dict:
    return {"k_type": args.cache_type_k, "v_type": args.cache_type_v, "kv_rotation": not args.no_kv_rotation}


def _add_sampling_options(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument("--max-tokens", "-n", type=int, default=256, help="most new tokens to generate (default: 256)")
    parser.add_argument("--temperature", "-t", type=float, default=temperature,
                        help=f"sampling temperature, 0 is greedy (default: {temperature})")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    parser.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1.0: off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop when this string appears (repeatable)")
    constrained = parser.add_mutually_exclusive_group()
    constrained.add_argument("--json-schema", default=None, metavar="SCHEMA",
                             help="answer only JSON valid under this schema (JSON text; '{}' for any JSON value)")
    constrained.add_argument("--grammar-file", default=None, metavar="FILE",
                             help="answer only text this grammar allows: .gbnf (llama.cpp's), .lark or .json (a schema)")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repeat_penalty,
        "seed": args.seed, "stop": args.stop,
    }


def _grammar_kwargs(args: argparse.Namespace) -> dict:
    """The grammar of --json-schema / --grammar-file, read before the model loads so mistakes fail fast."""
    from kilnlm.runtime.grammar import Grammar

    if args.json_schema is not None:
        return {"grammar": Grammar.json_schema(args.json_schema)}
    if args.grammar_file is not None:
        return {"grammar": Grammar.from_file(args.grammar_file)}
    return {}


def _load(args: argparse.Namespace, model: str | None, **engine_options):
    from kilnlm.runtime.engine import Engine, demo_model_path

    path = model or demo_model_path()
    started = time.perf_counter()
    engine = Engine.load(path, device=args.device, dtype=args.dtype, context_length=args.ctx,
                         allow_pickle=args.allow_pickle, threads=args.threads, cpu_activations=args.cpu_activations,
                         **_cache_kwargs(args), **engine_options)
    from kilnlm.runtime.bench import weight_bytes

    weights = weight_bytes(engine.model)
    cache = engine.cache  # allocated now, as llama.cpp does, so the figure is real
    state = cache.state_nbytes()
    kv = cache.nbytes() - state
    where = f"{args.device}"
    if next(engine.model.parameters()).is_cuda:
        import torch

        where += f", {torch.cuda.memory_allocated() / 2**20:.0f} MiB of GPU memory allocated"
    kv_types = "/".join(engine.kv_options[side] or "model dtype" for side in ("k_type", "v_type"))
    held = [f"{kv / 2**20:.1f} MiB of KV cache ({kv_types}, {engine.context_length} tokens)"] if kv or not state else []
    held += [f"{state / 2**20:.1f} MiB of float32 recurrent state"] if state else []
    _info(f"loaded {path} ({engine.config.architecture}, {weights / 2**20:.1f} MiB of weights, {', '.join(held)} "
          f"on {where}) in {time.perf_counter() - started:.2f}s")
    return engine


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stream_to_stdout(pieces: Iterator[str]) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()


def _report(engine) -> None:
    stats = engine.last_stats
    _info(f"[{stats.prompt_tokens} prompt tokens ({stats.reused_tokens} cached), {stats.generated_tokens} generated, "
          f"prefill {stats.prefill_tokens_per_second:.1f} tok/s, decode {stats.decode_tokens_per_second:.1f} tok/s, "
          f"stopped: {stats.finish_reason}]")


def cmd_generate(args: argparse.Namespace) -> int:
    """kiln generate: continue a prompt; only the generated text goes to stdout."""
    grammar = _grammar_kwargs(args)
    engine = _load(args, args.model)
    _stream_to_stdout(engine.generate(args.prompt, stream=True, **_sampling_kwargs(args), **grammar))
    sys.stdout.write("\n")
    _report(engine)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """kiln demo: generate with the bundled model and report the speed."""
    grammar = _grammar_kwargs(args)
    engine = _load(args, None)
    sys.stdout.write(args.prompt)  # the demo shows its prompt; `kiln generate` prints only new text
    _stream_to_stdout(engine.generate(args.prompt, stream=True, **_sampling_kwargs(args), **grammar))
    sys.stdout.write("\n")
    stats = engine.last_stats
    print(f"[demo] {stats.generated_tokens} tokens, decode {stats.decode_tokens_per_second:.1f} tokens/s, "
          f"prefill {stats.prefill_tokens_per_second:.1f} tokens/s on {args.device}", flush=True)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """kiln chat: an interactive, streaming conversation that reuses the KV cache across turns."""
    from kilnlm.runtime.engine import _generation_params

    _generation_params(**_sampling_kwargs(args))  # bad sampling options fail now, not at the first message
    grammar = _grammar_kwargs(args)
    engine = _load(args, args.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    _info("chat ready: type a message; /reset clears the conversation, /exit quits, Ctrl-C stops an answer")
    while True:
        line = _read_user_line()
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            engine.reset()
            _info("(conversation cleared)")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": _answer(engine, messages, args, grammar)})


def _read_user_line() -> str | None:
    try:
        return input("> " if sys.stdin.isatty() else "")
    except (EOFError, KeyboardInterrupt):
        return None


def _answer(engine, messages: list[dict], args: argparse.Namespace, grammar: dict) -> str:
    pieces: list[str] = []
    try:
        for piece in engine.chat(messages, stream=True, **_sampling_kwargs(args), **grammar):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        _info("\n(answer stopped)")
    sys.stdout.write("\n")
    sys.stdout.flush()
    _report(engine)
    return "".join(pieces)


def cmd_quantize(args: argparse.Namespace) -> int:
    """kiln quantize: write a GGUF file of the chosen type and method from an HF folder or a GGUF file."""
    from tqdm import tqdm

    from kilnlm.export.checkpoint import open_checkpoint
    from kilnlm.export.gguf import write_gguf

    checkpoint = open_checkpoint(args.source, allow_pickle=args.allow_pickle)
    quantizer, extra = None, {}
    if args.imatrix is not None:
        if args.method != "rtn":
            raise KilnError("--imatrix weights round-to-nearest as llama-quantize does; GPTQ and LLM.int8 calibrate "
                            "with their own statistics, so drop --imatrix or use --method rtn")
        from kilnlm.quant.imatrix import ImportanceMatrix
        from kilnlm.quant.rtn import RoundToNearest

        quantizer = RoundToNearest(ImportanceMatrix.load(args.imatrix), args.imatrix)
    if args.method == "gptq":
        quantizer = _gptq_quantizer(args, checkpoint)
        extra["kilnlm.quantization.recipe"] = quantizer.recipe.describe()
        if args.tune_steps:
            quantizer = _tuner(args, quantizer)
            extra["kilnlm.quantization.tuning"] = quantizer.recipe.describe()
    elif args.tune_steps:
        raise KilnError("--tune-steps tunes what GPTQ calibrated; use it with --method gptq")
    elif args.method == "llm-int8":
        quantizer = _llm_int8_quantizer(args, checkpoint)
        args.type = "f16"  # the block linears are int8 codes; embeddings and the output stay f16
    with tqdm(total=len(checkpoint.tensor_names()), desc=f"writing {args.type}", unit="tensor",
              file=sys.stderr) as bar:
        def advance(name: str, ggml_type: str) -> None:
            bar.set_postfix_str(f"{name} -> {ggml_type}", refresh=False)
            bar.update()

        summary = write_gguf(checkpoint, args.output, args.type, quantizer=quantizer, extra_metadata=extra,
                             on_tensor=advance)
    if quantizer is not None and getattr(quantizer, "errors", None):
        ratios = [gptq / rtn for gptq, rtn in quantizer.errors.values() if rtn > 0]
        _info(f"GPTQ output error / RTN output error on the calibration data: mean {sum(ratios) / len(ratios):.3f} "
              f"over {len(ratios)} matrices")
    types = ", ".join(f"{count} {name}" for name, count in sorted(summary.types.items()))
    print(f"wrote {summary.path}: {summary.file_bytes / 2**20:.2f} MiB, {summary.parameters / 1e6:.2f}M parameters, "
          f"{summary.bits_per_weight:.2f} bits per weight, {summary.seconds:.1f}s ({types})")
    return 0


def _gptq_quantizer(args: argparse.Namespace, checkpoint):
    from tqdm import tqdm

    from kilnlm.errors import KilnError
    from kilnlm.export.gguf_types import TARGET_TYPES
    from kilnlm.quant.gptq import GPTQ_FORMATS, gptq_quantizer

    solvable = [t for t, (fmt, _) in TARGET_TYPES.items() if fmt in GPTQ_FORMATS]
    if TARGET_TYPES[args.type][0] not in GPTQ_FORMATS:
        raise KilnError(f"--method gptq writes {', '.join(solvable)}; --type {args.type} has no grid to solve for")
    if args.group_size != 32:
        raise KilnError("ggml's blocks fix the group size at 32 (16 for Q6_K); other group sizes need a "
                        "kilnlm-native INT4 format, which does not exist yet")
    if not args.calib:
        _info("no --calib text given: calibrating on text sampled from the model itself (real text is better)")
    bar = tqdm(total=checkpoint.config.num_layers, desc="GPTQ", unit="block", file=sys.stderr)
    return gptq_quantizer(checkpoint, calib_files=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                          seed=args.seed, model_samples=args.model_samples, act_order=args.act_order,
                          scale_search=not args.no_scale_search, float_targets=not args.no_float_targets,
                          device=args.device, on_layer=lambda i, n: bar.update())


def _tuner(args: argparse.Namespace, quantizer):
    from tqdm import tqdm

    from kilnlm.quant.tune import EndToEndTuner, TuneRecipe

    recipe = TuneRecipe(steps=args.tune_steps, lr=args.tune_lr, seed=args.seed)
    bars: list[tqdm] = []  # opened at the first step, so it does not sit at 0 below GPTQ's bar

    def on_step(done: int, total: int, loss: float) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="tuning scales", unit="step", file=sys.stderr))
        bars[0].set_postfix_str(f"KL {loss:.4f}", refresh=False)
        bars[0].update()

    return EndToEndTuner(quantizer, quantizer.ids, recipe, device=args.device, on_step=on_step)


def _llm_int8_quantizer(args: argparse.Namespace, checkpoint):
    from tqdm import tqdm

    from kilnlm.quant.llm_int8 import llm_int8_quantizer

    if not args.calib:
        _info("no --calib text given: calibrating on text sampled from the model itself (real text is better)")
    bar = tqdm(total=checkpoint.config.num_layers, desc="LLM.int8 calibration", unit="block", file=sys.stderr)
    return llm_int8_quantizer(checkpoint, calib_files=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                              seed=args.seed, model_samples=args.model_samples, threshold=args.threshold,
                              device=args.device, on_layer=lambda i, n: bar.update())


def cmd_bench(args: argparse.Namespace) -> int:
    """kiln bench: prefill/decode speed, peak memory and decode's share of the memory roofline."""
    import json

    from kilnlm.runtime import bench
    from kilnlm.runtime.engine import _device, resolve_dtype
    from kilnlm.runtime.threads import torch_threads

    if args.dry_run:  # the harness on a tiny model of the same family, anywhere, in seconds; figures mean nothing
        args.shape = "tiny-mamba" if args.shape.startswith("mamba") else "tiny"
        args.prompt_tokens, args.new_tokens = 32, 8
    elif args.ctx is not None:  # decode at that context: the prompt fills it up to the decoded tokens
        if args.ctx <= args.new_tokens:
            raise KilnError(f"--ctx {args.ctx} leaves no room for a prompt before {args.new_tokens} new tokens")
        args.prompt_tokens = args.ctx - args.new_tokens
    threads = None  # a loaded file's engine decides (--threads); a synthetic model runs on torch's threads
    if args.model:
        engine = _load(args, args.model)
        model, threads = engine.model, engine.threads
    else:
        device = _device(args.device)
        model = bench.synthetic_model(bench.synthetic_config(args.shape), device, resolve_dtype(args.dtype, device))
    with torch_threads(threads):
        result = bench.run_bench(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                 kv_options=_cache_kwargs(args))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    peak = f"{result.peak_memory_bytes / 2**30:.2f} GiB" if result.peak_memory_bytes is not None else "n/a (CPU)"
    print(f"device {result.device}{' (dry run: tiny model, figures are not meaningful)' if args.dry_run else ''}\n"
          f"prefill  {result.prefill_tokens_per_s:10.1f} tokens/s  ({result.prompt_tokens}-token prompt)\n"
          f"decode   {result.decode_tokens_per_s:10.1f} tokens/s  ({result.new_tokens} tokens, batch 1)\n"
          f"weights  {result.weight_bytes / 2**20:10.1f} MiB read per token; copy bandwidth "
          f"{result.bandwidth_gb_per_s:.1f} GB/s -> roofline {result.roofline_tokens_per_s:.1f} tokens/s\n"
          f"decode is {100 * result.roofline_share:.1f}% of the roofline; peak memory {peak}\n"
          f"cache    {result.kv_bytes / 2**20:10.1f} MiB after {result.prompt_tokens + result.new_tokens} positions "
          f"({'recurrent state' if model.config.ssm is not None and not model.config.num_heads else 'keys and values'})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """kiln inspect: a GGUF file's metadata and tensor table."""
    import json

    from kilnlm.export.inspect import describe_gguf, format_description

    description = describe_gguf(args.file)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    """kiln tokenize: print token ids the way llama.cpp's .out files list them."""
    from pathlib import Path

    from kilnlm.export.checkpoint import open_tokenizer

    tokenizer = open_tokenizer(args.model)
    if args.text is not None:
        texts = [args.text]
    else:
        try:
            raw = Path(args.cases).read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise KilnError(f"{args.cases}: cannot read the test cases ({e})") from e
        # As llama.cpp's test-tokenizer-0 reads them: no empty case after a final separator.
        texts = raw.removesuffix(LLAMA_CPP_CASE_SEPARATOR).split(LLAMA_CPP_CASE_SEPARATOR)
    for text in texts:
        print(" ".join(str(i) for i in tokenizer.encode(text, add_bos=args.add_bos)))
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    """kiln perplexity: llama.cpp-style perplexity of a text file; the last stdout line is `ppl = X +/- Y`."""
    from pathlib import Path

    from tqdm import tqdm

    from kilnlm.runtime.perplexity import perplexity

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except OSError as err:
        raise KilnError(f"cannot read {args.text}: {err.strerror}") from None
    engine = _load(args, args.model)
    base = _load(args, args.kl_base) if args.kl_base else None
    if base is not None and base.tokenizer.encode(text) != engine.tokenizer.encode(text):
        raise KilnError(f"{args.kl_base} tokenizes the text differently from {args.model}; "
                        "a divergence needs the same tokenizer")
    with tqdm(desc="perplexity", unit="chunk", file=sys.stderr) as bar:
        def advance(done: int, total: int, running_ppl: float) -> None:
            bar.total = total
            bar.set_postfix_str(f"ppl={running_ppl:.4f}", refresh=False)
            bar.update(done - bar.n)

        result = perplexity(engine.model, engine.tokenizer, text, ctx=args.ctx, chunks=args.chunks,
                            batch=args.batch, on_chunk=advance, base=base.model if base is not None else None,
                            kv_options=engine.kv_options)
    print(f"{result.tokens_scored} tokens scored, {result.chunks} chunks, ctx {result.ctx}, {result.seconds:.1f}s")
    if result.divergence is not None:
        d = result.divergence
        print(f"base ppl = {d.base_ppl:.4f}; KL(base || model) = {d.kl_mean:.6f} +/- {d.kl_stderr:.6f}; "
              f"same top token {100 * d.same_top:.2f}%")
    print(f"ppl = {result.ppl:.4f} +/- {result.stderr:.4f}")
    return 0


def cmd_imatrix(args: argparse.Namespace) -> int:
    """kiln imatrix: llama.cpp's importance matrix of a model over a calibration text."""
    from pathlib import Path

    from kilnlm.export.gguf import GGUF_ARCHITECTURES, gguf_name
    from kilnlm.quant.imatrix import check_output, collect

    check_output(args.output)
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise KilnError(f"{args.text}: cannot read the calibration text ({err})") from None
    engine = _load(args, args.model)
    tokenizer = engine.tokenizer
    arch = GGUF_ARCHITECTURES[engine.config.architecture]
    started = time.perf_counter()
    matrix = collect(engine.model, tokenizer.encode(text, add_bos=False), ctx=engine.context_length,
                     bos_id=tokenizer.bos_id if tokenizer.add_bos else None, source=str(args.text),
                     gguf_name=lambda name: gguf_name(name, arch), max_chunks=args.chunks)
    matrix.save(args.output)
    print(f"wrote {args.output}: {len(matrix.sums)} weights, {matrix.chunk_count} chunks of {matrix.chunk_size} "
          f"tokens, {time.perf_counter() - started:.1f}s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """kiln export: write an ONNX folder that onnxruntime and onnxruntime-genai run."""
    from pathlib import Path

    from kilnlm.export.checkpoint import open_checkpoint
    from kilnlm.export.onnx import write_onnx

    source = Path(args.source)
    checkpoint = open_checkpoint(source, allow_pickle=args.allow_pickle)
    summary = write_onnx(checkpoint, args.output, args.type, ep=args.ep, accuracy_level=args.accuracy_level,
                         context_length=args.ctx, source_folder=source if source.is_dir() else None)
    _info(f"wrote {summary.folder}: {summary.bytes / 2**20:.2f} MiB (--type {args.type} for float-stored weights; "
          f"block-quantized ones as stored), {summary.seconds:.1f}s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """kiln serve: an OpenAI-compatible server on loopback."""
    from pathlib import Path

    from kilnlm.runtime.server import ServerSettings, serve

    settings = ServerSettings(host=args.host, port=args.port, api_key=args.api_key,
                              allowed_origins=tuple(args.allow_origin), max_tokens_cap=args.max_tokens_cap,
                              queue_cap=args.queue_cap, model_name=args.model_name or Path(args.model or "demo").name)
    settings.check()  # before the (slow) load
    _info(f"serving {settings.model_name} on http://{args.host}:{args.port}/v1 (Ctrl-C stops); /health answers "
          "503 until the model has loaded")
    serve(lambda: _load(args, args.model, parallel=args.parallel), settings)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """kiln plan: the memory a model would take on a device, without loading it."""
    import json

    from kilnlm.runtime.engine import Engine

    free = int(args.free_gib * 2**30) if args.free_gib is not None else None
    plan = Engine.plan(args.model, device=args.device, dtype=args.dtype, context_length=args.ctx,
                       k_type=args.cache_type_k, v_type=args.cache_type_v, parallel=args.parallel, free_bytes=free)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `kiln` subcommand."""
    from kilnlm.export.gguf_types import TARGET_TYPES

    parser = argparse.ArgumentParser(prog="kiln", description="kilnlm: quantize and run LLMs locally.",
                                     epilog="run `kiln COMMAND --help` for each command's options and an example",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str, example: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=example,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(func=func)
        return sub

    gen = add("generate", cmd_generate, "Continue a prompt with a model.", GENERATE_EXAMPLE)
    gen.add_argument("model", help="Hugging Face checkpoint folder or GGUF file")
    gen.add_argument("--prompt", "-p", required=True, help="text to continue")
    _add_sampling_options(gen, temperature=0.8)
    _add_model_options(gen)

    chat = add("chat", cmd_chat, "Chat interactively with a model (the bundled demo model by default).", CHAT_EXAMPLE)
    chat.add_argument("model", nargs="?", default=None,
                      help="Hugging Face checkpoint folder or GGUF file (default: the demo model)")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_options(chat, temperature=0.7)
    _add_model_options(chat)

    demo = add("demo", cmd_demo, "Generate text with the bundled demo model and report tokens/s.", DEMO_EXAMPLE)
    demo.add_argument("--prompt", "-p", default="ROMEO:", help="text to continue (default: ROMEO:)")
    _add_sampling_options(demo, temperature=0.8)
    demo.set_defaults(max_tokens=200, seed=0)
    _add_model_options(demo)

    server = add("serve", cmd_serve, "Serve a model over an OpenAI-compatible HTTP API on loopback.", SERVE_EXAMPLE)
    server.add_argument("model", nargs="?", default=None, help="HF folder, GGUF file or ONNX folder (default: demo)")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key)")
    server.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    server.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    server.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a browser origin allowed by CORS, e.g. http://localhost:3000 (repeatable)")
    server.add_argument("--max-tokens-cap", type=int, default=4096, help="most tokens one request may generate")
    server.add_argument("--queue-cap", type=int, default=16, help="requests waiting or running before 503s")
    server.add_argument("--model-name", default=None, help="the model id clients see (default: the file name)")
    server.add_argument("--parallel", type=int, default=1,
                        help="sequences decoded together in one batch (continuous batching; default 1)")
    _add_model_options(server)

    planner = add("plan", cmd_plan, "Print the memory a model would need on a device, without loading it.",
                  PLAN_EXAMPLE)
    planner.add_argument("model", help="HF folder or GGUF file")
    planner.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    planner.add_argument("--dtype", default="auto", help="auto, float32, bf16, fp16 (default auto)")
    planner.add_argument("--ctx", type=int, default=None, help="context length (default: the largest that fits "
                         "the free memory when it is known, else the model's up to 4096)")
    planner.add_argument("--parallel", type=int, default=1, help="sequences served at once (default 1)")
    planner.add_argument("--cache-type-k", default=None, help="KV type of keys (f16, bf16, f32, q8_0, q4_0)")
    planner.add_argument("--cache-type-v", default=None, help="KV type of values")
    planner.add_argument("--free-gib", type=float, default=None,
                         help="free device memory to plan against, in GiB (default: read from the CUDA device)")
    planner.add_argument("--json", action="store_true", help="print the plan as JSON")

    imatrix = add("imatrix", cmd_imatrix, "Compute llama.cpp's importance matrix over a calibration text.",
                  IMATRIX_EXAMPLE)
    imatrix.add_argument("model", help="Hugging Face checkpoint folder or GGUF file")
    imatrix.add_argument("--text", "-f", required=True, help="plain-text calibration file")
    imatrix.add_argument("--output", "-o", required=True, help="file to write (llama-imatrix's GGUF form)")
    imatrix.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all)")
    _add_model_options(imatrix)
    imatrix.set_defaults(ctx=512)

    export = add("export", cmd_export, "Write an ONNX folder (model.onnx + genai_config.json) that onnxruntime "
                 "and onnxruntime-genai run.", EXPORT_EXAMPLE)
    export.add_argument("source", help="Hugging Face checkpoint folder or GGUF file (Llama, Mistral, Qwen2)")
    export.add_argument("--output", "-o", required=True, help="folder to create (written atomically)")
    export.add_argument("--format", default="onnx", choices=["onnx"], help="output format (default: onnx)")
    export.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0", "q4_0", "q4_1"],
                        help="type of the weights the source stores as floats (default: f32); a GGUF's Q4_0 / Q4_1 / "
                        "Q8_0 and LLM.int8 weights keep their exact values in MatMulNBits whatever this says")
    export.add_argument("--accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                        help="MatMulNBits compute type: 0 the input's, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations "
                        "(default: 4 with --ep cpu, 0 with cuda, as onnxruntime-genai's builder)")
    export.add_argument("--ep", default="cpu", choices=["cpu", "cuda"],
                        help="onnxruntime-genai execution provider recorded in genai_config.json (default: cpu)")
    export.add_argument("--ctx", type=int, default=None, help="context length for genai (default: the model's)")
    export.add_argument("--allow-pickle", action="store_true", help="read pytorch_model.bin (runs pickle code)")

    quantize = add("quantize", cmd_quantize, "Write a GGUF file (f32, f16, bf16, q8_0, q4_0, q4_1) from an HF "
                   "folder or a GGUF file.", QUANTIZE_EXAMPLE)
    quantize.add_argument("source", help="Hugging Face checkpoint folder or GGUF file")
    quantize.add_argument("--output", "-o", required=True, help="GGUF file to write (replaced atomically)")
    quantize.add_argument("--type", default="q8_0", choices=list(TARGET_TYPES),
                          help="target type, as llama-quantize's: the K-quant mixes (q4_k_m, ...) give some tensors "
                          "more bits by llama.cpp's rules (default: q8_0)")
    quantize.add_argument("--imatrix", default=None, metavar="FILE",
                          help="an importance matrix (kiln imatrix's or llama-imatrix's, GGUF or .dat) that weights "
                          "the rounding, as llama-quantize --imatrix")
    quantize.add_argument("--method", default="rtn", choices=["rtn", "gptq", "llm-int8"],
                          help="rtn: round to nearest (llama-quantize's way); gptq: calibrated GPTQ; llm-int8: "
                          "int8 weights with fp16 outlier columns, a kilnlm-only file (--type is then ignored)")
    quantize.add_argument("--threshold", type=float, default=6.0,
                          help="llm-int8: activation magnitude that makes an input feature an outlier (default 6.0)")
    quantize.add_argument("--calib", nargs="+", default=[], metavar="FILE",
                          help="plain-text calibration files for gptq/llm-int8 (default: text sampled from the model)")
    quantize.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default: 128)")
    quantize.add_argument("--model-samples", type=int, default=None, metavar="K",
                          help="how many of the --nsamples sequences are text sampled from the model itself, the rest "
                          "coming from --calib (default: all without --calib, none with it). Half and half calibrates "
                          "for both the model's own domain and real text")
    quantize.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default: 512)")
    quantize.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows (default: 0)")
    quantize.add_argument("--act-order", action="store_true", help="gptq: visit columns by decreasing Hessian "
                          "diagonal (static groups keep one scale per ggml block)")
    quantize.add_argument("--no-scale-search", action="store_true", help="gptq: keep ggml's own block scales")
    quantize.add_argument("--no-float-targets", action="store_true", help="gptq: solve each layer for its own "
                          "output on the quantized model's inputs (the reference's way) instead of for the float "
                          "model's output, which also undoes the error of the layers before it")
    quantize.add_argument("--tune-steps", type=int, default=0, metavar="N",
                          help="gptq: after GPTQ, N Adam steps that tune the block scales, norms and float-stored "
                          "linears of the whole model towards the float model (KL on the calibration windows); codes "
                          "and file format are unchanged. It fits more parameters than GPTQ, so give it more windows "
                          "(--nsamples 256). Needs the float and quantized models in memory at once (default: 0, off)")
    quantize.add_argument("--tune-lr", type=float, default=1e-3, help="gptq: learning rate of --tune-steps "
                          "(default: 1e-3)")
    quantize.add_argument("--group-size", type=int, default=32, help="gptq group size; ggml blocks need 32")
    quantize.add_argument("--device", default="cpu", help="device for calibration (cpu, cuda)")
    quantize.add_argument("--allow-pickle", action="store_true", help="allow reading pytorch_model.bin pickles")

    bench = add("bench", cmd_bench, "Measure prefill and decode speed against the memory roofline.",
                BENCH_EXAMPLE)
    bench.add_argument("model", nargs="?", default=None, help="HF folder or GGUF file (or use --shape)")
    bench.add_argument("--shape", default="llama-1b",
                       help="synthetic model when no MODEL: llama-130m, llama-1b, llama-3b, llama-8b, mamba-130m, "
                            "mamba-2.8b, mamba2-130m, mamba2-2.7b, tiny, tiny-mamba")
    bench.add_argument("--prompt-tokens", type=int, default=512,
                       help="prefill length (default: 512; with --ctx N: N minus --new-tokens, so decode runs at N)")
    bench.add_argument("--new-tokens", type=int, default=128, help="decode steps (default: 128)")
    bench.add_argument("--dry-run", action="store_true", help="run the harness on a tiny model (CPU-friendly)")
    bench.add_argument("--json", action="store_true", help="print JSON")
    _add_model_options(bench)

    inspect = add("inspect", cmd_inspect, "Show a GGUF file's metadata, tensors and size.", INSPECT_EXAMPLE)
    inspect.add_argument("file", help="GGUF file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")

    tokenize = add("tokenize", cmd_tokenize, "Print the token ids of a text.", TOKENIZE_EXAMPLE)
    tokenize.add_argument("model", help="GGUF file (vocab-only files work) or Hugging Face folder")
    source = tokenize.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text to tokenize")
    source.add_argument("--cases", metavar="FILE", help="a llama.cpp .inp file: cases separated by "
                        "'__ggml_vocab_test__' lines; prints one line of ids per case, as its .out files")
    tokenize.add_argument("--add-bos", action="store_true", help="prepend the BOS token")

    ppl = add("perplexity", cmd_perplexity, "Measure a model's perplexity on a text file, as llama.cpp's "
              "llama-perplexity does.", PERPLEXITY_EXAMPLE)
    ppl.add_argument("model", help="Hugging Face checkpoint folder or GGUF file")
    ppl.add_argument("--text", "-f", required=True, help="UTF-8 text file (e.g. wikitext-2-raw wiki.test.raw)")
    ppl.add_argument("--kl-base", metavar="BASE", default=None,
                     help="also report the KL divergence from this model's predictions (e.g. the F16 file a "
                     "quantized one came from) and how often both pick the same top token, as llama-perplexity's "
                     "--kl-divergence does")
    ppl.add_argument("--ctx", type=int, default=512, help="tokens per chunk; the second half is scored (default: 512)")
    ppl.add_argument("--chunks", type=int, default=None, help="score at most this many chunks (default: all)")
    ppl.add_argument("--batch", type=int, default=1, help="chunks per forward pass (default: 1)")
    ppl.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    ppl.add_argument("--dtype", default="auto", help="auto, float32, bf16 or fp16 (auto: fp32 on CPU, bf16 on CUDA)")
    ppl.add_argument("--allow-pickle", action="store_true",
                     help="allow loading pytorch_model.bin pickle weights (only for checkpoints you trust)")
    _add_cache_options(ppl)
    _add_cpu_options(ppl)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kiln` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KilnError as err:
        print(f"kiln: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
