"""Constrained decoding (runtime/grammar.py) with the demo model: JSON schema, regex, GBNF and Lark grammars,
checked by parsing what comes out, through the single-sequence Generator and the continuous-batching path."""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch

from kilnlm import Engine
from kilnlm.runtime.engine import demo_model_path
from kilnlm.runtime.grammar import Grammar, GrammarError, GrammarVocabulary

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["merry", "sad", "wroth"]},
        "friends": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "mood", "friends"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    with Engine.load(demo_model_path(), progress=False, context_length=256) as loaded:
        yield loaded


def _check_person(value: dict) -> None:
    assert set(value) == {"name", "age", "mood", "friends"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 16
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
    assert value["mood"] in ("merry", "sad", "wroth")
    assert len(value["friends"]) <= 2 and all(isinstance(f, str) and len(f) <= 8 for f in value["friends"])


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_parses_and_follows_the_schema(engine, seed: int) -> None:
    text = engine.generate("ROMEO:", grammar=Grammar.json_schema(PERSON), temperature=1.0, seed=seed,
                           max_tokens=120)
    _check_person(json.loads(text))
    assert engine.last_stats.finish_reason == "stop"  # the grammar completed; no token was wasted after it


def test_unconstrained_output_is_not_json(engine) -> None:
    """The control: the demo model writes Shakespeare, so the JSON above is the grammar's doing."""
    text = engine.generate("ROMEO:", temperature=1.0, seed=0, max_tokens=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_json_object_regex_gbnf_and_lark_grammars(engine) -> None:
    assert isinstance(json.loads(engine.generate("JULIET:", grammar=Grammar.json_object(), temperature=0.9,
                                                 seed=1, max_tokens=80)), dict)
    pattern = r"(Ay|Nay), good (sir|madam)\."
    assert re.fullmatch(pattern, engine.generate("JULIET:", grammar=Grammar.regex(pattern), temperature=1.0, seed=2))
    gbnf = 'root ::= "I " verb " thee" ("." | "!")\nverb ::= "love" | "hate" | "know"'
    assert re.fullmatch(r"I (love|hate|know) thee[.!]",
                        engine.generate("JULIET:", grammar=Grammar.gbnf(gbnf), temperature=1.0, seed=3))
    lark = 'start: "Thou art " WORD "."\nWORD: /[a-z]{2,10}/'
    assert re.fullmatch(r"Thou art [a-z]{2,10}\.", engine.generate("JULIET:", grammar=Grammar.lark(lark),
                                                                    temperature=1.0, seed=4))


def test_streaming_equals_whole_and_a_short_budget_ends_with_length(engine) -> None:
    grammar = Grammar.json_schema(PERSON)
    whole = engine.generate("ROMEO:", grammar=grammar, temperature=1.0, seed=7, max_tokens=120)
    assert "".join(engine.generate("ROMEO:", grammar=grammar, temperature=1.0, seed=7, max_tokens=120,
                                   stream=True)) == whole
    cut = engine.generate("ROMEO:", grammar=grammar, temperature=1.0, seed=7, max_tokens=5)
    assert whole.startswith(cut) and engine.last_stats.finish_reason == "length"


def test_batched_generation_follows_the_grammar_and_matches_one_at_a_time(engine) -> None:
    grammar = Grammar.json_schema(PERSON)
    alone = [engine.generate("ROMEO:", grammar=grammar, temperature=1.0, seed=s, max_tokens=120) for s in range(3)]
    with Engine.load(demo_model_path(), progress=False, context_length=256, parallel=3) as batched:
        results: dict[int, str] = {}

        def run(seed: int) -> None:
            results[seed] = batched.generate("ROMEO:", grammar=grammar, temperature=1.0, seed=seed, max_tokens=120)

        threads = [threading.Thread(target=run, args=(s,)) for s in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert [results[s] for s in range(3)] == alone


def test_bad_grammars_fail_before_generating(engine, tmp_path) -> None:
    with pytest.raises(GrammarError, match="not valid"):
        engine.generate("x", grammar=Grammar.lark("start: undefined_rule"))
    with pytest.raises(GrammarError, match="not valid JSON"):
        Grammar.json_schema("{not json")
    with pytest.raises(GrammarError, match="GBNF"):
        Grammar.gbnf("root ::= (")
    with pytest.raises(GrammarError, match="not valid"):
        engine.generate("x", grammar=Grammar.regex("[a-"))
    odd = tmp_path / "grammar.txt"
    odd.write_text("root ::= \"a\"")
    with pytest.raises(GrammarError, match=".gbnf, .lark or .json"):
        Grammar.from_file(odd)
    good = tmp_path / "yes.gbnf"
    good.write_text('root ::= "yes" | "no"')
    assert engine.generate("x", grammar=Grammar.from_file(good), temperature=1.0, seed=0) in ("yes", "no")


def test_mask_forbids_ids_past_the_tokenizer_vocabulary(engine) -> None:
    """A padded lm_head has more logits than the tokenizer has tokens: those ids are never allowed."""
    constraint = GrammarVocabulary(engine.tokenizer).constraint(Grammar.regex("[a-z]+"))
    size = engine.tokenizer.vocab_size
    logits = torch.zeros(size + 64)
    logits[size:] = 100.0  # the padded ids would win without the mask
    masked = constraint.mask(logits)
    assert torch.isinf(masked[size:]).all()
    allowed = torch.nonzero(~torch.isinf(masked)).flatten().tolist()
    table = engine.tokenizer.token_bytes()
    assert allowed and all(re.fullmatch(rb"[a-z]+", table[i]) for i in allowed)
    # and every token spelling lowercase letters is allowed: the mask is exact, not a subset
    assert set(allowed) == {i for i, b in enumerate(table) if re.fullmatch(rb"[a-z]+", b)}
