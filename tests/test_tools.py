"""Tool calls (runtime/tools.py): format detection from chat templates, parsing each family's calls, the
streaming split, and calls forced by a grammar on the demo model."""

from __future__ import annotations

import json

import pytest

from kilnlm import Engine
from kilnlm.runtime.chat import ChatTemplate
from kilnlm.runtime.engine import demo_model_path
from kilnlm.runtime.tools import ToolCallStream, ToolError, check_tools, template_messages, tool_format

# A Qwen2.5-style template (hermes calls), kept small: tools in the system turn, calls and results rendered back.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Answer a call as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

MISTRAL_SNIPPET = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"
LLAMA3_SNIPPET = ('{%- if tools %}Respond in the format {"name": function name, "parameters": dictionary of '
                  'argument name and its value}.{% endif %}<|python_tag|>')

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city for some days",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"]}}}
NOOP = {"type": "function", "function": {"name": "noop"}}


def test_formats_are_recognised_from_the_template() -> None:
    assert tool_format(HERMES_TEMPLATE).name == "hermes"
    assert tool_format(MISTRAL_SNIPPET).name == "mistral"
    assert tool_format(LLAMA3_SNIPPET).name == "llama3"
    assert tool_format(None) is None
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None


@pytest.mark.parametrize("name, answer", [
    ("hermes", ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
                '</tool_call>\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>')),
    ("mistral", ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
                 '{"name": "noop", "arguments": {}}]')),
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, {"name": "noop"}]'),
])
def test_calls_are_parsed_and_streamed_apart_from_content(name: str, answer: str) -> None:
    form = tool_format({"hermes": HERMES_TEMPLATE, "mistral": MISTRAL_SNIPPET}[name])
    content, calls = form.parse(answer)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "days": 2}),
                                                                  ("noop", {})]
    assert content.strip() == ("Let me look." if name == "hermes" else "")
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    stream = ToolCallStream(form)
    shown = "".join(stream.feed(answer[i:i + 3]) for i in range(0, len(answer), 3))
    rest, streamed_calls = stream.finish()
    assert (shown + rest).strip() == content.strip()
    assert [c.name for c in streamed_calls] == ["get_weather", "noop"]


def test_llama3_calls_and_plain_answers() -> None:
    form = tool_format(LLAMA3_SNIPPET)
    content, calls = form.parse('{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}')
    assert content == "" and calls[0].name == "get_weather" and json.loads(calls[0].arguments)["city"] == "Oslo"
    assert form.parse("It is sunny {or so}.") == ("It is sunny {or so}.", [])
    stream = ToolCallStream(form)
    text = "Plain words, no call."
    assert "".join(stream.feed(c) for c in text) + stream.finish()[0] == text


def test_tool_definitions_are_checked_and_arguments_become_objects_for_templates() -> None:
    assert check_tools([WEATHER]) == [WEATHER]
    for bad in ([], [{"type": "function"}], [{"type": "function", "function": {"name": "bad name"}}],
                [{"type": "function", "function": {"name": "f", "parameters": "x"}}]):
        with pytest.raises(ToolError):
            check_tools(bad)
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}]
    rendered = ChatTemplate(HERMES_TEMPLATE).render(template_messages(messages), add_generation_prompt=False)
    assert '"arguments": {"city": "Rome"}' in rendered  # an object, not a JSON string inside JSON


@pytest.fixture(scope="module")
def engine():
    with Engine.load(demo_model_path(), progress=False, context_length=512) as loaded:
        loaded.chat_template = ChatTemplate(HERMES_TEMPLATE, eos_token="</s>")
        yield loaded


@pytest.mark.parametrize("seed", range(3))
def test_a_forced_call_names_an_offered_function_with_valid_arguments(engine, seed: int) -> None:
    form = tool_format(engine.chat_template.source)
    tools = [WEATHER, NOOP]
    messages = [{"role": "user", "content": "What is the weather in Verona?"}]
    prompt = engine.chat_prompt_ids(messages, tools=tools)
    assert "get_weather" in engine.tokenizer.decode(prompt)  # the template showed the tools
    text = engine.chat(messages, tools=tools, grammar=form.grammar(tools, engine.tokenizer, parallel=False),
                       temperature=1.0, seed=seed, max_tokens=100)
    assert engine.last_stats.finish_reason == "stop"
    content, calls = form.parse(text)
    assert content == "" and len(calls) == 1
    arguments = json.loads(calls[0].arguments)
    if calls[0].name == "get_weather":
        assert set(arguments) == {"city", "days"} and 1 <= arguments["days"] <= 7 and len(arguments["city"]) <= 12
    else:
        assert calls[0].name == "noop" and arguments == {}  # undeclared arguments are refused


def test_a_named_tool_choice_calls_that_function(engine) -> None:
    form = tool_format(engine.chat_template.source)
    grammar = form.grammar([WEATHER, NOOP], engine.tokenizer, name="get_weather", parallel=False)
    text = engine.chat([{"role": "user", "content": "Weather?"}], tools=[WEATHER, NOOP], grammar=grammar,
                       temperature=1.0, seed=5, max_tokens=100)
    assert [c.name for c in form.parse(text)[1]] == ["get_weather"]
    with pytest.raises(ToolError, match="not among the tools"):
        form.grammar([WEATHER], engine.tokenizer, name="missing")


def test_a_control_token_opener_is_required_by_id() -> None:
    """Mistral's [TOOL_CALLS] is a control token: its bytes are no text a grammar can spell, so the forced call
    starts with that token itself, then the JSON list."""
    import torch

    from kilnlm.runtime.grammar import GrammarVocabulary
    from kilnlm.runtime.tokenizer import AddedToken, Tokenizer

    demo = Tokenizer.from_hf_folder(demo_model_path())
    tokenizer = Tokenizer.from_sentencepiece_proto(demo.model_file, bos_id=1, eos_ids=[2],
                                                   added_tokens=[AddedToken(2048, "[TOOL_CALLS]", special=True)])
    form = tool_format(MISTRAL_SNIPPET)
    constraint = GrammarVocabulary(tokenizer).constraint(form.grammar([NOOP], tokenizer, parallel=False))
    first = constraint.mask(torch.zeros(tokenizer.vocab_size))
    assert torch.nonzero(~torch.isinf(first)).flatten().tolist() == [2048]
    constraint.advance(2048)
    for token in tokenizer.encode_continuation('[{"name": "noop", "arguments": {}}]'):
        assert not torch.isinf(constraint.mask(torch.zeros(tokenizer.vocab_size))[token])
        constraint.advance(token)
    assert constraint.finished
