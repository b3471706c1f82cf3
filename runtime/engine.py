"""Engine: the public Python API. Load a model, then generate text or chat; no global state.

    from kilnlm import Engine
    engine = Engine.load("path/to/hf-folder", device="cpu")
    print(engine.generate("Once upon a time", max_tokens=50, temperature=0))
    for piece in engine.chat([{"role": "user", "content": "Hi"}], stream=True):
        print(piece, end="")

One engine holds one KV cache. Every call reuses the cached tokens its prompt starts with, so the next
turn of a conversation only runs the new messages.

Threading contract: one Engine may be called from several threads. Generations run one at a time in call
order (a streaming call holds the engine from its first piece to its last, or until the caller drops the
iterator); `cancel()` from any thread stops the running one at its next step (between prefill chunks or decode
steps) with finish reason "cancelled". `astream()` is the asyncio form of a streaming call. `close()` (or
leaving a `with Engine.load(...)` block) frees the model and cache; later calls raise EngineClosedError.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from kilnlm.errors import KilnError
from kilnlm.runtime.cache import Cache
from kilnlm.runtime.chat import ChatTemplate
from kilnlm.runtime.config import ModelConfig
from kilnlm.runtime.generate import GenerationParams, GenerationStats, Generator
from kilnlm.runtime.grammar import Grammar, GrammarVocabulary, TokenConstraint
from kilnlm.runtime.models import build_model, model_class, on_meta
from kilnlm.runtime.models.quantized_linear import keeps_packed
from kilnlm.kernels.cpu import CpuOptions
from kilnlm.runtime.onnx_decoder import is_onnx_folder, load_onnx_folder
from kilnlm.runtime.sampling import SamplingParams
from kilnlm.runtime.threads import physical_cores, torch_threads
from kilnlm.runtime.tokenizer import Tokenizer

DEFAULT_CONTEXT = 4096


class EngineClosedError(KilnError):
    """The engine was closed; load the model again to use it."""
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def demo_model_path() -> Path:
    """The small model bundled with kilnlm (see runtime/demo_model/TRAINING.md)."""
    return Path(__file__).resolve().parent / "demo_model"


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is fp32 on the CPU and bf16 (fp16 where bf16 is unsupported) on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise KilnError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class Engine:
    """A loaded model with its tokenizer, chat template and KV cache."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        context_length: int,
        chat_template: ChatTemplate | None = None,
        source: str = "",
        kv_options: dict | None = None,
        parallel: int = 1,
        threads: int | None = None,
    ):
        self.model = model
        self.threads = threads  # torch's intra-op threads during this engine's generations (None: leave torch's)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.chat_template = chat_template or ChatTemplate(
            tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
        )
        self.source = source
        self.kv_options = dict(kv_options or {})  # k_type, v_type, rotate: see runtime.cache.new_kv_cache
        self.last_stats = GenerationStats()
        self._cache: Cache | None = None
        self._lock = threading.Lock()  # one generation at a time (see the threading contract above)
        self._running: threading.Event | None = None  # the cancel flag of the generation running now
        self._closed = False
        if parallel < 1:
            raise KilnError(f"parallel must be at least 1, got {parallel}")
        self.parallel = parallel
        self._scheduler = None  # the continuous-batching worker when parallel > 1, started on first use
        self._grammar_vocabulary: GrammarVocabulary | None = None  # built on the first constrained call

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        context_length: int | None = None,
        allow_pickle: bool = False,
        packed_weights: bool | None = None,
        progress: bool = True,
        kv_type: str | None = None,
        k_type: str | None = None,
        v_type: str | None = None,
        kv_rotation: bool = True,
        paged_kv: bool = False,
        parallel: int = 1,
        threads: int | None = None,
        cpu_activations: str = "i16",
        on_progress: Callable[[int, int], bool | None] | None = None,
    ) -> Engine:
        """Load an HF checkpoint folder, a GGUF file or an ONNX folder (`kiln export`'s, or onnxruntime-genai's
        builder's) onto `device` in `dtype` ('auto', 'float32', 'bf16', ...; an ONNX graph keeps its own).

        `packed_weights` (the default for GGUF files) keeps the file's weights packed and multiplies through
        them: on CUDA the block linears (Triton kernels), on the CPU every F16/BF16 and block matrix up to Q6_K with
        the embedding and output (C kernels built at first use, runtime.models.quantized_linear); False dequantises
        them at load. `threads` (default: the physical cores) is what the CPU kernels use; given explicitly it is
        also torch's intra-op thread count while this engine generates (torch's setting is process-wide: it is set
        when a generation starts and restored when it ends). `cpu_activations` is how a decode step of one sequence
        multiplies block formats on the CPU (kernels.cpu.CpuOptions): 'i16' (default) quantises a matmul's input per
        32 values to int16 (outputs within ~2e-5 of float32's, ~2x faster), 'i8' to int8 as llama.cpp does, 'f32'
        keeps the dequantised model's float32 products; batches and prompts always take float32 products.
        `kv_type` sets the KV cache's element type for keys and values ('f16', 'bf16', 'f32', 'q8_0', 'q4_0';
        None: the model's dtype), `k_type` / `v_type` each side (as llama.cpp's --cache-type-k / -v);
        `kv_rotation` Hadamard-rotates quantized keys and values (on by default). `paged_kv` keeps the cache in
        16-position pages whose full pages are found again by the hash of their prefix (runtime.paged_cache).
        `parallel` > 1 runs up to that many generations at once in one batch (continuous batching over a shared
        page pool, runtime.scheduler; attention-only models); with 1 they run one after another.
        `on_progress(done, total)` is called after each weight tensor (a desktop app's progress bar); returning
        False aborts the load with LoadAbortedError, and what was loaded is freed.
        """
        from kilnlm.export.checkpoint import open_checkpoint

        path = Path(path)
        device = _device(device)
        cpu = CpuOptions(physical_cores() if threads is None else threads, cpu_activations)  # refuses bad values now
        kv_options = {"k_type": k_type or kv_type, "v_type": v_type or kv_type, "rotate": kv_rotation}
        if paged_kv:
            kv_options["paged"] = True
        if is_onnx_folder(path):  # onnxruntime runs the graph; its dtype and KV type are the graph's own
            model = load_onnx_folder(path, device)
            model.new_cache(1, **kv_options)  # refuses KV options before anything runs
            context = _context_length(model.config, context_length)
            return cls(model, Tokenizer.from_hf_folder(path), context_length=context, source=str(path),
                       kv_options=kv_options)
        checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
        tokenizer = checkpoint.tokenizer()
        config = checkpoint.config
        packed = packed_weights is not False and hasattr(checkpoint, "packed")
        source_tensors = checkpoint.tensors(packed=partial(keeps_packed, device)) if packed else checkpoint.tensors()
        if packed and device.type == "cpu":
            _check_cpu_kernels()
        tensors = tqdm(
            _reporting(source_tensors, checkpoint.num_tensors(), on_progress, str(path)),
            total=checkpoint.num_tensors() or None,
            desc=f"loading {path.name}",
            unit="tensor",
            file=sys.stderr,
            disable=not progress,
            leave=False,
        )
        model_dtype = resolve_dtype(dtype, device)
        if device.type == "cuda" and context_length is None:  # the largest context that fits, before allocating
            context_length = _plan(checkpoint, str(path), device, model_dtype, None, parallel, packed, None,
                                   kv_options["k_type"], kv_options["v_type"]).context_length
        with on_meta():  # refuse bad cache options before the (slow) weights load, allocating nothing
            model_class(config)(config).new_cache(1, **kv_options)
        if parallel > 1 and set(config.layer_kinds()) != {"attention"}:
            raise KilnError(f"{path}: parallel generation batches attention models over the paged cache; "
                            f"{config.architecture} has recurrent layers, so use parallel=1")
        model = build_model(config, tensors, device=device, dtype=model_dtype, source=str(path), cpu=cpu)
        _use_int8_linears(model, checkpoint)
        return cls(model, tokenizer, context_length=_context_length(config, context_length), source=str(path),
                   kv_options=kv_options, parallel=parallel, threads=threads)

    @classmethod
    def plan(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        context_length: int | None = None,
        kv_type: str | None = None,
        k_type: str | None = None,
        v_type: str | None = None,
        parallel: int = 1,
        packed_weights: bool | None = None,
        free_bytes: int | None = None,
    ):
        """The memory plan of loading `path` (runtime.plan.MemoryPlan) without loading it.

        Without `context_length` and with a known free memory (`free_bytes`, or the CUDA device's own), the plan
        is for the largest context that fits; OutOfMemoryPlanError when even the weights do not.
        """
        from kilnlm.export.checkpoint import open_checkpoint

        device = torch.device(device)
        # Planning for a GPU this machine does not have (a what-if): 'auto' means bf16 there.
        no_gpu = device.type == "cuda" and not torch.cuda.is_available()
        model_dtype = torch.bfloat16 if no_gpu and dtype == "auto" else resolve_dtype(dtype, torch.device("cpu")
                                                                                      if no_gpu else device)
        packed = packed_weights is not False
        return _plan(open_checkpoint(Path(path)), str(path), device, model_dtype, context_length, parallel, packed,
                     free_bytes, k_type or kv_type, v_type or kv_type)

    @property
    def config(self) -> ModelConfig:
        """The model's architecture and sizes."""
        return self.model.config

    @property
    def cache(self) -> Cache:
        """The engine's KV cache, allocated on first use."""
        if self._cache is None:
            self._cache = self.model.new_cache(self.context_length, **self.kv_options)
        return self._cache

    def cached_tokens(self) -> int:
        """Positions the cache holds now (read without waiting for a running generation); with parallel > 1, the
        positions of the page-pool pages in use."""
        if self._scheduler is not None:
            pool = self._scheduler.pool
            return sum(page.refs > 0 for page in pool.pages) * pool.page
        cache = self._cache
        return cache.length if cache is not None else 0

    def reset(self) -> None:
        """Forget the cached conversation."""
        with self._lock:
            if self._cache is not None:
                self._cache.reset()

    def cancel(self) -> None:
        """Stop the running generation(s) at their next step (from any thread); no effect when none runs."""
        running = self._running
        if running is not None:
            running.set()
        for flag in self._scheduler.running() if self._scheduler is not None else ():
            flag.set()

    def close(self) -> None:
        """Free the model and the cache (waits for a running generation); later calls raise EngineClosedError."""
        self.cancel()
        with self._lock:
            if self._closed:
                return
            device = next(self.model.parameters()).device
            if self._scheduler is not None:
                self._scheduler.close()
            self.model, self._cache, self._scheduler, self._closed = None, None, None, True
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        stream: bool = False,
        add_bos: bool | None = None,
        on_finish: Callable[[GenerationStats], None] | None = None,
        cancel: threading.Event | None = None,
        grammar: Grammar | TokenConstraint | None = None,
        **options,
    ) -> str | Iterator[str]:
        """Continue `prompt` (text or token ids); options: max_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, seed, stop, ignore_eos. Returns the text, or an iterator of pieces with stream=True.
        `on_finish(stats)` is called when the generation ends (stats of this call, whatever other threads do);
        setting `cancel` (from any thread) stops this call, and only this one, at its next step. With a
        `grammar` (runtime.grammar.Grammar: a JSON schema, Lark, regex or GBNF) only text it allows comes out,
        and the generation ends (finish reason "stop") when the grammar is complete. A TokenConstraint from
        `constraint()` may stand for the grammar; it serves one generation."""
        ids = self.tokenizer.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
        return self._run(ids, _generation_params(**options), stream, on_finish, cancel, grammar)

    def chat(self, messages: list[dict], *, stream: bool = False,
             on_finish: Callable[[GenerationStats], None] | None = None, cancel: threading.Event | None = None,
             grammar: Grammar | TokenConstraint | None = None, tools: list[dict] | None = None,
             **options) -> str | Iterator[str]:
        """Answer the conversation `messages` ([{"role": ..., "content": ...}, ...]) as the assistant; `tools`
        (OpenAI-style function definitions) are shown to the model through its chat template."""
        ids = self.chat_prompt_ids(messages, tools=tools)
        return self._run(ids, _generation_params(**options), stream, on_finish, cancel, grammar)

    async def astream(self, prompt: str | Sequence[int] | list[dict], **options) -> AsyncIterator[str]:
        """The pieces of generate(prompt) (or chat(messages) for a list of message dicts) for asyncio code; the
        generation runs in a worker thread at most a few pieces ahead of the consumer, and closing the async
        iterator (a client that went away) cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=4)  # backpressure: a stalled consumer stalls generation
        done, stop = object(), threading.Event()  # this call's own cancel flag: a late set cannot hit the next one
        options = {**options, "cancel": stop}
        is_chat = isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)

        def put(item) -> None:
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

        finished = asyncio.Event()

        def produce() -> None:
            try:
                pieces = self.chat(prompt, stream=True, **options) if is_chat else \
                    self.generate(prompt, stream=True, **options)
                for piece in pieces:
                    put(piece)
            except BaseException as err:  # handed to the consumer, which raises it
                put(err)
            put(done)
            loop.call_soon_threadsafe(finished.set)

        # A thread per stream, not the loop's default executor: its few workers would cap how many requests
        # can wait on (or, with parallel > 1, run in) the engine at once.
        threading.Thread(target=produce, name="kilnlm-stream", daemon=True).start()
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # no effect once the generation has ended
            while not finished.is_set():  # let the worker finish its pending puts
                while not queue.empty():
                    queue.get_nowait()
                await asyncio.sleep(0.005)

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The conversation rendered with the chat template (and `tools`, when given) and tokenized, ready for
        the assistant's turn."""
        text = self.chat_template.render(messages, add_generation_prompt=True, **({"tools": tools} if tools else {}))
        bos = self.tokenizer.bos_token
        # Templates usually write the BOS themselves; add one only when the tokenizer wants it and it is absent.
        add_bos = self.tokenizer.add_bos and not (bos and text.startswith(bos))
        return self.tokenizer.encode(text, add_bos=add_bos)

    def constraint(self, grammar: Grammar) -> TokenConstraint:
        """A fresh matcher of `grammar` over this model's vocabulary (GrammarError if it does not compile)."""
        vocabulary = self._grammar_vocabulary
        if vocabulary is None:  # two threads may both build it; the result is the same
            vocabulary = self._grammar_vocabulary = GrammarVocabulary(self.tokenizer)
        return vocabulary.constraint(grammar)

    def _run(self, ids: list[int], params: GenerationParams, stream: bool,
             on_finish: Callable[[GenerationStats], None] | None,
             cancel: threading.Event | None, grammar: Grammar | TokenConstraint | None) -> str | Iterator[str]:
        # A bad grammar fails here; a caller that compiled one already (the server, to answer 400) passes it on.
        constraint = grammar if isinstance(grammar, TokenConstraint) or grammar is None else self.constraint(grammar)
        pieces = self._locked_stream(ids, params, on_finish, cancel or threading.Event(), constraint)
        return pieces if stream else "".join(pieces)

    def _locked_stream(self, ids: list[int], params: GenerationParams,
                       on_finish: Callable[[GenerationStats], None] | None, cancel: threading.Event,
                       constraint: TokenConstraint | None) -> Iterator[str]:
        if self.parallel > 1:
            yield from self._batched_stream(ids, params, on_finish, cancel, constraint)
            return
        with self._lock:
            stats = GenerationStats(prompt_tokens=len(ids), finish_reason="error")
            try:  # on_finish hears of every call that started, whatever happens inside it
                if self._closed:
                    raise EngineClosedError(f"{self.source}: the engine was closed; load the model again")
                self._running = cancel
                generator = Generator(self.model, self.tokenizer, self.cache, cancel=cancel)
                try:
                    with torch_threads(self.threads):
                        yield from generator.stream(ids, params, constraint)
                finally:
                    self._running = None
                    stats = self.last_stats = generator.stats
            finally:
                if on_finish is not None:
                    on_finish(stats)


    def _batched_stream(self, ids: list[int], params: GenerationParams,
                        on_finish: Callable[[GenerationStats], None] | None, cancel: threading.Event,
                        constraint: TokenConstraint | None) -> Iterator[str]:
        with self._lock:  # only to start the worker once and to see close()
            if self._closed:
                raise EngineClosedError(f"{self.source}: the engine was closed; load the model again")
            if self._scheduler is None:
                from kilnlm.runtime.scheduler import BatchScheduler

                self._scheduler = BatchScheduler(self.model, self.tokenizer, parallel=self.parallel,
                                                 capacity=self.context_length, kv_options=self.kv_options)
            scheduler = self._scheduler

        def finished(stats: GenerationStats) -> None:
            self.last_stats = stats
            if on_finish is not None:
                on_finish(stats)

        yield from scheduler.stream(ids, params, cancel, finished, constraint)


