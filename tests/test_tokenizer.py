"""Tokenizer tests: parity with sentencepiece, HF tokenizers and transformers on tiny tokenizers trained here.

The core tests build their own fixtures (a SentencePiece BPE model with byte fallback, byte-level BPE
tokenizer.json folders); the Llama-2 tests use ../shared beside the repo and skip when it is absent.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from kilnlm.errors import TokenizerError
from kilnlm.runtime.tokenizer import AddedToken, Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA2_MODEL = SHARED / "tokenizers" / "llama2-tokenizer.model"

# Whitespace runs, newlines, tabs, accents, CJK (partly outside the tiny vocabularies: byte fallback), emoji.
STRINGS = [
    "Hello world",
    " leading space",
    "trailing space ",
    "double  space",
    "   three leading",
    "line one\nline two",
    "\n\nnewlines first",
    "tab\tseparated\tvalues",
    "Café naïve façade déjà vu",
    "Ünïcödé ß ø Å",
    "日本語のテキスト",
    "東京タワー 🗼 and 龘",
    "emoji 😀 and 🦙 and 👩‍👩‍👧",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
    "def f(x):\n    return x + 1\n",
    "1234567890 3.14",
    "a\u00a0b zero\u200bwidth",
    "",
    " ",
    "\t",
]

WORDS = (
    "the quick brown fox jumps over lazy dog hello world model token text stream byte space line "
    "café naïve façade déjà vu über straße ünïcödé 日本 語 東京 テキスト 中文 字符 "
    "def return print"
).split()


def _corpus(n_lines: int = 1500) -> list[str]:
    """Deterministic training text with spaces, tabs, accents and CJK (emoji deliberately absent)."""
    rng = random.Random(0)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        sep = rng.choice([" ", " ", " ", "  ", "\t"])
        lines.append(sep.join(words) + rng.choice(["", ".", "!", " 42", ":\n    x = 1"]))
    return lines


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


# --------------------------------------------------------------------------------------- SentencePiece fixtures

SP_VARIANTS = {
    # Llama-like: no normalisation, whitespace kept as is.
    "llama": dict(normalization_rule_name="identity", remove_extra_whitespaces=False),
    # sentencepiece's defaults: NFKC and collapsed whitespace (decode(encode(s)) != s for some strings).
    "nfkc": dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True),
}


def _train_sentencepiece(**normalizer: object) -> bytes:
    """A ~400-piece SentencePiece BPE model with byte fallback and a control symbol <|im_end|>."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=out,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=0.99,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        control_symbols=["<|im_end|>"],
        num_threads=1,
        minloglevel=2,
        **normalizer,
    )
    return out.getvalue()


@pytest.fixture(scope="module", params=list(SP_VARIANTS))
def sp_model(request: pytest.FixtureRequest) -> bytes:
    """Serialized SentencePiece model, once per normalisation variant."""
    return _train_sentencepiece(**SP_VARIANTS[request.param])


@pytest.fixture(scope="module")
def llama_sp_model() -> bytes:
    """The Llama-like (identity-normalised) SentencePiece model only."""
    return _train_sentencepiece(**SP_VARIANTS["llama"])


