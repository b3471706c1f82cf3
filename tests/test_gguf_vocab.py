"""GGUF tokenizer metadata <-> Tokenizer: parity with llama.cpp's own tokenizer tests, and round trips.

The parity tests use the vocab-only GGUF files and test cases llama.cpp ships (../shared, skipped when absent).
The round-trip tests train tiny tokenizers here: a SentencePiece BPE model and byte-level BPE tokenizer.json files
with Llama-3's, Qwen2's and GPT-2's pre-tokenizers.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from kilnlm.errors import TokenizerError
from kilnlm.export.gguf_file import GGUFFile
from kilnlm.runtime import gguf_vocab as gv
from kilnlm.runtime.gguf_vocab import GGUFVocab, gguf_vocab_from_tokenizer, tokenizer_from_gguf
from kilnlm.runtime.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
VOCABS = SHARED / "llama.cpp-vocab"
VOCAB_NAMES = ["llama-spm", "llama-bpe", "qwen2"]

# The pre-tokenizer regexes as Meta's and Qwen's tokenizer.json files spell them.
_HF_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_HF_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_HF = _HF_HEAD + r"\p{N}{1,3}" + _HF_TAIL
QWEN2_HF = _HF_HEAD + r"\p{N}" + _HF_TAIL

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
def test_llama_cpp_parity(name):
    """Every expected id sequence of llama.cpp's tokenizer test for this vocab is reproduced."""
    tokenizer = _vocab_tokenizer(name)
    cases = _llama_cpp_cases(name)
    wrong = [(text, ids, tokenizer.encode(text, add_bos=False)) for text, ids in cases]
    wrong = [w for w in wrong if w[1] != w[2]]
    assert not wrong, f"{len(wrong)}/{len(cases)} lines differ, first: {wrong[0]}"


@pytest.mark.parametrize(
    ("name", "add_bos", "bos", "eos_ids"),
    [
        ("llama-spm", True, 1, (2,)),
        ("llama-bpe", True, 128000, (128001, 128009)),  # llama.cpp's add_bos default for llama-bpe; <|eot_id|>
        ("qwen2", False, 151643, (151643, 151645)),  # <|im_end|> ends generation
    ],
)
def test_special_tokens_of_real_vocabs(name, add_bos, bos, eos_ids):
    """BOS, add_bos and the end-of-generation ids follow llama.cpp's rules."""
    tokenizer = _vocab_tokenizer(name)
    assert (tokenizer.add_bos, tokenizer.bos_id, tokenizer.eos_ids) == (add_bos, bos, eos_ids)
    assert tokenizer.encode("Hello", add_bos=True)[0] == bos


@pytest.mark.parametrize("name", VOCAB_NAMES)
def test_real_vocab_round_trip(name):
    """GGUF metadata -> Tokenizer -> GGUFVocab gives back the file's tokens, types, scores and merges."""
    metadata = _vocab_metadata(name)
    vocab = gguf_vocab_from_tokenizer(_vocab_tokenizer(name))
    assert vocab.model == metadata[gv.KEY_MODEL]
    assert vocab.tokens == metadata[gv.KEY_TOKENS]
    assert vocab.token_types == metadata[gv.KEY_TOKEN_TYPE]
    assert vocab.scores == metadata.get(gv.KEY_SCORES)
    assert vocab.merges == metadata.get(gv.KEY_MERGES)
    assert vocab.pre == (None if vocab.model == "llama" else metadata[gv.KEY_PRE])
    ids = (vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.unk_id)
    assert ids == tuple(metadata.get(k) for k in (gv.KEY_BOS, gv.KEY_EOS, gv.KEY_PAD, gv.KEY_UNK))


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