def _plan(checkpoint, source: str, device: torch.device, dtype: torch.dtype, context_length: int | None,
          parallel: int, packed: bool, free_bytes: int | None, k_type: str | None, v_type: str | None):
    """Engine.plan for an opened checkpoint (Engine.load plans with the checkpoint it loads)."""
    from kilnlm.runtime.plan import checkpoint_weight_bytes, fit_context, make_plan

    config = checkpoint.config
    weights = checkpoint_weight_bytes(checkpoint, dtype, device if packed else None)
    if free_bytes is None and device.type == "cuda" and torch.cuda.is_available():
        free_bytes = torch.cuda.mem_get_info(device)[0]
    kv = {"k_type": k_type, "v_type": v_type}
    if context_length is None and free_bytes is not None:
        return fit_context(config, weights, device=device, dtype=dtype, free=free_bytes, parallel=parallel,
                           source=source, longest=config.max_position_embeddings, **kv)
    return make_plan(config, weights, device=device, dtype=dtype, context=_context_length(config, context_length),
                     parallel=parallel, free=free_bytes, **kv)


class LoadAbortedError(KilnError):
    """The caller's progress callback asked to stop loading."""


def _reporting(tensors, total: int, on_progress: Callable[[int, int], bool | None] | None, source: str):
    """The (name, tensor) stream, telling `on_progress` after each one; a False answer stops the load."""
    for done, item in enumerate(tensors, start=1):
        yield item
        if on_progress is not None and on_progress(done, total) is False:
            raise LoadAbortedError(f"{source}: loading stopped by the caller after {done} of {total} tensors")


