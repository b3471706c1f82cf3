"""ChatTemplate: parity with transformers' apply_chat_template, errors, sandboxing and the fallback format."""

from datetime import datetime

import jinja2

import pytest

from kilnlm.errors import ChatTemplateError
from kilnlm.runtime.chat import ChatTemplate

# Templates in the style of well-known checkpoints' tokenizer_config.json "chat_template" fields.
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# ChatML with a default system prompt and tool calling; multi-line, so it relies on trim_blocks/lstrip_blocks.
QWEN2_INSTRUCT = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL_INSTRUCT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Exercises the rest of the environment: namespace, loop controls, {% generation %}, dict(), tojson kwargs,
# indented block tags (lstrip_blocks), None values, default tools/documents and reasoning-field aliases.
FEATURES = """\
{%- set ns = namespace(users=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {%- if message.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
    {%- if message.role == 'assistant' %}
        {%- generation %}[A]{{ message.content }}{% endgeneration %}
    {%- else %}
        [{{ message.role }}]{{ message.content }}
    {%- endif %}
    {%- if ns.users >= 3 %}{% break %}{% endif %}
{%- endfor %}
{% for message in messages %}
    {% if message.reasoning_content is defined %}
    <think>{{ message.reasoning_content }}|{{ message.thinking }}</think>
    {% endif %}
{% endfor %}
{{ dict(users=ns.users, last=messages[-1].role) | tojson(indent=2, sort_keys=True) }}
tools={{ tools is none }} documents={{ documents is none }}
{% if documents %}{{ documents | tojson }}{% endif %}
{% if date_string is defined %}Today: {{ date_string }}{% endif %}
{% if add_generation_prompt %}[A]{% endif %}
"""

SYSTEM_USER = [
    {"role": "system", "content": "You are a terse assistant. Réponds en français."},
    {"role": "user", "content": "  Hello there!  "},
]
USER_ONLY = [{"role": "user", "content": "What is 2+2?"}]
MULTI_TURN = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke about 🐍."},
]
ENDS_WITH_ASSISTANT = MULTI_TURN + [{"role": "assistant", "content": "Why did the python cross the road?"}]
SYSTEM_MULTI_TURN = [SYSTEM_USER[0]] + ENDS_WITH_ASSISTANT
MANY_USERS = [{"role": "user", "content": f"u{i}"} for i in range(5)]
TOOL_CALLS = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": '{"temp_c": 21}'},
]
REASONING = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning": "Two plus two is four."},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6", "thinking": "Three plus three.", "reasoning_content": None},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo actuelle",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

PARITY_CASES = [
    # (template, messages, add_generation_prompt, extra template variables)
    (LLAMA3_INSTRUCT, SYSTEM_USER, True, {}),
    (LLAMA3_INSTRUCT, MULTI_TURN, True, {}),
    (LLAMA3_INSTRUCT, ENDS_WITH_ASSISTANT, False, {}),
    (QWEN2_INSTRUCT, USER_ONLY, True, {}),
    (QWEN2_INSTRUCT, SYSTEM_USER, True, {}),
    (QWEN2_INSTRUCT, SYSTEM_MULTI_TURN, False, {}),
    (QWEN2_INSTRUCT, TOOL_CALLS, True, {"tools": TOOLS}),
    (MISTRAL_INSTRUCT, USER_ONLY, True, {}),
    (MISTRAL_INSTRUCT, MULTI_TURN, True, {}),
    (MISTRAL_INSTRUCT, ENDS_WITH_ASSISTANT, False, {}),
    (LLAMA2_CHAT, SYSTEM_USER, True, {}),
    (LLAMA2_CHAT, SYSTEM_MULTI_TURN, False, {}),
    (LLAMA2_CHAT, MULTI_TURN, True, {}),
    (FEATURES, SYSTEM_MULTI_TURN, True, {"date_string": "26 Jul 2024"}),
    (FEATURES, MANY_USERS, False, {"documents": [{"title": "Doc", "text": "naïve"}]}),
    (FEATURES, TOOL_CALLS, True, {}),
    (FEATURES, REASONING, False, {}),
]


