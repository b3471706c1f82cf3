"""The GGUF tokenizer models beside byte-pair encoding: SPM edge cases, unigram (t5), RWKV and PLaMo-2.

The unigram model is checked against sentencepiece on a model trained here; SPM vocabularies that sentencepiece
refuses (Phi-3's) against hand-worked ids; RWKV's greedy matcher and PLaMo-2's cost minimisation against
small vocabularies whose answers can be worked out by hand.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import sentencepiece as spm

from kilnlm.errors import TokenizerError
from kilnlm.runtime import gguf_vocab as gv
from kilnlm.runtime.gguf_tokenizer import tokenizer_from_gguf

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


# --------------------------------------------------------------------------------------------- SPM ("llama")


def _phi3_metadata() -> dict[str, Any]:
    """A Phi-3-like SentencePiece vocabulary: two UNKNOWN-typed tokens and chat tokens that eat the newline after."""
    tokens = ["<unk>", "<s>", "</s>", *BYTE_TOKENS, "▁", "H", "i", "▁H", "▁Hi", "<|endoftext|>", "<|user|>", "<|end|>",
              "<|placeholder1|>"]
    types = [2, 3, 3, *[6] * 256, 1, 1, 1, 1, 1, 3, 3, 3, 2]
    scores = [0.0] * 259 + [-5.0, -6.0, -7.0, -2.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    return {gv.KEY_MODEL: "llama", gv.KEY_TOKENS: tokens, gv.KEY_SCORES: scores, gv.KEY_TOKEN_TYPE: types,
            gv.KEY_BOS: 1, gv.KEY_EOS: 2, gv.KEY_UNK: 0, "general.name": "Phi-3-mini-4k-instruct"}


def test_spm_vocabulary_sentencepiece_refuses_loads_like_llama_cpp():
    """Phi-3's vocabulary types two tokens UNKNOWN; llama.cpp (and kilnlm) load it, sentencepiece does not."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    metadata = _phi3_metadata()
    proto = pb.ModelProto()
    for text, score, kind in zip(metadata[gv.KEY_TOKENS], metadata[gv.KEY_SCORES], metadata[gv.KEY_TOKEN_TYPE]):
        proto.pieces.add(piece=text, score=score, type=kind)
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    with pytest.raises(RuntimeError, match="unk is already defined"):
        spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    tokenizer = tokenizer_from_gguf(metadata, "phi3.gguf")
    ids = {t: i for i, t in enumerate(metadata[gv.KEY_TOKENS])}
    # Phi-3's specials strip the whitespace after them (llama.cpp sets RSTRIP by model name); the text after a
    # special gets the space prefix, as llama.cpp's SPM path does.
    assert tokenizer.encode("<|user|>\nHi<|end|>\n", add_bos=True) == [1, ids["<|user|>"], ids["▁Hi"], ids["<|end|>"]]
    assert tokenizer.encode("Hi <|endoftext|> Hi", add_bos=False) == [
        ids["▁Hi"], ids["▁"], ids["<|endoftext|>"], ids["▁"], ids["▁Hi"]]  # <|endoftext|> keeps its spaces
    assert tokenizer.encode("é", add_bos=False) == [ids["▁"], ids["<0xC3>"], ids["<0xA9>"]]
    assert tokenizer.eos_ids == (2, ids["<|endoftext|>"], ids["<|end|>"])
    assert tokenizer.decode([ids["▁Hi"], ids["<0xC3>"], ids["<0xA9>"], ids["<|end|>"]], skip_special=False) == "Hié<|end|>"


def test_spm_without_byte_tokens_falls_back_to_unk():
    """Characters no token spells become <unk>, as llama.cpp does when a vocabulary has no <0xXX> pieces."""
    metadata = {gv.KEY_MODEL: "llama", gv.KEY_TOKENS: ["<unk>", "<s>", "</s>", "▁", "a"],
                gv.KEY_SCORES: [0.0, 0.0, 0.0, -1.0, -2.0], gv.KEY_TOKEN_TYPE: [2, 3, 3, 1, 1]}
    assert tokenizer_from_gguf(metadata, "spm").encode("a€a", add_bos=False) == [3, 4, 0, 0, 0, 4]


# --------------------------------------------------------------------------------------------- unigram ("t5")


def _corpus() -> list[str]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "I'm", "café", "naïve",
             "ｆｕｌｌ", "①", "ﬁne", "日本", "語", "42"]
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(400)]