def _sp_folder(root: Path, model: bytes, **config: object) -> Path:
    """An HF-style SentencePiece folder: tokenizer.model, tokenizer_config.json (with an added <|im_start|>)."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    n = sp.piece_size()
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(model)
    builtin = (0, 1, 2, sp.piece_to_id("<|im_end|>"))
    added = {str(i): {"content": sp.id_to_piece(i), "special": True} for i in builtin}
    added[str(n)] = {"content": "<|im_start|>", "special": True}
    added[str(n + 1)] = {"content": "<extra>", "special": False}
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "added_tokens_decoder": added,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    _write_json(root / "tokenizer_config.json", {**cfg, **config})
    _write_json(root / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, sp.piece_to_id("<|im_end|>")]})
    return root


@pytest.fixture(scope="module")
def sp_pair(sp_model: bytes, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, spm.SentencePieceProcessor]:
    """(our Tokenizer from the folder, sentencepiece's own processor) for each variant."""
    folder = _sp_folder(tmp_path_factory.mktemp("sp"), sp_model)
    return Tokenizer.from_hf_folder(folder), spm.SentencePieceProcessor(model_proto=sp_model)


@pytest.fixture(scope="module")
def llama_sp_folder(llama_sp_model: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Llama-like SentencePiece folder."""
    return _sp_folder(tmp_path_factory.mktemp("llama_sp"), llama_sp_model)


# --------------------------------------------------------------------------------------- byte-level BPE fixtures

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def bpe_json() -> str:
    """A Llama-3-style byte-level BPE (Split regex + ByteLevel) with special tokens, as tokenizer.json text."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=BPE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    return tok.to_str()


@pytest.fixture(scope="module")
def llama3_folder(bpe_json: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-3 layout: BOS from the post-processor, eos ids from tokenizer_config + generation_config."""
    root = tmp_path_factory.mktemp("llama3")
    (root / "tokenizer.json").write_text(bpe_json, encoding="utf-8")
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|end_of_text|>", "special": True},
        "chat_template": templates,
    }
    _write_json(root / "tokenizer_config.json", cfg)
    _write_json(root / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [4, 1]})
    return root


@pytest.fixture(scope="module")
def qwen_folder(bpe_json: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 layout: no post-processor, bos_token null, eos <|im_end|>, bos id only in generation_config."""
    root = tmp_path_factory.mktemp("qwen")
    data = json.loads(bpe_json)
    data["post_processor"] = None
    _write_json(root / "tokenizer.json", data)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
           "pad_token": "<|end_of_text|>"}
    _write_json(root / "tokenizer_config.json", cfg)
    _write_json(root / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [3, 1]})
    return root


def _transformers_tokenizer(folder: Path):
    """transformers' AutoTokenizer for a folder (transformers is a test-only peer)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


# --------------------------------------------------------------------------------------- SentencePiece tests


def test_sentencepiece_encode_matches_sentencepiece(sp_pair) -> None:
    tok, sp = sp_pair
    for s in STRINGS:
        assert tok.encode(s) == [sp.bos_id(), *sp.encode(s)], s
        assert tok.encode(s, add_bos=False) == sp.encode(s), s


def test_sentencepiece_byte_fallback_is_exercised(sp_pair) -> None:
    tok, sp = sp_pair
    for s in ["😀", "🦙", "龘"]:
        ids = tok.encode(s, add_bos=False)
        assert any(sp.is_byte(i) for i in ids), (s, ids)
        assert tok.decode(ids) == s


def test_sentencepiece_decode_matches_sentencepiece_and_round_trips(sp_pair) -> None:
    tok, sp = sp_pair
    for s in STRINGS:
        ids = tok.encode(s)
        assert tok.decode(ids) == sp.decode(ids), s
        # Exact round trip wherever sentencepiece itself round-trips (NFKC / whitespace folding does not).
        if sp.decode(sp.encode(s)) == s:
            assert tok.decode(ids) == s, s


def test_sentencepiece_nfkc_model_normalises_like_sentencepiece(sp_model: bytes) -> None:
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    tok = Tokenizer.from_sentencepiece_proto(sp_model, bos_id=1, eos_ids=[2], add_bos=False)
    s = "double  space  \t ﬁ"
    assert tok.decode(tok.encode(s)) == sp.decode(sp.encode(s))


def test_sentencepiece_special_fields(sp_pair) -> None:
    tok, sp = sp_pair
    im_end = sp.piece_to_id("<|im_end|>")
    n = sp.piece_size()
    assert (tok.bos_id, tok.bos_token, tok.eos_token, tok.pad_id) == (1, "<s>", "</s>", None)
    assert tok.eos_ids == (2, im_end)
    assert tok.add_bos is True
    assert tok.vocab_size == n + 2
    assert tok.special_ids == frozenset({0, 1, 2, im_end, n})  # <extra> is added but not special
    assert tok.chat_template.startswith("{{ bos_token }}")
    assert tok.token_to_id("<|im_start|>") == n
    assert tok.token_to_id("<extra>") == n + 1
    assert tok.token_to_id("no such piece") is None
    assert tok.id_to_piece(n) == "<|im_start|>"
    assert tok.id_to_piece(sp.encode("the")[0]) == sp.id_to_piece(sp.encode("the")[0])


def test_sentencepiece_special_strings_become_single_ids(llama_sp_folder: Path) -> None:
    tok = Tokenizer.from_hf_folder(llama_sp_folder)
    sp = spm.SentencePieceProcessor(model_file=str(llama_sp_folder / "tokenizer.model"))
    n, im_end = sp.piece_size(), sp.piece_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|></s><s><extra><unk>", add_bos=False)
    assert ids[0] == n and ids[-5:] == [im_end, 2, 1, n + 1, 0]
    assert ids.count(n) == 1


def test_sentencepiece_added_tokens_longest_match_first(llama_sp_model: bytes) -> None:
    sp = spm.SentencePieceProcessor(model_proto=llama_sp_model)
    n = sp.piece_size()
    added = [AddedToken(n, "<tool>"), AddedToken(n + 1, "<tool>_call"), AddedToken(n + 2, "_call>")]
    tok = Tokenizer.from_sentencepiece_proto(llama_sp_model, added_tokens=added)
    ids = tok.encode("x<tool>_call>")
    assert [i for i in ids if i >= n] == [n + 1]
    assert tok.decode(ids, skip_special=False) == "x<tool>_call>"
    assert tok.encode("<tool><tool>_call") == [n, n + 1]


def test_sentencepiece_text_after_special_has_no_dummy_prefix(llama_sp_folder: Path) -> None:
    tok = Tokenizer.from_hf_folder(llama_sp_folder)
    sp = spm.SentencePieceProcessor(model_file=str(llama_sp_folder / "tokenizer.model"))
    im_end = sp.piece_to_id("<|im_end|>")
    # A chunk starting with a space: without a dummy prefix it is what sentencepiece gives for the bare word.
    assert tok.encode("a<|im_end|> there", add_bos=False) == [*sp.encode("a"), im_end, *sp.encode("there")]
    # A chunk starting with "\n": sentencepiece alone puts a lone dummy "▁" first, which must be absent.
    with_prefix = sp.encode("\nhello")
    assert sp.id_to_piece(with_prefix[0]) == "▁"
    assert tok.encode("a<|im_end|>\nhello", add_bos=False) == [*sp.encode("a"), im_end, *with_prefix[1:]]
    for s in ["<|im_start|>user", "<s>Hello", "x</s>y z"]:
        ids = tok.encode(s, add_bos=False)
        assert not any(tok.id_to_piece(i).startswith("▁") for i in ids[1:2] if i not in tok.special_ids), s
        assert tok.decode(ids, skip_special=False) == s


def test_sentencepiece_legacy_mode_prefixes_every_chunk(llama_sp_model: bytes, tmp_path: Path) -> None:
    folder = _sp_folder(tmp_path / "legacy", llama_sp_model, legacy=True)
    tok = Tokenizer.from_hf_folder(folder)
    sp = spm.SentencePieceProcessor(model_proto=llama_sp_model)
    im_end = sp.piece_to_id("<|im_end|>")
    assert tok.encode("a<|im_end|>\nhello there", add_bos=False) == [
        *sp.encode("a"), im_end, *sp.encode("\nhello there")
    ]


def test_sentencepiece_decode_special_tokens(llama_sp_folder: Path) -> None:
    tok = Tokenizer.from_hf_folder(llama_sp_folder)
    text = "<|im_start|>user\nhello world<|im_end|>\n"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special=False) == "<s>" + text
    assert tok.decode(ids) == "user\nhello world\n"
    # Skipped specials between words keep the words' own spaces; non-special added tokens stay.
    ids = tok.encode("hello</s> world<extra>!", add_bos=False)
    assert tok.decode(ids) == "hello world<extra>!"


# transformers 5 runs SentencePiece models through `tokenizers` BPE, which differs from sentencepiece (and from
# llama.cpp, see test_llama2_matches_llama_cpp_vocab_tests) on whitespace: " x" -> "▁x" instead of "▁", "▁x",
# and merges across runs of spaces ("a  b" -> "▁a", "▁▁", "b" instead of "▁a", "▁", "▁b").
# We follow sentencepiece.
_HF_SP_COMPARABLE = [s for s in STRINGS if not s[:1].isspace() and "  " not in s]


def test_sentencepiece_matches_transformers(llama_sp_folder: Path) -> None:
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a tokenizer.model")
    hf = _transformers_tokenizer(llama_sp_folder)
    tok = Tokenizer.from_hf_folder(llama_sp_folder)
    chat = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\nthe fox<|im_end|></s>"
    for s in _HF_SP_COMPARABLE + [chat, "<s>Hello", "a</s> b", "x<unk>y"]:
        ids = tok.encode(s)
        assert ids == hf.encode(s), s
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), s
        assert tok.decode(ids, skip_special=False) == hf.decode(ids), s


# --------------------------------------------------------------------------------------- byte-level BPE tests


def test_bpe_matches_tokenizers_library(llama3_folder: Path, bpe_json: str) -> None:
    tok = Tokenizer.from_hf_folder(llama3_folder)
    ref = tokenizers.Tokenizer.from_str(bpe_json)
    for s in STRINGS:
        expected = ref.encode(s, add_special_tokens=False).ids
        assert tok.encode(s, add_bos=False) == expected, s
        assert tok.encode(s) == [0, *expected], s
        assert tok.decode(tok.encode(s)) == s, s


def test_bpe_fields_llama3_layout(llama3_folder: Path, bpe_json: str) -> None:
    tok = Tokenizer.from_hf_folder(llama3_folder)
    assert (tok.add_bos, tok.bos_id, tok.bos_token) == (True, 0, "<|begin_of_text|>")
    assert tok.eos_ids == (1, 4)  # tokenizer_config's eos first, then generation_config's, deduplicated
    assert tok.eos_token == "<|end_of_text|>"
    assert tok.chat_template == "DEFAULT"
    assert tok.special_ids == frozenset(range(len(BPE_SPECIALS)))
    assert tok.vocab_size == tokenizers.Tokenizer.from_str(bpe_json).get_vocab_size() > 300
    assert tok.id_to_piece(tok.encode(" the", add_bos=False)[0]).startswith("Ġ")


def test_bpe_fields_qwen_layout(qwen_folder: Path) -> None:
    tok = Tokenizer.from_hf_folder(qwen_folder)
    assert tok.add_bos is False
    assert (tok.bos_id, tok.bos_token) == (1, "<|end_of_text|>")  # generation_config's bos_token_id
    assert tok.eos_ids == (3, 1)
    assert tok.pad_id == 1
    assert tok.chat_template is None
    assert tok.encode("hello")[0] != 1
    assert tok.encode("hello", add_bos=True)[0] == 1


def test_bpe_add_bos_token_in_config_wins(bpe_json: str, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(bpe_json, encoding="utf-8")
    _write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<|begin_of_text|>", "add_bos_token": False})
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.add_bos is False and tok.bos_id == 0
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)


def test_bpe_special_strings_become_single_ids(llama3_folder: Path) -> None:
    tok = Tokenizer.from_hf_folder(llama3_folder)
    ids = tok.encode("<|im_start|>user\nhi 😀<|im_end|><|eot_id|>")
    assert ids[:2] == [0, 2] and ids[-2:] == [3, 4]
    assert [i for i in ids if i in tok.special_ids] == [0, 2, 3, 4]
    assert tok.decode(ids, skip_special=False) == "<|begin_of_text|><|im_start|>user\nhi 😀<|im_end|><|eot_id|>"
    assert tok.decode(ids) == "user\nhi 😀"


@pytest.mark.parametrize("layout", ["llama3_folder", "qwen_folder"])
def test_bpe_matches_transformers(layout: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(layout)
    hf = _transformers_tokenizer(folder)
    tok = Tokenizer.from_hf_folder(folder)
    chat = "<|im_start|>system\nyou are a fox<|im_end|>\n<|im_start|>user\nhi 😀<|im_end|><|eot_id|>"
    for s in STRINGS + [chat]:
        ids = tok.encode(s)
        assert ids == hf.encode(s), s
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), s
        assert tok.decode(ids, skip_special=False) == hf.decode(ids), s


# --------------------------------------------------------------------------------------- streaming


def _stream_pieces(tok: Tokenizer, ids: list[int], skip_special: bool) -> list[str]:
    """Pieces returned by pushing every id, then flush()."""
    stream = tok.stream(skip_special=skip_special)
    return [stream.push(i) for i in ids] + [stream.flush()]


def _check_stream(tok: Tokenizer, ids: list[int]) -> None:
    """Stream pieces concatenate to decode(ids) and hold back unfinished UTF-8."""
    for skip in (True, False):
        pieces = _stream_pieces(tok, ids, skip)
        full = tok.decode(ids, skip_special=skip)
        assert "".join(pieces) == full, (ids, pieces)
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces), pieces


STREAM_TEXTS = STRINGS + [
    "<|im_start|>user\nhello 😀 world<|im_end|>\n<|im_start|>assistant\n 日本語 🦙🦙<|im_end|>",
    "😀😀😀 three emoji, then 👩‍👩‍👧 a family",
    "  spaces   everywhere  \n\n  ",
]


def test_stream_equals_decode_sentencepiece(sp_pair) -> None:
    tok, _ = sp_pair
    for s in STREAM_TEXTS:
        _check_stream(tok, tok.encode(s))


def test_stream_equals_decode_bpe(llama3_folder: Path) -> None:
    tok = Tokenizer.from_hf_folder(llama3_folder)
    assert len(tok.encode("😀", add_bos=False)) > 1  # the emoji really is split over byte tokens
    for s in STREAM_TEXTS:
        _check_stream(tok, tok.encode(s))


def test_stream_emits_whole_characters(llama_sp_folder: Path, llama3_folder: Path) -> None:
    for folder in (llama_sp_folder, llama3_folder):
        tok = Tokenizer.from_hf_folder(folder)
        pieces = _stream_pieces(tok, tok.encode("a😀b"), skip_special=True)
        assert "".join(pieces) == "a😀b"
        assert any("😀" in p for p in pieces)
        assert all("\ufffd" not in p for p in pieces)


def test_stream_random_ids(sp_pair, llama3_folder: Path) -> None:
    bpe = Tokenizer.from_hf_folder(llama3_folder)
    rng = random.Random(1)
    for tok in (sp_pair[0], bpe):
        for _ in range(30):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
            for skip in (True, False):
                assert "".join(_stream_pieces(tok, ids, skip)) == tok.decode(ids, skip_special=skip), ids


def test_stream_truncated_character_flushes_replacement(llama_sp_folder: Path) -> None:
    tok = Tokenizer.from_hf_folder(llama_sp_folder)
    ids = tok.encode("ok 😀", add_bos=False)[:-1]  # drop the emoji's last byte token
    pieces = _stream_pieces(tok, ids, skip_special=True)
    assert "\ufffd" not in "".join(pieces[:-1])
    assert pieces[-1].endswith("\ufffd")
    assert "".join(pieces) == tok.decode(ids)


def test_stream_decodes_a_small_window(llama3_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = Tokenizer.from_hf_folder(llama3_folder)
    ids = tok.encode(" ".join(_corpus(60)), add_bos=False)
    assert len(ids) > 500
    sizes: list[int] = []
    real_decode = tok.decode
    def recording_decode(window: list[int], skip_special: bool = True) -> str:
        sizes.append(len(window))
        return real_decode(window, skip_special)

    monkeypatch.setattr(tok, "decode", recording_decode)
    text = "".join(_stream_pieces(tok, ids, skip_special=True))
    assert text == real_decode(ids)
    assert max(sizes) <= 8, max(sizes)


# --------------------------------------------------------------------------------------- lower-level constructors


def test_from_sentencepiece_proto(llama_sp_model: bytes) -> None:
    sp = spm.SentencePieceProcessor(model_proto=llama_sp_model)
    n = sp.piece_size()
    tok = Tokenizer.from_sentencepiece_proto(
        llama_sp_model, bos_id=1, eos_ids=[2, 2], add_bos=True, added_tokens=[AddedToken(n, "<|tool|>")]
    )
    assert tok.eos_ids == (2,)
    assert tok.encode("hi<|tool|>") == [1, *sp.encode("hi"), n]
    assert tok.decode([1, *sp.encode("hi"), n], skip_special=False) == "<s> hi<|tool|>"
    with pytest.raises(TokenizerError, match="no BOS"):
        Tokenizer.from_sentencepiece_proto(llama_sp_model, add_bos=True)


def test_from_tokenizers_json(bpe_json: str) -> None:
    tok = Tokenizer.from_tokenizers_json(bpe_json, bos_id=0, eos_ids=[1])
    assert tok.add_bos is False  # the json's post-processor does not decide BOS here
    assert tok.encode("hi", add_bos=True)[0] == 0
    assert tok.encode("hi") == tokenizers.Tokenizer.from_str(bpe_json).encode("hi", add_special_tokens=False).ids


# --------------------------------------------------------------------------------------- errors


def test_error_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_hf_folder(tmp_path / "nope")


def test_error_no_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.model.*tokenizer\.json"):
        Tokenizer.from_hf_folder(tmp_path)


@pytest.mark.parametrize("content", [b"this is not a model\x00\xff", b""])
def test_error_corrupt_tokenizer_model(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerError, match=r"tokenizer\.model"):
        Tokenizer.from_hf_folder(tmp_path)


@pytest.mark.parametrize("content", ['{"model": {', '{"model": {"type": "BPE"}}', "[1, 2]"])
def test_error_corrupt_tokenizer_json(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_folder(tmp_path)


def test_error_corrupt_tokenizer_config(bpe_json: str, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(bpe_json, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json"):
        Tokenizer.from_hf_folder(tmp_path)


@pytest.mark.parametrize(
    ("file", "data", "pattern"),
    [
        ("tokenizer_config.json", {"bos_token": "<|nope|>"}, r"tokenizer_config\.json: bos_token '<\|nope\|>'"),
        ("tokenizer_config.json", {"eos_token": 7}, r"tokenizer_config\.json: eos_token"),
        ("tokenizer_config.json", {"add_bos_token": True}, r"tokenizer_config\.json: add_bos_token"),
        ("tokenizer_config.json", {"add_bos_token": "yes"}, r"tokenizer_config\.json: add_bos_token"),
        ("generation_config.json", {"eos_token_id": [1, 99999]}, r"generation_config\.json: eos_token_id 99999"),
        ("generation_config.json", {"eos_token_id": "2"}, r"generation_config\.json: eos_token_id"),
    ],
)
def test_error_bad_config_fields(bpe_json: str, tmp_path: Path, file: str, data: dict, pattern: str) -> None:
    body = json.loads(bpe_json)
    body["post_processor"] = None  # no BOS unless a config names one
    _write_json(tmp_path / "tokenizer.json", body)
    _write_json(tmp_path / file, data)
    with pytest.raises(TokenizerError, match=pattern):
        Tokenizer.from_hf_folder(tmp_path)


def test_error_decode_unknown_id(llama_sp_folder: Path) -> None:
    tok = Tokenizer.from_hf_folder(llama_sp_folder)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.stream().push(-1)


# --------------------------------------------------------------------------------------- real Llama-2 (shared/)


@pytest.fixture(scope="module")
def llama2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF folder around shared/'s Llama-2 tokenizer.model (skips when shared/ is absent)."""
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"{LLAMA2_MODEL} not found (shared/ is not beside the repo)")
    root = tmp_path_factory.mktemp("llama2")
    shutil.copy(LLAMA2_MODEL, root / "tokenizer.model")
    cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>"}
    _write_json(root / "tokenizer_config.json", cfg)
    return root


