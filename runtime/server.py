"""`kiln serve`: an OpenAI-compatible HTTP server on loopback, built only on the Engine API.

Routes: POST /v1/chat/completions and /v1/completions (streaming as server-sent events, or one JSON body),
GET /v1/models, GET /health (public), GET /metrics (Prometheus text). Requests go to the engine: one at a time,
or with Engine.load(parallel=N) (`kiln serve --parallel N`) up to N decoded together in one batch over the
paged cache (runtime/scheduler.py). A client that disconnects from a stream cancels its generation at the next
decode step. `response_format` (json_object, json_schema) is enforced by constrained decoding
(runtime/grammar.py), and `tools` are shown through the chat template and parsed back (runtime/tools.py);
`tool_choice` "required" or a named function forces a call with a grammar.

Safety for a desktop sidecar: loopback by default, a non-loopback bind only with an API key (compared in
constant time), the Host header checked on loopback (DNS rebinding, as in ollama's CVE-2024-28224), CORS
only for an allow-list of origins, a body size limit, a queue cap (503 beyond it) and a cap on max_tokens.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kilnlm.errors import KilnError
from kilnlm.runtime.grammar import Grammar, GrammarError
from kilnlm.runtime.tools import ToolCallStream, ToolError, ToolFormat, check_tools, template_messages, tool_format

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


class ServerConfigError(KilnError):
    """Server settings that would expose the model unsafely or cannot work."""


@dataclass
class ServerSettings:
    """How the server listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_tokens_cap: int = 4096  # the most tokens one request may ask for
    queue_cap: int = 16  # requests waiting or running; more get 503
    max_body_bytes: int = 1 << 20
    model_name: str = "kilnlm"

    def check(self) -> None:
        """Refuse a non-loopback bind without an API key."""
        if not is_loopback(self.host) and not self.api_key:
            raise ServerConfigError(f"binding {self.host} exposes the model beyond this machine; set --api-key "
                                    "(or bind 127.0.0.1)")


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only."""
    if host.strip("[]") in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Metrics:
    """Counters for /metrics."""

    requests: int = 0
    rejected: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def text(self, cache_tokens: int) -> str:
        """Prometheus exposition text."""
        rows = [("kilnlm_requests_total", "counter", self.requests),
                ("kilnlm_requests_rejected_total", "counter", self.rejected),
                ("kilnlm_requests_cancelled_total", "counter", self.cancelled),
                ("kilnlm_prompt_tokens_total", "counter", self.prompt_tokens),
                ("kilnlm_generated_tokens_total", "counter", self.generated_tokens),
                ("kilnlm_queue_depth", "gauge", self.in_flight),
                ("kilnlm_cache_tokens", "gauge", cache_tokens)]
        return "".join(f"# TYPE {name} {kind}\n{name} {value}\n" for name, kind, value in rows)


class RequestError(Exception):
    """A request the server answers with an HTTP error and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def sampling_options(body: dict, cap: int) -> dict:
    """Engine options from an OpenAI request body (unknown fields are ignored, as OpenAI's server does)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or cap
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(400, "max_tokens must be a positive integer")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "stop must be a string or a list of strings")
    options = {"max_tokens": min(max_tokens, cap), "stop": stop,
               "temperature": float(body.get("temperature", 1.0)), "top_p": float(body.get("top_p", 1.0))}
    if body.get("seed") is not None:
        options["seed"] = int(body["seed"])
    if body.get("frequency_penalty") or body.get("presence_penalty"):
        raise RequestError(400, "frequency_penalty and presence_penalty are not supported; use repetition_penalty")
    if body.get("repetition_penalty") is not None:
        options["repetition_penalty"] = float(body["repetition_penalty"])
    return options


def response_grammar(body: dict) -> Grammar | None:
    """The grammar of OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", ...})."""
    form = body.get("response_format")
    if form is None:
        return None
    kind = form.get("type") if isinstance(form, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind == "json_schema":
        spec = form.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise RequestError(400, "response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        return Grammar.json_schema(spec["schema"])
    raise RequestError(400, "response_format type must be text, json_object or json_schema")


def chat_messages(messages: object) -> list[dict]:
    """OpenAI messages as the chat template takes them: text content parts joined, call arguments as objects."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            parts = message["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in parts):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported by this model")
            message = {**message, "content": "".join(p["text"] for p in parts)}
        out.append(message)
    return template_messages(out)


@dataclass
class ToolRequest:
    """The tools of a chat request: the functions shown to the model, how it writes calls, and the choice."""

    tools: list[dict]
    form: ToolFormat
    grammar: Grammar | None  # forces a call (tool_choice "required" or a named function)


def tool_request(body: dict, template: str | None, tokenizer) -> ToolRequest | None:
    """The request's `tools` and `tool_choice`, or None when the model is not to call any."""
    if not body.get("tools"):
        return None
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return None
    try:
        tools = check_tools(body["tools"])
    except ToolError as err:
        raise RequestError(400, str(err)) from None
    form = tool_format(template)
    if form is None:
        raise RequestError(400, "this model's chat template does not offer tools (or writes calls in a format kilnlm "
                                "does not read: hermes <tool_call>, mistral [TOOL_CALLS], llama3 JSON)")
    parallel = body.get("parallel_tool_calls", True) is not False
    if choice == "auto":
        return ToolRequest(tools, form, None)
    if choice == "required":
        return ToolRequest(tools, form, form.grammar(tools, tokenizer, parallel=parallel))
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise RequestError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                                '"function": {"name": ...}}')
    try:
        return ToolRequest(tools, form, form.grammar(tools, tokenizer, name=name, parallel=parallel))
    except ToolError as err:
        raise RequestError(400, str(err)) from None


class EngineSlot:
    """The engine a server answers with, or None while it is still loading (/health says 503 until then)."""

    def __init__(self, engine=None):
        self.engine = engine
        self.error: BaseException | None = None  # why loading failed, if it did


def create_app(engine, settings: ServerSettings):
    """The Starlette application serving `engine` (an Engine, or an EngineSlot filled once it has loaded)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    settings.check()
    metrics = Metrics()
    slot = engine if isinstance(engine, EngineSlot) else EngineSlot(engine)

    def loaded():
        if slot.engine is None:
            raise RequestError(503, "the model is still loading; retry when /health answers 200", "loading")
        return slot.engine

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > settings.max_body_bytes:
            raise RequestError(413, f"the body is larger than {settings.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise RequestError(413, f"the body is larger than {settings.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"the body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        return body

    def prompt_ids(engine, body: dict, chat: bool, tools: ToolRequest | None) -> list[int]:
        if chat:
            messages = chat_messages(body.get("messages"))
            try:
                ids = engine.chat_prompt_ids(messages, tools=tools.tools if tools else None)
            except KilnError as err:
                raise RequestError(400, str(err)) from None
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise RequestError(400, "prompt must be a string")
            ids = engine.tokenizer.encode(prompt)
        if len(ids) >= engine.context_length:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; the context holds {engine.context_length}",
                               "context_length_exceeded")
        return ids

    def admit() -> None:
        with metrics.lock:
            if metrics.in_flight >= settings.queue_cap:
                metrics.rejected += 1
                raise RequestError(503, f"{settings.queue_cap} requests are already queued; retry later",
                                   "server_busy")
            metrics.in_flight += 1
            metrics.requests += 1

    def leave(stats) -> None:
        with metrics.lock:
            metrics.in_flight -= 1
            metrics.prompt_tokens += stats.prompt_tokens
            metrics.generated_tokens += stats.generated_tokens
            metrics.cancelled += stats.finish_reason == "cancelled"

    async def completions(request: Request, chat: bool) -> Response:
        try:
            engine = loaded()
            body = await read_json(request)
            tools = tool_request(body, engine.chat_template.source, engine.tokenizer) if chat else None
            ids = prompt_ids(engine, body, chat, tools)
            options = sampling_options(body, settings.max_tokens_cap)
            grammar = tools.grammar if tools and tools.grammar else response_grammar(body)
            if grammar is not None:  # compiled now: a grammar that does not compile is the client's error, 400
                options["grammar"] = engine.constraint(grammar)
            admit()
        except RequestError as err:
            return error(err.status, err.message, err.kind)
        except GrammarError as err:
            return error(400, str(err))
        created, request_id = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        finished: list = []

        def on_finish(stats) -> None:  # in the worker thread, once per request, even if the client went away
            finished.append(stats)
            leave(stats)

        pieces = engine.astream(ids, on_finish=on_finish, **options)
        form = tools.form if tools else None
        if body.get("stream"):
            return StreamingResponse(_events(pieces, finished, chat, form, request_id, created, settings.model_name),
                                     media_type="text/event-stream")
        text = "".join([piece async for piece in pieces])
        return JSONResponse(_whole(text, finished[0], chat, form, request_id, created, settings.model_name))

    async def chat_completions(request: Request) -> Response:
        return await completions(request, chat=True)

    async def text_completions(request: Request) -> Response:
        return await completions(request, chat=False)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                                          "created": 0, "owned_by": "kilnlm"}]})

    async def health(request: Request) -> Response:
        if slot.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_route(request: Request) -> Response:
        return PlainTextResponse(metrics.text(slot.engine.cached_tokens() if slot.engine is not None else 0))

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", text_completions, methods=["POST"]),
              Route("/v1/models", models), Route("/health", health), Route("/metrics", metrics_route)]
    return Starlette(routes=routes, middleware=[Middleware(_Guard, settings=settings)])


class _Guard:
    """ASGI middleware: Host header check on loopback, API key, CORS allow-list (pure ASGI, so streams pass)."""

    def __init__(self, app, settings: ServerSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        cors = origin if origin in self.settings.allowed_origins else None
        problem = self._problem(scope, headers, origin)
        if problem is not None:
            return await _send_json(send, problem[0], {"error": {"message": problem[1], "type": "forbidden",
                                                                 "code": problem[0]}})
        if scope["method"] == "OPTIONS":  # a CORS preflight from an allowed origin
            return await _send_json(send, 204, None, cors)

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start" and cors:
                message = {**message, "headers": [*message.get("headers", []), *_cors_headers(cors)]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _problem(self, scope, headers: dict, origin: str | None) -> tuple[int, str] | None:
        s = self.settings
        if is_loopback(s.host) and _host_name(headers.get("host", "")) not in LOOPBACK_NAMES:
            return 403, f"Host {headers.get('host')!r} is not this machine (DNS rebinding protection)"
        if origin is not None and origin not in s.allowed_origins:
            return 403, f"origin {origin!r} is not allowed; start the server with --allow-origin {origin}"
        if s.api_key and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), s.api_key.encode()):
                return 401, "a valid API key is needed (Authorization: Bearer ...)"
        return None


def _host_name(header: str) -> str:
    """The host of a Host header without its port ("[::1]:8080" -> "[::1]", "localhost:8080" -> "localhost")."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin"),
            (b"access-control-allow-headers", b"authorization, content-type"),
            (b"access-control-allow-methods", b"GET, POST, OPTIONS")]