@pytest.fixture(scope="module")
def unigram_model(tmp_path_factory):
    """A sentencepiece unigram model with the default NFKC normaliser, and the GGUF 't5' keys built from it."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    folder = tmp_path_factory.mktemp("unigram")
    (folder / "corpus.txt").write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "m"), vocab_size=120, hard_vocab_limit=False,
                                   model_type="unigram", user_defined_symbols=["<extra_id_0>"], minloglevel=2)
    proto = pb.ModelProto.FromString((folder / "m.model").read_bytes())
    metadata = {
        gv.KEY_MODEL: "t5", gv.KEY_TOKENS: [p.piece for p in proto.pieces], gv.KEY_SCORES: [p.score for p in proto.pieces],
        gv.KEY_TOKEN_TYPE: [p.type for p in proto.pieces], gv.KEY_UNK: proto.trainer_spec.unk_id,
        gv.KEY_EOS: proto.trainer_spec.eos_id, gv.KEY_ADD_SPACE_PREFIX: True, gv.KEY_REMOVE_EXTRA_WS: True,
        gv.KEY_CHARSMAP: list(proto.normalizer_spec.precompiled_charsmap),
    }
    return spm.SentencePieceProcessor(model_file=str(folder / "m.model")), metadata


@pytest.mark.parametrize("text", [
    "the quick brown fox", "  extra   spaces  here ", "ｆｕｌｌ width and ① and ﬁne", "unseen Ωmega ✓", "日本語 42",
    "", "x",
])
def test_unigram_matches_sentencepiece(unigram_model, text):
    """llama.cpp's UGM path (charsmap normalisation, Viterbi, merged unknowns) gives sentencepiece's ids."""
    sp, metadata = unigram_model
    tokenizer = tokenizer_from_gguf(metadata, "t5.gguf")
    assert tokenizer.encode(text, add_bos=False) == sp.encode(text)


def test_unigram_user_defined_tokens_are_cut_out_first(unigram_model):
    """Unlike sentencepiece, llama.cpp cuts user-defined tokens out before normalising, so no "▁" precedes one."""
    sp, metadata = unigram_model
    tokenizer = tokenizer_from_gguf(metadata, "t5.gguf")
    text = "I'm <extra_id_0> café"
    ids = [*sp.encode("I'm"), sp.piece_to_id("<extra_id_0>"), *sp.encode(" café")]
    assert tokenizer.encode(text, add_bos=False) == ids
    assert sp.encode(text) == [*sp.encode("I'm"), sp.piece_to_id("▁"), *ids[-len(sp.encode(" café")) - 1 :]]


def test_unigram_charsmap_is_checked(unigram_model):
    _, metadata = unigram_model
    with pytest.raises(TokenizerError, match="t5.gguf: tokenizer.ggml.precompiled_charsmap"):
        tokenizer_from_gguf({**metadata, gv.KEY_CHARSMAP: [1, 2, 3]}, "t5.gguf")


# --------------------------------------------------------------------------------------------- RWKV and PLaMo-2


def test_rwkv_takes_the_longest_byte_match():
    """RWKV tokens are escaped byte strings; at each position the longest one that matches wins."""
    tokens = ["<unk>", "a", "ab", "abc", "b", "c", "\\n", "\\xc3\\xa9", "\\x20", "\\\\"]
    tokenizer = tokenizer_from_gguf({gv.KEY_MODEL: "rwkv", gv.KEY_TOKENS: tokens, gv.KEY_UNK: 0}, "rwkv.gguf")
    assert tokenizer.encode("abcab\n é\\", add_bos=False) == [3, 2, 6, 8, 7, 9]
    assert tokenizer.decode([3, 2, 6, 8, 7, 9]) == "abcab\n é\\"
    with pytest.raises(TokenizerError, match="no token matches byte 0x7A"):
        tokenizer_from_gguf({gv.KEY_MODEL: "rwkv", gv.KEY_TOKENS: tokens[1:]}, "rwkv.gguf").encode("z")


def test_plamo2_picks_the_lowest_total_cost():
    """Cost -round(score * 1e4) per token; unknown characters are spelt in byte tokens."""
    tokens = ["<unk>", "<s>", "</s>", "<pad>", *BYTE_TOKENS, "a", "b", "ab", "abb", "bb"]
    scores = [0.0] * 260 + [-1.0, -1.0, -1.5, -4.0, -1.2]
    types = [2, 3, 3, 3, *[6] * 256, 1, 1, 1, 1, 1]
    tokenizer = tokenizer_from_gguf({gv.KEY_MODEL: "plamo2", gv.KEY_TOKENS: tokens, gv.KEY_SCORES: scores,
                                     gv.KEY_TOKEN_TYPE: types}, "plamo2.gguf")
    ids = {t: i for i, t in enumerate(tokens)}
    # "abb": ab + b costs 25000, a + bb 22000, abb 40000.
    assert tokenizer.encode("\ufeffabbé", add_bos=False) == [ids["a"], ids["bb"], ids["<0xC3>"], ids["<0xA9>"]]
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_ids) == (1, 3, (2,))