def test_llama2_matches_sentencepiece(llama2_folder: Path) -> None:
    tok = Tokenizer.from_hf_folder(llama2_folder)
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.special_ids) == (32000, 1, (2,), frozenset({0, 1, 2}))
    for s in STRINGS:
        assert tok.encode(s) == [1, *sp.encode(s)], s
        assert tok.decode(tok.encode(s)) == s, s
        _check_stream(tok, tok.encode(s))


def test_llama2_matches_llama_cpp_vocab_tests(llama2_folder: Path) -> None:
    base = SHARED / "llama.cpp-vocab" / "ggml-vocab-llama-spm.gguf"
    if not base.with_suffix(".gguf.inp").is_file():
        pytest.skip("llama.cpp vocab test files not in shared/")
    tok = Tokenizer.from_hf_folder(llama2_folder)
    inputs = base.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = base.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(inputs) == len(expected) > 40
    for text, line in zip(inputs, expected):
        assert tok.encode(text, add_bos=False) == [int(x) for x in line.split()], text


def test_llama2_special_tokens_golden(llama2_folder: Path) -> None:
    # Ids from transformers 5.24 LlamaTokenizer (legacy=False, the default) on this tokenizer.model.
    tok = Tokenizer.from_hf_folder(llama2_folder)
    assert tok.encode("<s>[INST] hi [/INST]") == [1, 1, 29961, 25580, 29962, 7251, 518, 29914, 25580, 29962]
    assert tok.encode("Hi</s> there") == [1, 6324, 2, 727]
    assert tok.decode([1, 6324, 2, 727], skip_special=False) == "<s> Hi</s> there"