def _generation_params(
    max_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | str = (),
    ignore_eos: bool = False,
) -> GenerationParams:
    sampling = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    return GenerationParams(max_new_tokens=max_tokens, stop=stops, sampling=sampling, ignore_eos=ignore_eos)


def _context_length(config: ModelConfig, requested: int | None) -> int:
    if requested is None:
        return min(config.max_position_embeddings, DEFAULT_CONTEXT)
    if requested <= 0:
        raise KilnError(f"context length must be positive, got {requested}")
    return requested


def _use_int8_linears(model: nn.Module, checkpoint) -> None:
    """Swap in Int8Linear for the layers an LLM.int8 file stores as int8 codes and fp16 outlier columns."""
    int8_weight = getattr(checkpoint, "int8_weight", None)
    if int8_weight is None:
        return
    weights = {name: w for name, _ in model.named_parameters() if (w := int8_weight(name)) is not None}
    if weights:
        from kilnlm.runtime.models.int8_linear import use_int8_linears

        use_int8_linears(model, weights)


def _device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KilnError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KilnError("device 'cuda' was asked for but this torch build sees no CUDA GPU; use --device cpu")
    return device


def _check_cpu_kernels() -> None:
    """Build the CPU kernels now (not at the first token) and say so when only the slow pure-torch path can run."""
    from kilnlm.kernels.cpu import kernel_status

    status = kernel_status()
    if not status.compiled:
        warnings.warn(f"packed weights run through the pure-torch path on the CPU, several times slower: {status.detail}",
                      RuntimeWarning, stacklevel=3)
