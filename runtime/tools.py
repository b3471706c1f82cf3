"""Tool calls: functions offered to the model through its chat template, and the calls read back from its answer.

A chat template shows `tools` (OpenAI-style function definitions) to the model in its own words, and the
model answers with calls in its family's format. The format is recognised from the template's text:

| format  | the model writes                                                  | families                        |
|---------|-------------------------------------------------------------------|---------------------------------|
| hermes  | <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>      | Qwen2/2.5/3, Hermes, Granite 4  |
| mistral | [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]              | Mistral / Mixtral v3+ templates |
| llama3  | {"name": ..., "parameters": {...}} (after <|python_tag|> or not) | Llama 3.1 / 3.2 / 3.3           |

Control tokens such as [TOOL_CALLS] and <|python_tag|> are dropped from decoded text, so the parsers accept
the answer with or without them. `tool_choice` "required" (or a named function) is enforced with a grammar
(runtime.grammar) that only allows calls of the offered functions with arguments valid under their JSON
schemas; "auto" lets the model choose and parses what it wrote.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from kilnlm.errors import KilnError
from kilnlm.runtime.grammar import Grammar, lark_json


class ToolError(KilnError):
    """Tools the model cannot be given (malformed definitions, or a chat template without tool support)."""


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the function's name and its arguments as JSON text (as OpenAI returns them)."""

    name: str
    arguments: str
    id: str

    def openai(self) -> dict:
        """The call as an OpenAI `tool_calls` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes its calls (see the module docstring)."""

    name: str
    opener: str  # text (or control token) that starts the calls; llama3 has none
    closer: str  # text that ends one call (hermes) or ""
    arguments_key: str  # "arguments", or llama3's "parameters"
    many: bool  # several calls in one JSON list (mistral) rather than one block per call

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The answer split into the content before its calls and the calls ([] and all the text when none)."""
        if self.name == "hermes":
            return _parse_hermes(text, self.arguments_key)
        start = text.find(self.opener) if self.opener else -1
        content, body = (text[:start], text[start + len(self.opener):]) if start >= 0 else ("", text)
        calls = _calls_from_json(body.strip(), self.arguments_key)
        return (content, calls) if calls else (text, [])

    def may_start_call(self, text: str) -> bool:
        """Whether an answer beginning with `text` may be calls (mistral, llama3: the call is the whole answer)."""
        stripped = text.lstrip()
        if self.opener and (self.opener.startswith(stripped) or stripped.startswith(self.opener)):
            return True
        return stripped[:1] in ("[", "{")  # the opener may be a control token that decoding drops

    def grammar(self, tools: list[dict], tokenizer, name: str | None = None, parallel: bool = True) -> Grammar:
        """A grammar allowing only calls of `tools` (of the function `name`, if given): one, or with `parallel`
        one or more (llama3's format has a single call)."""
        functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
        if not functions:
            raise ToolError(f"tool_choice names {name!r}, which is not among the tools")
        call = {"anyOf": [_call_schema(f, self.arguments_key) for f in functions]}
        opener = _lark_literal(self.opener, tokenizer) if self.opener else ""
        if self.many:
            body = lark_json({"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})})
            return Grammar.lark(f"start: {opener} {body}")
        block = f"{opener} {lark_json(call)} {_lark_literal(self.closer, tokenizer) if self.closer else ''}"
        more = ' ("\\n" block)*' if parallel and self.name != "llama3" else ""
        return Grammar.lark(f"start: block{more}\nblock: {block}")


_FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", many=False),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments", many=True),
    "llama3": ToolFormat("llama3", "", "", "parameters", many=False),
}


def tool_format(template: str | None) -> ToolFormat | None:
    """The call format a chat template's text asks of the model, or None when it shows no tools."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return _FORMATS["hermes"]
    if "[TOOL_CALLS]" in template:
        return _FORMATS["mistral"]
    if "<|python_tag|>" in template or '"parameters"' in template:
        return _FORMATS["llama3"]
    return None


def check_tools(tools: object) -> list[dict]:
    """OpenAI `tools`, checked: a list of {"type": "function", "function": {"name", "parameters"?, ...}}."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools must be a non-empty list")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        if not isinstance(function.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", function["name"]):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(function.get("parameters", {}), dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
    return tools


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: an assistant's call arguments as objects, not JSON text
    (templates write `arguments | tojson`; OpenAI clients send the text), as transformers and llama.cpp do."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list):
            message = {**message, "tool_calls": [_with_object_arguments(c) for c in calls]}
        out.append(message)
    return out


class ToolCallStream:
    """Splits a streamed answer into content to show now and calls to report at the end: hermes text streams up
    to a <tool_call>; a mistral or llama3 answer that opens with a call (or a JSON list or object) is held
    back whole, since those formats make the call the entire answer."""

    def __init__(self, form: ToolFormat):
        self.form = form
        self.text = ""
        self.shown = 0  # self.text[:shown] has been returned as content
        self.holding = False  # the rest may be calls: return nothing more until finish()

    def feed(self, piece: str) -> str:
        """Add generated text; return the content that can be shown now."""
        self.text += piece
        if self.holding:
            return ""
        if self.form.name == "hermes":
            end = self._before_opener()
        elif not self.text.strip():
            return ""  # undecided until the first visible character
        elif self.shown == 0 and self.form.may_start_call(self.text):
            self.holding = True
            return ""
        else:
            end = len(self.text)
        shown, self.shown = self.text[self.shown:end], max(end, self.shown)
        return shown

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content not shown yet, and the calls of the whole answer ([] if it made none)."""
        content, calls = self.form.parse(self.text)
        if not calls:
            content = self.text
        return content[self.shown:], calls

    def _before_opener(self) -> int:
        """Where the shown content must stop: at the opener, or before a tail that may begin it."""
        opener = self.form.opener.strip()
        start = self.text.find(opener, max(self.shown - len(opener), 0))
        if start >= 0:
            self.holding = True
            return start
        tail = max((k for k in range(len(opener), 0, -1) if self.text.endswith(opener[:k])), default=0)
        return len(self.text) - tail


def _parse_hermes(text: str, key: str) -> tuple[str, list[ToolCall]]:
    blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.DOTALL)
    calls = [call for block in blocks for call in _calls_from_json(block.strip(), key)]
    if not calls:
        return text, []
    return text[: text.find("<tool_call>")], calls


def _calls_from_json(body: str, key: str) -> list[ToolCall]:
    """Calls in `body`: one {"name", key} object or a list of them; [] when it is anything else."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        arguments = item.get(key, item.get("arguments", {}))
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(item["name"], text, f"call_{uuid.uuid4().hex[:24]}"))
    return calls


def _call_schema(function: dict, key: str) -> dict:
    """One call of `function` as a JSON schema. Its arguments take no keys beyond the declared ones unless the
    schema allows them explicitly (as OpenAI's strict mode and llama.cpp do): JSON Schema's open default lets a
    model invent arguments the function does not have."""
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if "additionalProperties" not in parameters and parameters.get("type", "object") == "object":
        parameters = {**parameters, "additionalProperties": False}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, key: parameters},
            "required": ["name", key], "additionalProperties": False}


def _lark_literal(text: str, tokenizer) -> str:
    """`text` in a Lark rule: a special token by id (its bytes are not text the grammar can spell), else a string."""
    token_id = tokenizer.token_to_id(text.strip())
    if token_id is not None and token_id in tokenizer.special_ids:
        before, after = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()):]  # e.g. a newline after it
        return " ".join(part for part in (before and json.dumps(before), f"<[{token_id}]>", after and json.dumps(after))
                        if part)
    return json.dumps(text)


def _with_object_arguments(call: object) -> object:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return call
        if isinstance(parsed, dict):
            return {**call, "function": {**call["function"], "arguments": parsed}}
    return call
