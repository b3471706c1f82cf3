"""Chat templates: turn a list of messages into the prompt string a checkpoint was trained on.

A checkpoint's ``chat_template`` is rendered exactly as transformers' ``apply_chat_template(tokenize=False)``
renders it: the same sandboxed Jinja environment, the same helpers, the same variables.

Checkpoints without a template (base models) get the fallback format instead, one line per message and no
special tokens::

    system: You are terse.
    user: Hi!
    assistant:

that is ``f"{role}: {content}\\n"`` for each message (``None`` content renders as an empty string), then
``"assistant:"`` when a generation prompt is asked for. Extra template variables are ignored by the fallback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kilnlm.errors import ChatTemplateError

# Older message formats name a message's reasoning differently; templates read "reasoning_content" (most) or
# "thinking" (gpt-oss), so transformers fills both from whichever is present. The first found wins.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplate:
    """Renders a conversation with a checkpoint's Jinja chat template, exactly as transformers' apply_chat_template does."""

    def __init__(self, source: str | None, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = None if source is None else _compile(source)

    @property
    def is_fallback(self) -> bool:
        """True when the checkpoint has no chat template and the plain fallback format is used."""
        return self._template is None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render messages (plus template variables such as tools, documents or date_string) to a prompt string."""
        _check_messages(messages)
        if self._template is None:
            return _render_fallback(messages, add_generation_prompt)
        # Like transformers, a special token that is not set is left undefined rather than passed as None
        # (which would render as the text "None"), and caller variables override the special tokens.
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        variables = {"tools": None, "documents": None, **_drop_none(special), **extra}
        try:
            return self._template.render(
                messages=[_template_message(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **_plain_data(variables),
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # the template is foreign code: any failure in it is a template error
            raise ChatTemplateError(f"the checkpoint's chat_template failed to render: {exc}") from exc


def _check_messages(messages: Any) -> None:
    """Raise ChatTemplateError unless messages is a non-empty list of {role: str, content: str | None} dicts."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"message {i} is a {type(message).__name__}, not a dict")
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"message {i} needs a str 'role'")
        if "content" not in message or not isinstance(message["content"], (str, type(None))):
            raise ChatTemplateError(f"message {i} needs a 'content' that is a str (or None for tool calls)")


def _render_fallback(messages: list[dict], add_generation_prompt: bool) -> str:
    """Render the documented plain format used when a checkpoint has no chat template."""
    lines = "".join(f"{m['role']}: {m['content'] or ''}\n" for m in messages)
    return lines + ("assistant:" if add_generation_prompt else "")


def _template_message(message: dict) -> dict:
    """Copy a message the way transformers hands it to the template: None keys dropped, reasoning aliased."""
    # Many templates handle a missing key but render a None one as the text "None" (OpenAI-style content=None).
    message = _plain_data(_drop_none(message))
    reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _drop_none(mapping: Mapping) -> dict:
    """Return a copy of mapping without the keys whose value is None."""
    return {key: value for key, value in mapping.items() if value is not None}


def _plain_data(value: Any) -> Any:
    """Rebuild value from plain JSON-like types, replacing anything else with an inert "<TypeName>" string."""
    # Rich objects (tensors, images, str subclasses) carry methods the sandbox does not know to be dangerous,
    # so the template only ever sees builtin scalars, dicts, lists and tuples.
    if value is None or type(value) in (str, int, float, bool):
        return value
    # The base type's own conversion, since a subclass (a str enum, say) may override __str__.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(key): _plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_data(item) for item in value)
    return f"<{type(value).__name__}>"


def _compile(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment transformers uses, or raise ChatTemplateError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the checkpoint's chat_template is not valid Jinja (line {exc.lineno}): {exc}") from exc


def _raise_exception(message: str) -> None:
    """Template helper: stop rendering with the template's own error message."""
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """Template filter: JSON without jinja's HTML escaping, and non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    """Template helper: the local time formatted with strftime (templates use it for today's date)."""
    return datetime.now().strftime(format)


class _TemplateDict:
    """The template's `dict` global: builds dicts without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        """Same as dict.fromkeys."""
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """The template's `namespace` global, refusing underscore names that could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 - jinja's signature, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: Any) -> None:
    """Refuse underscore-prefixed namespace attributes."""
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates may not set namespace attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """The `{% generation %}...{% endgeneration %}` tag (marks assistant text for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        """Parse the block into a call that just renders its body."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()