def test_llama2_matches_transformers(llama2_folder: Path) -> None:
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a tokenizer.model")
    hf = _transformers_tokenizer(llama2_folder)
    tok = Tokenizer.from_hf_folder(llama2_folder)
    for s in _HF_SP_COMPARABLE + ["<s>[INST] hi [/INST]", "Hi</s> there", "x<unk>y"]:
        ids = tok.encode(s)
        assert ids == hf.encode(s), s
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), s


def test_stories260k_hf_folder() -> None:
    folder = SHARED / "checkpoints" / "stories260K-hf"
    if not (folder / "tokenizer.model").is_file():
        pytest.skip(f"{folder} not found (shared/ is not beside the repo)")
    tok = Tokenizer.from_hf_folder(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (512, 1, (2,), True)
    text = "Once upon a time, there was a little girl named Lily.\nShe liked to play."
    assert tok.encode(text) == [1, *sp.encode(text)]
    assert tok.decode(tok.encode(text)) == text


# --------------------------------------------------------------------------------------- token bytes (grammars)


def _spelled(tokenizer: Tokenizer, ids: list[int]) -> bytes:
    table = tokenizer.token_bytes()
    return b"".join(table[i] for i in ids)


def test_sentencepiece_token_bytes_spell_a_continuation(llama_sp_folder: Path) -> None:
    """Grammar masks match text against each token's bytes: "▁" is a space, byte pieces their byte, and a
    continuation gets no dummy-prefix space."""
    tokenizer = Tokenizer.from_hf_folder(llama_sp_folder)
    for text in STRINGS:
        ids = tokenizer.encode_continuation(text)
        assert _spelled(tokenizer, ids) == text.encode(), text
    assert tokenizer.encode("Hello", add_bos=False) != tokenizer.encode_continuation("Hello")
    assert _spelled(tokenizer, tokenizer.encode("Hello", add_bos=False)) == b" Hello"
    table = tokenizer.token_bytes()
    assert len(table) == tokenizer.vocab_size
    assert all(table[i].startswith(b"\xff") for i in tokenizer.special_ids)
    assert table[tokenizer.token_to_id("<extra>")] == b"<extra>"  # an added, not special, token is plain text


def test_byte_level_token_bytes_spell_any_text(llama3_folder: Path) -> None:
    tokenizer = Tokenizer.from_hf_folder(llama3_folder)
    for text in STRINGS:
        assert _spelled(tokenizer, tokenizer.encode_continuation(text)) == text.encode(), text
    eot = tokenizer.token_to_id("<|eot_id|>")
    assert tokenizer.token_bytes()[eot] == b"\xff<|eot_id|>"


def test_metaspace_tokenizer_json_continuation_has_no_prefix_space() -> None:
    """Mistral-style tokenizer.json (Metaspace prepending "▁" to the first word, byte fallback)."""
    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback()])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):  # byte-fallback pieces live in the model's vocabulary, as in Mistral's files
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tokenizer = Tokenizer.from_tokenizers_json(json.dumps(data), bos_id=1, eos_ids=[2])
    assert _spelled(tokenizer, tokenizer.encode("hello world", add_bos=False)) == b" hello world"
    for text in ["hello world", "日本語 🦙", " two  spaces"]:
        assert _spelled(tokenizer, tokenizer.encode_continuation(text)) == text.encode(), text
