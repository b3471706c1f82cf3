"""GGUF tokenizer metadata <-> Tokenizer: parity with llama.cpp's own tokenizer tests, and round trips.

The parity tests run `kiln tokenize` on the vocab-only GGUF files and test cases llama.cpp ships (../shared,
skipped when absent). The round-trip tests train tiny tokenizers here: a SentencePiece BPE model and byte-level
BPE tokenizer.json files with several of llama.cpp's pre-tokenizers, exported to GGUF keys and read back.
"""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from kilnlm.errors import TokenizerError
from kilnlm.export.gguf_file import GGUFFile
from kilnlm.runtime import gguf_vocab as gv
from kilnlm.runtime import pretokenizers
from kilnlm.runtime.gguf_tokenizer import tokenizer_from_gguf
from kilnlm.runtime.gguf_vocab import GGUFVocab, gguf_vocab_from_tokenizer
from kilnlm.runtime.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
VOCABS = SHARED / "llama.cpp-vocab"
VOCAB_NAMES = ["llama-spm", "llama-bpe", "qwen2", "deepseek-coder", "starcoder", "qwen35", "gemma-4"]

# The pre-tokenizer regexes as Meta's and Qwen's tokenizer.json files spell them.
_HF_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_HF_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_HF = _HF_HEAD + r"\p{N}{1,3}" + _HF_TAIL
QWEN2_HF = _HF_HEAD + r"\p{N}" + _HF_TAIL
# DeepSeek-Coder's tokenizer.json: four Split steps and a Digits step, then ByteLevel without its regex.
DEEPSEEK_CODER_HF = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", "Digits"]

STRINGS = [
    "Hello world", " leading space", "trailing space ", "double  space", "   three leading", "line one\nline two",
    "\n\nnewlines first", "tab\tseparated", "\r\n windows\r\n", "Café naïve façade", "日本語のテキスト",
    "emoji 😀 and 🦙 and 👩‍👩‍👧", "def f(x):\n    return x + 1\n", "1234567890 3.14",
    "I'm sure they'll say 'DON'T'",
    "", " ", "\t", "\n",
]


# --------------------------------------------------------------------------------------------- GGUF files


@functools.lru_cache(maxsize=None)
def _vocab_metadata(name: str) -> dict[str, Any]:
    """Metadata of one llama.cpp vocab file (read once per session)."""
    if not VOCABS.is_dir():
        pytest.skip("../shared/llama.cpp-vocab is not present beside the checkout")
    return GGUFFile(VOCABS / f"ggml-vocab-{name}.gguf").metadata


@functools.lru_cache(maxsize=None)
def _vocab_tokenizer(name: str) -> Tokenizer:
    """The Tokenizer of one llama.cpp vocab file (built once per session)."""
    return tokenizer_from_gguf(_vocab_metadata(name), f"ggml-vocab-{name}.gguf")


