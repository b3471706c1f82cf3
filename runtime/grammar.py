"""Constrained decoding: a grammar decides which tokens may come next, so the answer always parses.

The grammar engine is llguidance (the one behind llama.cpp's LLGUIDANCE build and vLLM's `guidance` backend),
chosen over xgrammar because
- it is one small abi3 wheel with no dependencies (xgrammar pulls in transformers, triton and pydantic, and
  pins torch versions), so it can be a plain dependency of the runtime, embedded apps included;
- it reads any vocabulary given as the bytes of each token, so SentencePiece, tokenizer.json and GGUF
  vocabularies all work the same way (xgrammar wants a transformers tokenizer or its own vocab metadata);
- it speaks JSON Schema, Lark, regular expressions and (converted) llama.cpp GBNF grammars, and computes the
  mask for a step lazily from the parser state (no per-grammar precompilation pass to wait for).

Per step: `mask(logits)` sets every token the grammar forbids to -inf before sampling, `advance(token)`
feeds the chosen token. A grammar that is complete and allows nothing more makes `finished` true, and the
generation ends with finish reason "stop". The end-of-sequence token is allowed exactly when the grammar
accepts what has been generated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import gbnf_to_lark
import torch

from kilnlm.errors import KilnError

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
# JSON laid out as OpenAI's answers are ({"a": 1, "b": [2, 3]}), with no free whitespace: with it allowed, small
# models fill their token budget with newlines. A schema's own "x-guidance" options override this.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(KilnError):
    """A grammar that does not compile, or a generation the grammar cannot continue."""


@dataclass(frozen=True)
class Grammar:
    """What the answer must match, as llguidance grammar text; build one with the class methods."""

    spec: str  # llguidance's grammar (a JSON document naming a Lark grammar, a JSON schema or a regex)
    kind: str  # what it was made from, for error messages: "json schema", "lark", "regex", "gbnf"

    @classmethod
    def json_schema(cls, schema: dict | str) -> Grammar:
        """A JSON value valid under `schema` (a dict or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise GrammarError(f"the JSON schema is not valid JSON ({err})") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_LAYOUT), "json schema")

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A Lark grammar (llguidance's dialect: `start` rule, %json {...} for embedded schemas)."""
        return cls(llguidance.LLMatcher.grammar_from_lark(text), "lark")

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Text that fully matches a regular expression."""
        return cls(llguidance.LLMatcher.grammar_from_regex(pattern), "regex")

    @classmethod
    def gbnf(cls, text: str) -> Grammar:
        """A llama.cpp GBNF grammar (`root ::= ...`), as llama.cpp's --grammar takes."""
        try:
            lark = gbnf_to_lark(text)
        except Exception as err:  # the converter raises plain exceptions for every parse problem
            raise GrammarError(f"the GBNF grammar does not parse: {err}") from None
        return cls(llguidance.LLMatcher.grammar_from_lark(lark), "gbnf")

    @classmethod
    def from_file(cls, path: str | Path) -> Grammar:
        """A grammar file, by its extension: .gbnf (llama.cpp), .lark, or .json (a JSON schema)."""
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise GrammarError(f"{file}: cannot read the grammar ({err})") from None
        builders = {".gbnf": cls.gbnf, ".lark": cls.lark, ".json": cls.json_schema}
        if file.suffix not in builders:
            raise GrammarError(f"{file}: unknown grammar type {file.suffix!r}; name it .gbnf, .lark or .json")
        return builders[file.suffix](text)


def lark_json(schema: dict) -> str:
    """The Lark fragment `%json {...}` matching a JSON value valid under `schema`, laid out as json_schema's."""
    return "%json " + json.dumps({**schema, "x-guidance": {**_JSON_LAYOUT, **schema.get("x-guidance", {})}})


class GrammarVocabulary:
    """A tokenizer's vocabulary prepared for llguidance; build one per tokenizer (it takes ~1 s for 150k
    tokens) and make a TokenConstraint from it for each generation."""

    def __init__(self, tokenizer: Any):
        if not tokenizer.eos_ids:
            raise GrammarError(f"{tokenizer.source}: the tokenizer has no end-of-sequence token, which a grammar "
                               "needs to end the answer")
        self.size = tokenizer.vocab_size
        self._ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)),
                                          eos_token=list(tokenizer.eos_ids))

    def constraint(self, grammar: Grammar) -> TokenConstraint:
        """A fresh matcher of `grammar` for one generation; GrammarError when the grammar does not compile."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar.spec, self._ll)
        if is_error:
            raise GrammarError(f"the {grammar.kind} grammar is not valid: {messages[0]}")
        return TokenConstraint(llguidance.LLMatcher(self._ll, grammar.spec, log_level=0), self.size, grammar.kind)


class TokenConstraint:
    """One generation's grammar state: masks the logits of each step, then advances with the chosen token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, kind: str):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._kind = kind
        self._check()

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows no more text (only the end-of-sequence token)."""
        return self._matcher.is_stopped()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (V,) with every token the grammar forbids now set to -inf (a new tensor)."""
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        self._check()
        allowed = ((words[:, None] >> _BIT_SHIFTS) & 1).flatten().bool()  # bit j of byte k is token 8k + j
        n = logits.shape[-1]
        if n > allowed.numel():  # ids past the tokenizer's vocabulary (a padded lm_head) are never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(n - allowed.numel())])
        allowed = allowed[:n].to(logits.device, non_blocking=True)
        if not bool(allowed.any()):
            raise GrammarError(f"the {self._kind} grammar allows no token of this model's vocabulary here")
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        """Feed the token chosen from the masked logits."""
        if not self._matcher.consume_token(token):
            self._check()
            raise GrammarError(f"token {token} does not continue the {self._kind} grammar")

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"the {self._kind} grammar failed: {self._matcher.get_error()}")


class _Vocabulary:
    """The tokenizer as llguidance.TokenizerWrapper reads it: token bytes, BOS/EOS, and bytes -> ids."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self.tokens = tokenizer.token_bytes()
        self.eos_token_id = tokenizer.eos_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text: bytes) -> list[int]:
        # llguidance tokenizes text the grammar forces in the middle of an answer: no BOS, no prefix space.
        return self._tokenizer.encode_continuation(text.decode("utf-8", "replace"))
