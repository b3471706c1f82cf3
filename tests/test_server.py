"""`kiln serve` on a loopback port with the demo model, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest

from kilnlm import Engine
from kilnlm.runtime.engine import demo_model_path

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from kilnlm.runtime.server import ServerConfigError, ServerSettings, create_app  # noqa: E402

API_KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serving(engine, settings: ServerSettings):
    """The app of `engine` (an Engine or an EngineSlot) served on its loopback port until the block ends."""
    instance = uvicorn.Server(uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=settings.port,
                                             log_level="error"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(400):
        if instance.started:
            break
        time.sleep(0.05)
    try:
        yield
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    engine = Engine.load(demo_model_path(), progress=False, context_length=256)
    settings = ServerSettings(port=_free_port(), api_key=API_KEY, allowed_origins=("http://localhost:3000",),
                              max_tokens_cap=64, queue_cap=4, max_body_bytes=20_000, model_name="demo")
    with _serving(engine, settings):
        yield engine, settings
    engine.close()


def _client(settings) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key=API_KEY, max_retries=0)


def _raw(settings, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", settings.port, timeout=60)
    connection.request(method, path, body=body, headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})})
    response = connection.getresponse()
    return response.status, response.read(), dict(response.getheaders())


MESSAGES = [{"role": "user", "content": "Speak, ROMEO."}]


def test_chat_plain_and_streaming_agree_and_match_the_engine(server):
    engine, settings = server
    client = _client(settings)
    plain = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=24, temperature=0)
    chunks = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=24, temperature=0,
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert plain.choices[0].message.content == streamed
    assert plain.choices[0].finish_reason in ("length", "stop")
    assert plain.usage.completion_tokens <= 24 and plain.usage.prompt_tokens > 0
    assert engine.chat(MESSAGES, max_tokens=24, temperature=0) == streamed


def test_seeded_sampling_is_repeatable_and_stop_strings_hold(server):
    _, settings = server
    client = _client(settings)
    first = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=30, temperature=0.9, seed=7)
    second = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=30, temperature=0.9, seed=7)
    assert first.choices[0].text == second.choices[0].text
    text = first.choices[0].text
    if len(text) > 6:  # stop at a string the unstopped text contains: the answer ends before it
        stop = text[3:6]
        cut = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=30, temperature=0.9, seed=7,
                                        stop=[stop], stream=True)
        assert "".join(c.choices[0].text for c in cut) == text[: text.index(stop)]


def test_errors_are_openai_shaped(server):
    _, settings = server
    client = _client(settings)
    with pytest.raises(openai.BadRequestError, match="context holds 256"):
        client.completions.create(model="demo", prompt="word " * 400, max_tokens=4)
    status, body, _ = _raw(settings, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, _, _ = _raw(settings, "POST", "/v1/chat/completions", b"x" * 30_000)
    assert status == 413
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key="wrong", max_retries=0) \
            .models.list()


def test_health_is_public_and_host_origin_and_metrics_checks(server):
    _, settings = server
    connection = http.client.HTTPConnection("127.0.0.1", settings.port, timeout=30)
    connection.request("GET", "/health")
    assert connection.getresponse().status == 200  # no API key needed
    status, body, _ = _raw(settings, "GET", "/v1/models", headers={"Host": "evil.example:8080"})
    assert status == 403 and b"DNS rebinding" in body
    status, _, headers = _raw(settings, "GET", "/v1/models", headers={"Origin": "http://localhost:3000"})
    assert status == 200 and headers.get("access-control-allow-origin") == "http://localhost:3000"
    status, _, _ = _raw(settings, "GET", "/v1/models", headers={"Origin": "https://elsewhere.example"})
    assert status == 403
    status, body, _ = _raw(settings, "GET", "/metrics")
    assert status == 200 and b"kilnlm_requests_total" in body and b"kilnlm_queue_depth 0" in body


def test_a_client_that_disconnects_cancels_its_generation(server):
    engine, settings = server
    connection = http.client.HTTPConnection("127.0.0.1", settings.port, timeout=60)
    body = json.dumps({"model": "demo", "prompt": "ROMEO:", "max_tokens": 64, "stream": True, "temperature": 0,
                       "ignore_eos": True}).encode()
    connection.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {API_KEY}",
                                                                      "Content-Type": "application/json"})
    response = connection.getresponse()
    response.read1(200)  # the first events arrive ...
    response.close()  # ... and the client goes away (the response holds the socket open)
    connection.close()
    for _ in range(100):
        status, metrics, _ = _raw(settings, "GET", "/metrics")
        if b"kilnlm_queue_depth 0" in metrics:
            break
        time.sleep(0.1)
    assert b"kilnlm_queue_depth 0" in metrics
    assert b"kilnlm_requests_cancelled_total 1" in metrics  # stopped early, not run to max_tokens


def test_non_loopback_bind_needs_an_api_key():
    with pytest.raises(ServerConfigError, match="api-key"):
        ServerSettings(host="0.0.0.0").check()
    ServerSettings(host="0.0.0.0", api_key="k").check()
    ServerSettings(host="::1").check()


def test_serve_benchmark_quick_runs_and_counts_cancellations():
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve.py"), "--quick", "--cancel", "0.5",
                             "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["generated_tokens"] > 0 and 0 < report["cancelled"] < report["requests"]
    assert report["ttft_p50_s"] > 0 and report["rss_end_mib"] > 0


def test_parallel_server_streams_several_requests_at_once():
    engine = Engine.load(demo_model_path(), progress=False, context_length=256, parallel=3)
    settings = ServerSettings(port=_free_port(), max_tokens_cap=32, queue_cap=8, model_name="demo")
    with _serving(engine, settings):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key="unused", max_retries=0)
        prompts = ["ROMEO:", "JULIET:", "KING HENRY:"]
        texts, first_token_at, finished_at = {}, {}, {}

        def run(prompt: str) -> None:
            pieces = []
            for chunk in client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0,
                                                   stream=True):
                if chunk.choices[0].text:
                    first_token_at.setdefault(prompt, time.perf_counter())
                pieces.append(chunk.choices[0].text)
            finished_at[prompt] = time.perf_counter()
            texts[prompt] = "".join(pieces)

        threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        alone = Engine.load(demo_model_path(), progress=False, context_length=256)
        assert texts == {p: alone.generate(p, max_tokens=24, temperature=0) for p in prompts}
        # The three streams ran at once: every one had its first token before any of them finished.
        assert max(first_token_at.values()) < min(finished_at.values())
    engine.close()


# --------------------------------------------------------------------------------------------- structured output

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0}}}


def test_response_format_json_schema_and_json_object(server):
    _, settings = server
    client = _client(settings)
    form = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    answer = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=60, temperature=1.0,
                                            seed=3, response_format=form)
    person = json.loads(answer.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and len(person["name"]) <= 12
    assert answer.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=60, temperature=1.0,
                                            seed=3, response_format=form, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
    anything = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=60, temperature=1.0, seed=1,
                                         extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(anything.choices[0].text), dict)


def test_bad_response_formats_and_unsupported_tools_are_400(server):
    _, settings = server
    client = _client(settings)
    for form in ({"type": "xml"}, {"type": "json_schema"},
                 {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string", "pattern": "[a-"}}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4, response_format=form)
    tool = {"type": "function", "function": {"name": "noop"}}
    with pytest.raises(openai.BadRequestError, match="does not offer tools"):  # the demo model has no template
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4, tools=[tool])
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(model="demo", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    parts = client.chat.completions.create(model="demo", max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Speak, "}, {"type": "text", "text": "ROMEO."}]}])
    assert parts.choices[0].message.content == client.chat.completions.create(
        model="demo", max_tokens=8, temperature=0, messages=MESSAGES).choices[0].message.content


@pytest.fixture(scope="module")
def tool_server():
    from test_tools import HERMES_TEMPLATE

    from kilnlm.runtime.chat import ChatTemplate

    engine = Engine.load(demo_model_path(), progress=False, context_length=512)
    engine.chat_template = ChatTemplate(HERMES_TEMPLATE, eos_token="</s>")
    settings = ServerSettings(port=_free_port(), max_tokens_cap=100, model_name="demo")
    with _serving(engine, settings):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key="unused", max_retries=0)
    engine.close()


def test_tool_choice_required_and_named_return_tool_calls(tool_server):
    from test_tools import NOOP, WEATHER

    client = tool_server
    question = [{"role": "user", "content": "What is the weather in Verona for three days?"}]
    answer = client.chat.completions.create(model="demo", messages=question, tools=[WEATHER, NOOP], temperature=1.0,
                                            seed=2, tool_choice="required", parallel_tool_calls=False)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name in ("get_weather", "noop") and call.id.startswith("call_")
    json.loads(call.function.arguments)
    named = client.chat.completions.create(
        model="demo", messages=question, tools=[WEATHER, NOOP], temperature=1.0, seed=4, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    deltas = [c.choices[0] for c in named]
    streamed = [t for d in deltas for t in (d.delta.tool_calls or [])]
    assert [t.function.name for t in streamed] == ["get_weather"] and deltas[-1].finish_reason == "tool_calls"
    arguments = json.loads(streamed[0].function.arguments)
    assert set(arguments) == {"city", "days"}
    # The client runs the tool and sends the result back: the template renders the call and the result.
    follow_up = [*question, {"role": "assistant", "content": None, "tool_calls": [
        {"id": streamed[0].id, "type": "function",
         "function": {"name": "get_weather", "arguments": streamed[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": streamed[0].id, "content": '{"forecast": "rain"}'}]
    final = client.chat.completions.create(model="demo", messages=follow_up, tools=[WEATHER], max_tokens=8,
                                           temperature=0, tool_choice="none")
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model="demo", messages=question, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_health_is_503_while_loading_then_200():
    from kilnlm.runtime.server import EngineSlot

    slot = EngineSlot()
    settings = ServerSettings(port=_free_port(), model_name="demo")
    with _serving(slot, settings):
        status, body, _ = _raw(settings, "GET", "/health")
        assert status == 503 and json.loads(body)["status"] == "loading"
        status, body, _ = _raw(settings, "POST", "/v1/completions", json.dumps({"prompt": "x"}).encode())
        assert status == 503 and b"still loading" in body
        slot.engine = Engine.load(demo_model_path(), progress=False, context_length=64)
        assert _raw(settings, "GET", "/health")[0] == 200
        status, body, _ = _raw(settings, "POST", "/v1/completions",
                               json.dumps({"prompt": "ROMEO:", "max_tokens": 3}).encode())
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] <= 3


def test_kiln_serve_reports_a_model_that_fails_to_load(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "kilnlm.cli", "serve", str(tmp_path / "missing-model"), "--port",
                             str(_free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "missing-model" in result.stderr