def _llama_cpp_cases(name: str) -> list[tuple[str, list[int]]]:
    """(input, expected ids) pairs, split as llama.cpp's test-tokenizer-0 does."""
    raw = (VOCABS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs = raw.split(sep)
    if raw.endswith(sep):  # test-tokenizer-0 stops at the end of the text: no empty input after the last separator
        inputs.pop()
    outputs = (VOCABS / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(outputs) > 40
    return [(text, [int(t) for t in line.split()]) for text, line in zip(inputs, outputs)]


def test_our_gguf_parser_matches_gguf_reader():
    """kilnlm's GGUF parser reads exactly the metadata llama.cpp's own gguf.GGUFReader reads."""
    gguf = pytest.importorskip("gguf")
    metadata = _vocab_metadata("llama-spm")
    reader = gguf.GGUFReader(VOCABS / "ggml-vocab-llama-spm.gguf")
    assert metadata == {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert metadata[gv.KEY_MODEL] == "llama" and len(metadata[gv.KEY_TOKENS]) == 32000


@pytest.mark.parametrize("name", VOCAB_NAMES)
def test_llama_cpp_parity_through_kiln_tokenize(name):
    """`kiln tokenize --cases` prints exactly llama.cpp's expected .out file for its .inp file."""
    _vocab_metadata(name)  # skips without ../shared
    gguf = VOCABS / f"ggml-vocab-{name}.gguf"
    result = subprocess.run([sys.executable, "-m", "kilnlm.cli", "tokenize", str(gguf), "--cases", f"{gguf}.inp"],
                            capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stderr
    expected = [[int(t) for t in line.split()] for line in Path(f"{gguf}.out").read_text(encoding="utf-8").splitlines()]
    got = [[int(t) for t in line.split()] for line in result.stdout.splitlines()]
    assert len(got) == len(expected) > 40
    wrong = [(text, want, have) for (text, want), have in zip(_llama_cpp_cases(name), got) if want != have]
    assert not wrong, f"{len(wrong)}/{len(expected)} lines differ, first: {wrong[0]}"


def test_kiln_tokenize_uses_the_engine_path():
    """kiln tokenize and Engine.load read a GGUF file's tokenizer through the same checkpoint.tokenizer()."""
    from kilnlm.export.checkpoint import open_tokenizer
    from kilnlm.runtime.gguf_tokenizer import GGUFBackend

    _vocab_metadata("qwen2")
    assert isinstance(open_tokenizer(VOCABS / "ggml-vocab-qwen2.gguf").backend, GGUFBackend)


@pytest.mark.parametrize(
    ("name", "add_bos", "bos", "eos_ids"),
    [
        ("llama-spm", True, 1, (2,)),
        ("llama-bpe", True, 128000, (128001, 128009)),  # llama.cpp's add_bos default for llama-bpe; <|eot_id|>
        ("qwen2", False, 151643, (151643, 151645)),  # <|im_end|> ends generation
        ("starcoder", False, 0, (0, 4, 6)),  # <|endoftext|>, <fim_pad>, <file_sep>
        ("deepseek-coder", True, 32013, (32014,)),
        ("gemma-4", True, 2, (1, 50, 106)),  # <eos>, <|tool_response>, <turn|>
    ],
)
def test_special_tokens_of_real_vocabs(name, add_bos, bos, eos_ids):
    """BOS, add_bos and the end-of-generation ids follow llama.cpp's rules."""
    tokenizer = _vocab_tokenizer(name)
    assert (tokenizer.add_bos, tokenizer.bos_id, tokenizer.eos_ids) == (add_bos, bos, eos_ids)
    assert tokenizer.encode("Hello", add_bos=True)[0] == bos


@pytest.mark.parametrize("name", VOCAB_NAMES)
def test_real_vocab_decodes_what_it_encodes(name):
    """decode(encode(text)) gives the text back for every llama.cpp test case that has no special-token text."""
    tokenizer = _vocab_tokenizer(name)
    for text, _ in _llama_cpp_cases(name):
        ids = tokenizer.encode(text, add_bos=False)
        if not set(ids) & tokenizer.special_ids:
            assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("name", VOCAB_NAMES)
def test_real_vocab_round_trip(name):
    """GGUF metadata -> Tokenizer -> GGUFVocab gives back every tokenizer key of the file unchanged."""
    metadata = _vocab_metadata(name)
    vocab = gguf_vocab_from_tokenizer(_vocab_tokenizer(name))
    assert vocab.metadata() == {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}


# --------------------------------------------------------------------------------------------- tiny tokenizers


def _corpus(n_lines: int = 600) -> list[str]:
    """Deterministic training text: words, accents, CJK, digits, contractions, code (emoji deliberately absent)."""
    words = "the quick brown fox jumps over lazy dog hello world I'm we'll don't café naïve 日本 語 東京 def 42 3.14"
    words = words.split()
    rng = random.Random(0)
    return [
        rng.choice([" ", "  ", "\t"]).join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        + rng.choice(["", ".", "!", ":\n    x = 1", "\n"])
        for _ in range(n_lines)
    ]


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory) -> Path:
    """A Llama-like SentencePiece HF folder: BPE with byte fallback, a special and a plain added token, legacy mode."""
    folder = tmp_path_factory.mktemp("sp_gguf")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    added = {"400": {"content": "<|im_start|>", "special": True}, "401": {"content": "<tool>", "special": False}}
    # legacy: true is what llama.cpp does after special tokens (a dummy prefix on every text chunk).
    _write_json(folder / "tokenizer_config.json", {
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "legacy": True,
        "added_tokens_decoder": added, "chat_template": "{{ messages }}",
    })
    return folder


_QWEN_CHAT = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
_PRE = pretokenizers.PRE_TOKENIZERS
BPE_VARIANTS = {
    # name: (split steps: regexes or "Digits"; ByteLevel runs GPT-2's regex; ignore_merges; specials; config)
    "llama-bpe": ([LLAMA3_HF], False, True, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                  {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True}),
    "qwen2": ([QWEN2_HF], False, False, *_QWEN_CHAT),
    "qwen35": (list(_PRE["qwen35"].regexes), False, False, *_QWEN_CHAT),
    "gpt-2": ([], True, False, ["<|endoftext|>"], {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}),
    "starcoder": (["Digits"], True, False, ["<|endoftext|>", "<fim_prefix>"], {"eos_token": "<|endoftext|>"}),
    "deepseek-coder": (DEEPSEEK_CODER_HF, False, False, ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
                       {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                        "add_bos_token": True}),
    "deepseek-v3": (list(_PRE["deepseek-v3"].regexes), False, False, ["<｜begin▁of▁sentence｜>"],
                    {"eos_token": "<｜begin▁of▁sentence｜>"}),
    "gpt-4o": (list(_PRE["gpt-4o"].regexes), False, False, ["<|endoftext|>"], {"eos_token": "<|endoftext|>"}),
    "tekken": (list(_PRE["tekken"].regexes), False, True, ["<s>", "</s>"],
               {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}),
}


def _split_step(step: str):
    if step == "Digits":
        return pre_tokenizers.Digits(individual_digits=True)
    return pre_tokenizers.Split(tokenizers.Regex(step), behavior="isolated")


def _byte_level_folder(folder: Path, pre: str) -> Path:
    """A byte-level BPE HF folder trained here with the given llama.cpp pre-tokenizer's splitting."""
    steps, byte_level_regex, ignore_merges, specials, config = BPE_VARIANTS[pre]
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=byte_level_regex)
    tok.pre_tokenizer = pre_tokenizers.Sequence([*map(_split_step, steps), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_tokens([tokenizers.AddedToken("<tool>", special=False, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", config)
    return folder


def _strings_with(specials: list[str]) -> list[str]:
    """STRINGS plus strings with the given special tokens and the plain added token between words."""
    a, b = specials[0], specials[-1]
    return [*STRINGS, f"{a}Hello{b} world", f"{a} spaced {b}\n", "x<tool>y <tool> z", f"{b}{a}<tool>"]


def _assert_same_tokenizer(original: Tokenizer, restored: Tokenizer, strings: list[str]) -> None:
    """Identical ids (with and without BOS) and identical decodes (special tokens kept and skipped)."""
    for text in strings:
        ids = original.encode(text)
        assert restored.encode(text) == ids, text
        assert restored.encode(text, add_bos=False) == original.encode(text, add_bos=False), text
        for skip in (True, False):
            assert restored.decode(ids, skip_special=skip) == original.decode(ids, skip_special=skip), text
    assert (restored.bos_id, restored.pad_id, restored.add_bos) == (original.bos_id, original.pad_id, original.add_bos)
    assert restored.eos_ids[0] == original.eos_ids[0]
    assert restored.chat_template == original.chat_template


def test_sentencepiece_folder_round_trip(sp_folder):
    """HF SentencePiece folder -> GGUFVocab -> GGUF keys -> Tokenizer encodes and decodes identically."""
    original = Tokenizer.from_hf_folder(sp_folder)
    vocab = gguf_vocab_from_tokenizer(original)
    sp = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    assert (vocab.model, vocab.pre, len(vocab.tokens)) == ("llama", "default", 402)
    assert vocab.tokens[:400] == [sp.id_to_piece(i) for i in range(400)]
    assert vocab.scores[:400] == [sp.get_score(i) for i in range(400)]
    types = vocab.token_types
    assert (types[0], types[1], types[2], types[3], types[400], types[401]) == (2, 3, 3, 6, 3, 4)
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.add_bos) == (1, 2, 0, True)
    restored = tokenizer_from_gguf(vocab.metadata(), "round trip")
    _assert_same_tokenizer(original, restored, _strings_with(["<s>", "<|im_start|>"]))
    assert restored.encode("<|im_start|>x<tool>y", add_bos=False)[:1] == [400]


@pytest.mark.parametrize("pre", list(BPE_VARIANTS))
def test_byte_level_folder_round_trip(tmp_path, pre):
    """HF byte-level BPE folder -> GGUFVocab (pre detected) -> GGUF keys -> Tokenizer: identical ids and decodes."""
    original = Tokenizer.from_hf_folder(_byte_level_folder(tmp_path, pre))
    vocab = gguf_vocab_from_tokenizer(original)
    specials = BPE_VARIANTS[pre][3]
    assert (vocab.model, vocab.pre, vocab.scores) == ("gpt2", pre, None)
    assert [vocab.token_types[original.token_to_id(s)] for s in specials] == [3] * len(specials)
    assert vocab.token_types[original.token_to_id("<tool>")] == 4
    assert vocab.merges and all(len(m.split(" ")) == 2 for m in vocab.merges)
    restored = tokenizer_from_gguf(vocab.metadata(), "round trip")
    _assert_same_tokenizer(original, restored, _strings_with(specials))


# --------------------------------------------------------------------------------------------- protobuf codec


def test_model_proto_parser_matches_protobuf():
    """The hand-written ModelProto decoder reads what protobuf's own generated code writes."""
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = ["<unk>", "<s>", "<0x41>", "▁a", "é"], [0.0, 0.0, 0.0, -1.5, -1e9], [2, 3, 6, 1, 4]
    proto = pb.ModelProto()
    for text, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=text, score=score, type=kind)
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.unk_id = -1  # a negative int32: ten varint bytes the decoder must skip
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.precompiled_charsmap = b"\x01\x02"
    parsed = gv._parse_spm_model(proto.SerializeToString())
    assert (parsed.tokens, parsed.scores, parsed.types) == (tokens, scores, types)
    assert (parsed.model_type, parsed.normalizer, parsed.add_dummy_prefix, parsed.charsmap) == (
        2, "identity", False, b"\x01\x02")


# --------------------------------------------------------------------------------------------- errors


def _spm_metadata(**overrides: Any) -> dict[str, Any]:
    """A minimal valid SentencePiece GGUF vocabulary."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "a", "▁a"]
    types = [2, 3, 3, *[6] * 256, 1, 1, 1]
    scores = [0.0] * 259 + [-1.0, -2.0, -0.5]
    return {gv.KEY_MODEL: "llama", gv.KEY_TOKENS: tokens, gv.KEY_SCORES: scores, gv.KEY_TOKEN_TYPE: types, **overrides}


def _bpe_metadata(**overrides: Any) -> dict[str, Any]:
    """A minimal valid byte-level BPE GGUF vocabulary."""
    tokens = ["a", "b", "ab", "Ġ", "Ġab", "<|eot|>"]
    return {gv.KEY_MODEL: "gpt2", gv.KEY_PRE: "qwen2", gv.KEY_TOKENS: tokens, gv.KEY_TOKEN_TYPE: [1, 1, 1, 1, 1, 3],
            gv.KEY_MERGES: ["a b", "Ġ ab"], **overrides}


def test_minimal_vocabularies_tokenize():
    """The error tests' baselines are valid: the SPM one merges by score, the BPE one by rank."""
    assert tokenizer_from_gguf(_spm_metadata(), "spm").encode("a a", add_bos=False) == [261, 261]
    assert tokenizer_from_gguf(_bpe_metadata(), "bpe").encode("ab ab<|eot|>") == [2, 4, 5]


def _every_byte_metadata(pre: str | None) -> dict[str, Any]:
    """A BPE vocabulary that can spell any text: GPT-2's 256 byte characters, the 256 <0xXX> tokens, "▁"."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens = [*sorted(alphabet), *(f"<0x{b:02X}>" for b in range(256)), "▁", "<|eot|>"]
    tokens = list(dict.fromkeys(tokens))
    types = [6 if t.startswith("<0x") and len(t) == 6 else 3 if t == "<|eot|>" else 1 for t in tokens]
    metadata = {gv.KEY_MODEL: "gpt2", gv.KEY_TOKENS: tokens, gv.KEY_TOKEN_TYPE: types, gv.KEY_MERGES: [],
                gv.KEY_BOS: len(tokens) - 1}
    if pre is not None:
        metadata[gv.KEY_PRE] = pre
    return metadata


@pytest.mark.parametrize("pre", [*pretokenizers.PRE_TOKENIZERS, None])
def test_every_pre_tokenizer_builds_and_round_trips(pre):
    """Every tokenizer.ggml.pre llama.cpp knows (None: key absent, its 'default') compiles and keeps all text."""
    tokenizer = tokenizer_from_gguf(_every_byte_metadata(pre), "bpe")
    text = "Hello, World! don't 12345 3.14\n\n\tx  日本語 한국어 🦙 <sentinel:3> a<|eot|>b"
    ids = tokenizer.encode(text, add_bos=False)
    assert tokenizer.decode(ids, skip_special=False) == text
    assert ids[-2] == tokenizer.token_to_id("<|eot|>")


@pytest.mark.parametrize("name", [n for n, p in pretokenizers.PRE_TOKENIZERS.items() if p.byte_encode])
def test_pre_tokenizer_detection_finds_an_equivalent_entry(name):
    """A tokenizer.json splitting like `name` is exported under a name that splits and merges the same way."""
    pre = pretokenizers.PRE_TOKENIZERS[name]
    for regexes in (pre.regexes, *pre.hf_forms):
        found = pretokenizers.PRE_TOKENIZERS[pretokenizers.detect_pre_tokenizer(regexes, pre.ignore_merges)]
        assert (found.regexes, found.ignore_merges, found.byte_encode) == (pre.regexes, pre.ignore_merges, True)


def test_pre_tokenizer_splits_like_llama_cpp():
    """Spot checks of the regexes on the words llama.cpp's custom splitters produce."""
    def words(name: str, text: str) -> list[str]:
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in pretokenizers.PRE_TOKENIZERS[name].regexes])
        return [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)]

    assert words("afmoe", "1234567 12") == ["1", "234", "567", " ", "12"]  # digits grouped from the right
    assert words("kimi-k2", "Hello世界world") == ["Hello", "世界", "world"]  # Han runs apart from other letters
    assert words("gpt-2", "a  b\n") == ["a", " ", " b", "\n"]
    assert words("llama-bpe", "I'M 12345") == ["I", "'M", " ", "123", "45"]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (_spm_metadata(**{gv.KEY_MODEL: "bert"}), "tokenizer.ggml.model 'bert' is not supported: WordPiece"),
        (_spm_metadata(**{gv.KEY_MODEL: "sentencepiece"}), "unsupported tokenizer.ggml.model 'sentencepiece'"),
        ({gv.KEY_MODEL: "llama"}, "no tokenizer.ggml.tokens"),
        ({gv.KEY_TOKENS: ["a"]}, "no tokenizer.ggml.model"),
        (_spm_metadata(**{gv.KEY_SCORES: [0.0]}), "tokenizer.ggml.scores has 1 entries"),
        (_spm_metadata(**{gv.KEY_TOKEN_TYPE: [1, 2]}), "tokenizer.ggml.token_type has 2 entries"),
        (_spm_metadata(**{gv.KEY_BOS: "1"}), "tokenizer.ggml.bos_token_id = '1'"),
        (_spm_metadata(**{gv.KEY_ADD_BOS: "yes"}), "tokenizer.ggml.add_bos_token must be a bool"),
        (_bpe_metadata(**{gv.KEY_TOKENS: ["a", "b", "ab", "Ġ", "Ġab", "ab"]}), "holds 'ab' twice (ids 2 and 5)"),
        (_bpe_metadata(**{gv.KEY_TOKENS: ["a", "b", "ab", "Ġ", "Ġab", 7]}), "tokenizer.ggml.tokens must hold strings"),
        (_bpe_metadata(**{gv.KEY_PRE: ["qwen2"]}), "unsupported tokenizer.ggml.pre ['qwen2']"),
        (_bpe_metadata(**{gv.KEY_PRE: "llama-9"}), "'llama-9' (supported: a.x-4.0, afmoe, bailingmoe"),
        (_bpe_metadata(**{gv.KEY_MERGES: ["ab"]}), "tokenizer.ggml.merges entry 'ab'"),
        (_bpe_metadata(**{gv.KEY_PRE: "llama-bpe"}), "add_bos_token is true (or defaults to true) but there is no"),
        ({k: v for k, v in _bpe_metadata().items() if k != gv.KEY_MERGES}, "no tokenizer.ggml.merges"),
    ],
)
def test_reading_errors(metadata, message):
    """Missing, inconsistent or unsupported keys raise TokenizerError naming the source and the key."""
    with pytest.raises(TokenizerError, match="^model.gguf: .*") as e:
        tokenizer_from_gguf(metadata, "model.gguf")
    assert message in str(e.value)