async def _send_json(send, status: int, body: dict | None, cors: str | None = None) -> None:
    payload = b"" if body is None else json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + _cors_headers(cors)
                if cors else headers})
    await send({"type": "http.response.body", "body": payload})


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


def _finish_reason(stats) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(stats.finish_reason, "stop")


def _whole(text: str, stats, chat: bool, form: ToolFormat | None, request_id: str, created: int,
           model: str) -> dict:
    if chat:
        content, calls = form.parse(text) if form else (text, [])
        message = {"role": "assistant", "content": content.strip() or None if calls else content}
        if calls:
            message["tool_calls"] = [call.openai() for call in calls]
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else _finish_reason(stats)}
    else:
        choice = {"index": 0, "text": text, "finish_reason": _finish_reason(stats), "logprobs": None}
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": _usage(stats)}


async def _events(pieces, finished: list, chat: bool, form: ToolFormat | None, request_id: str, created: int,
                  model: str):
    """Server-sent events of a streaming completion; a disconnect closes `pieces`, which cancels generation.
    With tools, text that may be a call is held back and the calls come as one `tool_calls` delta at the end."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(delta: dict | str, finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish} if chat else \
            {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({'id': request_id, 'object': kind, 'created': created, 'model': model, 'choices': [choice]})}\n\n".encode()

    calls_stream = ToolCallStream(form) if form else None
    try:
        if chat:
            yield event({"role": "assistant", "content": ""}, None)
        async for piece in pieces:
            if calls_stream:
                piece = calls_stream.feed(piece)
            if piece:
                yield event({"content": piece} if chat else piece, None)
        calls = []
        if calls_stream:
            rest, calls = calls_stream.finish()
            if rest.strip() if calls else rest:
                yield event({"content": rest}, None)
        if calls:
            yield event({"tool_calls": [{"index": i, **call.openai()} for i, call in enumerate(calls)]}, None)
        yield event({} if chat else "", "tool_calls" if calls else _finish_reason(finished[0]))
        yield b"data: [DONE]\n\n"
    finally:
        await pieces.aclose()  # a client that went away: cancel the generation (no-op when it finished)


def serve(load: Callable[[], object], settings: ServerSettings) -> None:
    """Listen at once, load the engine with `load()` in the background (/health answers 503 until it is ready),
    and serve until interrupted (uvicorn, one process, one event loop). A failed load stops the server and is
    raised here."""
    import uvicorn

    slot = EngineSlot()
    server = uvicorn.Server(uvicorn.Config(create_app(slot, settings), host=settings.host.strip("[]"),
                                           port=settings.port, log_level="warning"))

    def load_engine() -> None:
        try:
            slot.engine = load()
        except BaseException as err:  # handed to the caller once the server has stopped
            slot.error = err
            server.should_exit = True

    threading.Thread(target=load_engine, name="kilnlm-load", daemon=True).start()
    server.run()
    if slot.error is not None:
        raise slot.error