BPE_VARIANTS = {
    # name: (regex of a Split step or None for GPT-2's ByteLevel regex, ignore_merges, specials, tokenizer_config)
    "llama-bpe": (LLAMA3_HF, True, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                  {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True}),
    "qwen2": (QWEN2_HF, False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "gpt-2": (None, False, ["<|endoftext|>"], {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}),
}


def _byte_level_folder(folder: Path, pre: str) -> Path:
    """A byte-level BPE HF folder trained here with the given llama.cpp pre-tokenizer's regex."""
    regex, ignore_merges, specials, config = BPE_VARIANTS[pre]
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    split = [pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated")] if regex else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*split, byte_level])
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
    assert (vocab.model, vocab.pre, len(vocab.tokens)) == ("llama", None, 402)
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
    specials = BPE_VARIANTS[pre][2]
    assert (vocab.model, vocab.pre, vocab.scores) == ("gpt2", pre, None)
    assert [vocab.token_types[original.token_to_id(s)] for s in specials] == [3] * len(specials)
    assert vocab.token_types[original.token_to_id("<tool>")] == 4
    assert vocab.merges and all(len(m.split(" ")) == 2 for m in vocab.merges)
    restored = tokenizer_from_gguf(vocab.metadata(), "round trip")
    _assert_same_tokenizer(original, restored, _strings_with(specials))


# --------------------------------------------------------------------------------------------- protobuf codec


def test_model_proto_matches_protobuf():
    """The hand-written ModelProto encoder/decoder agree with protobuf's own generated code."""
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = ["<unk>", "<s>", "<0x41>", "▁a", "é"], [0.0, 0.0, 0.0, -1.5, -1e9], [2, 3, 6, 1, 4]
    proto = pb.ModelProto.FromString(gv._spm_model_proto(tokens, scores, types, add_dummy_prefix=False))
    assert [(p.piece, p.score, p.type) for p in proto.pieces] == list(zip(tokens, scores, types))
    assert (proto.trainer_spec.model_type, proto.trainer_spec.byte_fallback) == (pb.TrainerSpec.BPE, True)
    norm = proto.normalizer_spec
    assert (norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces) == (
        "identity", False, False, True)
    proto.trainer_spec.unk_id = -1  # a negative int32: ten varint bytes the decoder must skip
    parsed = gv._parse_spm_model(proto.SerializeToString())
    assert (parsed.tokens, parsed.scores, parsed.types) == (tokens, scores, types)
    assert (parsed.model_type, parsed.normalizer, parsed.add_dummy_prefix) == (2, "identity", False)


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


@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "llama3", "llama-v3", "qwen2", "deepseek-r1-qwen", None])
def test_every_supported_pre_tokenizer_builds(pre):
    """Each supported tokenizer.ggml.pre (None: key absent, llama.cpp's 'default') gives a working tokenizer."""
    metadata = _bpe_metadata(**{gv.KEY_PRE: pre, gv.KEY_ADD_BOS: False})
    if pre is None:
        del metadata[gv.KEY_PRE]
    tokenizer = tokenizer_from_gguf(metadata, "bpe")
    assert tokenizer.encode("ab ab<|eot|>", add_bos=False) == [2, 4, 5]
    assert gguf_vocab_from_tokenizer(tokenizer).pre == ("default" if pre is None else gv._PRE_ALIASES.get(pre, pre))


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (_spm_metadata(**{gv.KEY_MODEL: "t5"}), "unsupported tokenizer.ggml.model 't5'"),
        ({gv.KEY_MODEL: "llama"}, "no tokenizer.ggml.tokens"),
        ({gv.KEY_TOKENS: ["a"]}, "no tokenizer.ggml.model"),
        (_spm_metadata(**{gv.KEY_SCORES: [0.0]}), "tokenizer.ggml.scores has 1 entries"),
        (_spm_metadata(**{gv.KEY_TOKEN_TYPE: [1, 2]}), "tokenizer.ggml.token_type has 2 entries"),
        (_spm_metadata(**{gv.KEY_BOS: "1"}), "tokenizer.ggml.bos_token_id = '1'"),
        (_spm_metadata(**{gv.KEY_ADD_BOS: "yes"}), "tokenizer.ggml.add_bos_token must be a bool"),
        (_bpe_metadata(**{gv.KEY_TOKENS: ["a", "a", "ab", "Ġ", "Ġab", "x"]}), "duplicate tokens"),
        (_bpe_metadata(**{gv.KEY_TOKENS: ["a", "b", "ab", "Ġ", "Ġab", 7]}), "tokenizer.ggml.tokens must hold strings"),
        (_bpe_metadata(**{gv.KEY_PRE: ["qwen2"]}), "unsupported tokenizer.ggml.pre ['qwen2']"),
        (_bpe_metadata(**{gv.KEY_PRE: "falcon"}), "'falcon' (supported: deepseek-r1-qwen, default, gpt-2, llama-bpe"),
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
    with pytest.raises(TokenizerError, match="match none llama.cpp knows"):
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
    tokenizer = gv.tokenizer_from_gguf(
        _spm_metadata(**{gv.KEY_BOS: 999, gv.KEY_PAD: 4294967295, gv.KEY_EOT: 4294967295}), "test.gguf")
    assert tokenizer.bos_id == 1 and tokenizer.pad_id is None
    assert tokenizer.eos_ids[0] == 2