def _hf_render(source: str, messages: list[dict], add_generation_prompt: bool, special_tokens: bool = True,
               **extra) -> str:
    """Render with transformers' own apply_chat_template on a tiny offline tokenizer."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    tokens = {"bos_token": "<s>", "eos_token": "</s>"} if special_tokens else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, chat_template=source, **tokens)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )


@pytest.mark.parametrize("source,messages,add_generation_prompt,extra", PARITY_CASES)
def test_matches_transformers(source, messages, add_generation_prompt, extra):
    expected = _hf_render(source, messages, add_generation_prompt, **extra)
    ours = ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(
        messages, add_generation_prompt=add_generation_prompt, **extra
    )
    assert ours == expected


def test_unset_special_tokens_match_transformers():
    # A tokenizer without bos/eos leaves them undefined (printing ""), not the text "None".
    expected = _hf_render(MISTRAL_INSTRUCT, USER_ONLY, True, special_tokens=False)
    assert ChatTemplate(MISTRAL_INSTRUCT).render(USER_ONLY) == expected == "[INST] What is 2+2? [/INST]"


def test_unset_special_tokens_fail_like_transformers():
    # Concatenating an undefined token fails in transformers too; ours must fail as a ChatTemplateError.
    with pytest.raises(jinja2.UndefinedError):
        _hf_render(LLAMA3_INSTRUCT, USER_ONLY, True, special_tokens=False)
    with pytest.raises(ChatTemplateError, match="bos_token"):
        ChatTemplate(LLAMA3_INSTRUCT).render(USER_ONLY)


def test_known_rendering_of_qwen_default_system_prompt():
    # Pins a hand-written expectation, so a transformers regression cannot hide behind parity.
    expected = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ChatTemplate(QWEN2_INSTRUCT).render(USER_ONLY) == expected


def test_tojson_keeps_non_ascii_and_none_content_is_dropped():
    out = ChatTemplate(QWEN2_INSTRUCT).render(TOOL_CALLS, tools=TOOLS)
    assert '"description": "Météo actuelle"' in out
    assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in out
    assert "None" not in out


def test_extra_variables_override_special_tokens():
    template = ChatTemplate("{{ bos_token }}|{{ eos_token }}", bos_token="<s>", eos_token="</s>")
    assert template.render(USER_ONLY, bos_token="<B>") == "<B>|</s>"


def test_strftime_now_gives_the_current_date():
    out = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}").render(USER_ONLY)
    assert out == datetime.now().strftime("%Y-%m-%d")


def test_generation_prompt_flag_reaches_the_template():
    template = ChatTemplate(LLAMA3_INSTRUCT, bos_token="<s>")
    with_prompt = template.render(USER_ONLY)
    without = template.render(USER_ONLY, add_generation_prompt=False)
    assert with_prompt == without + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_raise_exception_becomes_chat_template_error_with_its_message():
    template = ChatTemplate(MISTRAL_INSTRUCT, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles are supported!"):
        template.render([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


def test_syntax_error_raises_at_construction():
    with pytest.raises(ChatTemplateError, match=r"chat_template.*line 1.*endfor"):
        ChatTemplate("{% for m in messages %}{{ m.content }}")


@pytest.mark.parametrize(
    "source", ["{{ 1 / 0 }}", "{{ messages[7].content }}", "{{ messages[0].content.x.y }}", "{{ range(10 ** 9) | list }}"]
)
def test_render_failures_become_chat_template_error(source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render(USER_ONLY)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__ }}",
        "{{ raise_exception.__globals__['os'] }}",
        "{% set x = [] %}{{ x.append(1) }}",  # the sandbox is immutable too
        "{% set ns = namespace(__class__=1) %}",
        "{% set ns = namespace() %}{% set ns._private = 1 %}",
    ],
)
def test_sandbox_blocks_escapes(source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render(USER_ONLY)


@pytest.mark.parametrize("source", ["{{ ''.__class__ }}", "{{ messages|attr('__class__') }}", "{{ cycler.__init__ }}"])
def test_sandbox_does_not_leak_internals(source):
    # Jinja renders a refused attribute as an empty undefined, as transformers' environment does.
    assert ChatTemplate(source).render(USER_ONLY) == ""


def test_rich_objects_reach_the_template_as_placeholders():
    class Secret:
        def delete_everything(self):
            raise AssertionError("the template reached a method of a caller object")

    calls_method = ChatTemplate("{{ thing.delete_everything() }}")
    with pytest.raises(ChatTemplateError):
        calls_method.render(USER_ONLY, thing=Secret())
    assert ChatTemplate("{{ thing }}").render(USER_ONLY, thing=Secret()) == "<Secret>"


@pytest.mark.parametrize(
    "messages,where",
    [
        ([], "non-empty"),
        ({"role": "user", "content": "x"}, "list"),
        ([{"role": "user", "content": "x"}, "hello"], "message 1"),
        ([{"content": "x"}], "message 0.*role"),
        ([{"role": 3, "content": "x"}], "message 0.*role"),
        ([{"role": "user", "content": "x"}, {"role": "user"}], "message 1.*content"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}, {"role": "user", "content": 5}],
         "message 2.*content"),
    ],
)
@pytest.mark.parametrize("source", [LLAMA3_INSTRUCT, None])
def test_bad_messages_are_rejected(source, messages, where):
    with pytest.raises(ChatTemplateError, match=where):
        ChatTemplate(source).render(messages)


def test_fallback_format():
    template = ChatTemplate(None)
    assert template.is_fallback
    assert not ChatTemplate(LLAMA3_INSTRUCT).is_fallback
    assert template.render(SYSTEM_USER + [{"role": "assistant", "content": None}]) == (
        "system: You are a terse assistant. Réponds en français.\n"
        "user:   Hello there!  \n"
        "assistant: \n"
        "assistant:"
    )
    assert template.render(USER_ONLY, add_generation_prompt=False) == "user: What is 2+2?\n"


def test_render_does_not_modify_the_callers_messages():
    messages = [dict(m) for m in TOOL_CALLS]
    ChatTemplate(QWEN2_INSTRUCT).render(messages, tools=TOOLS)
    assert messages == TOOL_CALLS and messages[1]["content"] is None