def test_unrecognised_pre_tokenizer_is_refused(tmp_path):
    """A byte-level tokenizer.json whose split regex llama.cpp does not know cannot become a GGUF vocabulary."""
    folder = _byte_level_folder(tmp_path, "qwen2")
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|\s+|."
    _write_json(folder / "tokenizer.json", data)
    with pytest.raises(TokenizerError, match="match none of llama.cpp's"):
        gguf_vocab_from_tokenizer(Tokenizer.from_hf_folder(folder))
    data["pre_tokenizer"] = {"type": "Whitespace"}
    _write_json(folder / "tokenizer.json", data)
    with pytest.raises(TokenizerError, match="has no llama.cpp equivalent"):
        gguf_vocab_from_tokenizer(Tokenizer.from_hf_folder(folder))


def _train_sp(tmp_path, **options) -> Tokenizer:
    (tmp_path / "corpus.txt").write_text("\n".join(_corpus(200)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"), vocab_size=60,
        hard_vocab_limit=False, minloglevel=2, **options,
    )
    return Tokenizer.from_hf_folder(tmp_path)


def test_sentencepiece_unigram_is_refused(tmp_path):
    """llama.cpp's SPM tokenizer merges by score like SentencePiece BPE; a unigram model would tokenize differently."""
    with pytest.raises(TokenizerError, match="this one is not BPE"):
        gguf_vocab_from_tokenizer(_train_sp(tmp_path, model_type="unigram"))


def test_sentencepiece_normalizer_llama_cpp_skips_is_exported_with_a_warning(tmp_path):
    """As convert_hf_to_gguf does (stories260K's tokenizer removes extra whitespace), but the user is told."""
    tokenizer = _train_sp(tmp_path, model_type="bpe", normalization_rule_name="nmt_nfkc")
    with pytest.warns(UserWarning, match=r"normalizer \('nmt_nfkc'"):
        vocab = gguf_vocab_from_tokenizer(tokenizer)
    assert vocab.model == "llama" and len(vocab.tokens) == tokenizer.vocab_size


def test_metadata_keys():
    """GGUFVocab.metadata() writes exactly the keys llama.cpp reads, leaving unset ids out."""
    vocab = GGUFVocab("gpt2", "qwen2", ["a"], None, [1], [], None, 0, None, None, False, None)
    assert vocab.metadata() == {
        gv.KEY_MODEL: "gpt2", gv.KEY_PRE: "qwen2", gv.KEY_TOKENS: ["a"], gv.KEY_TOKEN_TYPE: [1], gv.KEY_MERGES: [],
        gv.KEY_EOS: 0, gv.KEY_ADD_BOS: False,
    }


def test_out_of_range_special_ids_fall_back_like_llamacpp():
    """llama.cpp stores "none" as 4294967295 and replaces any id outside the vocabulary by its default."""
    tokenizer = tokenizer_from_gguf(
        _spm_metadata(**{gv.KEY_BOS: 999, gv.KEY_PAD: 4294967295, gv.KEY_EOT: 4294967295}), "test.gguf")
    assert tokenizer.bos_id == 1 and tokenizer.pad_id is None
    assert tokenizer.eos_ids[0] == 2


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_tiny_model_exported_to_gguf_tokenizes_like_its_hf_folder(tmp_path, pre):
    """A tiny HF model with a byte-level tokenizer.json, exported to GGUF: Engine.load gives the same ids both ways."""
    from conftest import make_hf_model

    from kilnlm.export.checkpoint import open_checkpoint
    from kilnlm.export.gguf import write_gguf
    from kilnlm.runtime.engine import Engine

    (tmp_path / "hf").mkdir()
    folder = _byte_level_folder(tmp_path / "hf", pre)
    arch = "qwen2" if pre == "qwen2" else "llama"
    make_hf_model(folder, arch, vocab_size=Tokenizer.from_hf_folder(folder).vocab_size, max_position_embeddings=64)
    write_gguf(open_checkpoint(folder), tmp_path / "m.gguf", "q8_0")
    from_gguf = Engine.load(tmp_path / "m.gguf", progress=False).tokenizer
    from_hf = Engine.load(folder, progress=False).tokenizer
    for text in _strings_with(BPE_VARIANTS[pre][3]):
        assert from_gguf.encode(text) == from_hf.encode(text), text
        ids = from_hf.encode(text)
        assert from_gguf.decode(ids) == from_hf.decode(ids), text


def test_gguf_token_bytes_spell_a_continuation():
    """Grammar masks: an SPM vocabulary's continuation has no space prefix; byte tokens are their byte."""
    tokenizer = tokenizer_from_gguf(_spm_metadata(), "spm")
    assert tokenizer.encode_continuation("a a") == [260, 261]
    table = tokenizer.token_bytes()
    assert b"".join(table[i] for i in tokenizer.encode_continuation("a a")) == b"a a"
    assert table[3 + 0x41] == b"A" and table[2] == b"\xff</s>"
    bpe = tokenizer_from_gguf(_bpe_metadata(), "bpe")
    assert bpe.token_bytes() == [b"a", b"b", b"ab", b" ", b" ab", b"\xff<|eot|>"]
