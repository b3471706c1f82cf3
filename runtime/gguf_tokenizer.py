"""The Tokenizer of a GGUF file, loading and tokenizing its vocabulary as llama.cpp does (src/llama-vocab.cpp).

Loading (`GGUFRules`): llama.cpp's default special ids per tokenizer model, ids outside the vocabulary treated as
absent, end-of-turn / end-of-message / fill-in-the-middle tokens found by their text and retyped CONTROL, the
end-of-generation set, and the per-model token attributes (Phi-3's right-stripping specials, gpt-oss's
always-rendered channel tokens).

Encoding (`GGUFBackend.encode`): control, user-defined and unknown tokens are cut out of the text first,
longest first, exactly as llama.cpp's tokenizer_st_partition does; each remaining fragment goes through the
vocabulary's model:
- "llama": SentencePiece BPE by piece score (tokenizer_models.SentencePieceBPE). A GGUF "llama" vocabulary is
  not a SentencePiece model: Phi-3's has several UNKNOWN-typed tokens, which sentencepiece refuses ("unk is
  already defined"), and llama.cpp merges into any token whatever its type. So the file is never turned back
  into a sentencepiece proto; llama.cpp's own merge rule runs instead.
- "gpt2" and "gemma4": BPE by merge rank after the pre-tokenizer named by `tokenizer.ggml.pre`
  (pretokenizers.py), run by the `tokenizers` library (Rust) for speed.
- "t5" (unigram), "rwkv" and "plamo2": tokenizer_models.py.
Decoding follows llama.cpp's token_to_piece; the first space of the output is dropped when the vocabulary
adds a space prefix, as sentencepiece and transformers do.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import tokenizers
from tokenizers import models, pre_tokenizers

from kilnlm.errors import TokenizerError
from kilnlm.runtime import tokenizer_models as tm
from kilnlm.runtime.gguf_vocab import GGUFVocab, TokenType, read_gguf_vocab
from kilnlm.runtime.pretokenizers import PreTokenizer, pre_tokenizer
from kilnlm.runtime.tokenizer import AddedToken, Tokenizer


@dataclass(frozen=True)
class _ModelRules:
    """What llama.cpp assumes for one `tokenizer.ggml.model` when the file does not say."""

    kind: str  # "spm", "bpe", "ugm", "rwkv", "plamo2"
    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    pad: int | None = None
    add_bos: bool | None = False  # None: the pre-tokenizer's default
    add_space_prefix: bool = False
    add_eos: bool = False
    default_pre: str | None = None  # BPE: the pre-tokenizer when tokenizer.ggml.pre is absent
    forced_pre: str | None = None  # BPE: the pre-tokenizer whatever tokenizer.ggml.pre says


_MODELS = {
    "llama": _ModelRules("spm", bos=1, eos=2, unk=0, add_bos=True, add_space_prefix=True),
    # llama.cpp defaults GPT-2 vocabularies to bos = eos = 11 (a Falcon leftover); a guess that names an
    # ordinary token is worse than none, so files without the keys get none here.
    "gpt2": _ModelRules("bpe", add_bos=None, default_pre="default"),
    "gemma4": _ModelRules("bpe", add_bos=None, forced_pre="gemma4"),
    "t5": _ModelRules("ugm", eos=1, unk=2, pad=0, add_space_prefix=True, add_eos=True),
    "rwkv": _ModelRules("rwkv"),
    "plamo2": _ModelRules("plamo2", bos=1, eos=2, unk=0, pad=3),
}
_REFUSED_MODELS = {
    "bert": "WordPiece vocabularies belong to BERT-style encoders, which kilnlm does not run",
    "hybriddna": "DNA k-mer vocabularies belong to genome models, which kilnlm does not run",
    "no_vocab": "the file carries no vocabulary",
    "none": "the file carries no vocabulary",
}

# Token texts llama.cpp recognises whatever the keys say (llama_vocab::impl::load); each is retyped CONTROL.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>", "<file_sep>", "<filename>"),
}
# llama.cpp's list also holds "</s>" (for one OCR model whose eos key names it anyway); it is left out here
# because Qwen2's vocabulary has "</s>" as an ordinary token that HTML text produces.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>",
})
# gpt-oss's channel tokens are CONTROL in its vocabulary but must be rendered: llama.cpp retypes them.
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")
_ASCII_SPACES = " \t\n\v\f\r"  # C's isspace, which llama.cpp strips around LSTRIP/RSTRIP tokens
_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
_KNOWN_TYPES = frozenset(int(t) for t in TokenType)


# --------------------------------------------------------------------------------------------- loading rules


@dataclass
class GGUFRules:
    """A GGUF vocabulary after llama.cpp's loading rules: effective types, special ids and token attributes."""

    types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eog_ids: list[int]  # every id that ends generation, eos first
    add_bos: bool
    add_space_prefix: bool
    lstrip: frozenset[int]
    rstrip: frozenset[int]


def _valid_id(value: int | None, n: int, default: int | None) -> int | None:
    """llama.cpp's rule: an id outside the vocabulary (4294967295 is its "none") means the default."""
    if value is not None and 0 <= value < n:
        return value
    return default if default is not None and default < n else None


def _ids_by_text(tokens: list[str], source: str) -> dict[str, int]:
    """Text -> id; llama.cpp refuses a vocabulary that holds a text twice, as a tokenizer could not choose."""
    ids: dict[str, int] = {}
    for i, text in enumerate(tokens):
        first = ids.setdefault(text, i)
        if first != i:
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens holds {text!r} twice (ids {first} and {i})")
    return ids


def load_rules(vocab: GGUFVocab, ids: Mapping[str, int], metadata: Mapping[str, Any], rules: _ModelRules,
               pre: PreTokenizer | None, source: str) -> GGUFRules:
    """Apply llama.cpp's loading rules to a vocabulary whose text -> id map is `ids`."""
    n = len(vocab.tokens)
    types = [t if t in _KNOWN_TYPES else TokenType.UNDEFINED for t in vocab.token_types]

    def found(texts: Iterable[str], stored: int | None = None) -> int | None:
        """The stored id if valid, else the first of `texts` in the vocabulary, which becomes CONTROL.

        (llama.cpp takes the first it meets in hash-map order; list order is the deterministic equivalent.)
        """
        token_id = _valid_id(stored, n, None)
        if token_id is None:
            token_id = next((ids[t] for t in texts if t in ids), None)
            if token_id is not None:
                types[token_id] = TokenType.CONTROL
        return token_id

    eot = found(_EOT_TEXTS, vocab.eot_id)
    eom = found(_EOM_TEXTS, vocab.eom_id)
    fim = {name: found(texts, vocab.other.get(f"tokenizer.ggml.{name}_token_id")) for name, texts in _FIM_TEXTS.items()}
    for text in _EOG_TEXTS & ids.keys():
        types[ids[text]] = TokenType.CONTROL
    for text in _ALWAYS_RENDERED:
        if text in ids:
            types[ids[text]] = TokenType.USER_DEFINED
    eos_id = _valid_id(vocab.eos_id, n, rules.eos)
    eog = {ids[t] for t in _EOG_TEXTS & ids.keys()} | {eos_id, eot, eom, fim["fim_pad"], fim["fim_rep"], fim["fim_sep"]}
    eog = _drop_shadowed_eog(eog - {None}, ids)
    bos_id = _valid_id(vocab.bos_id, n, rules.bos)
    add_bos = _add_bos(vocab, rules, pre, bos_id, source)
    lstrip, rstrip = _strip_attributes(metadata, vocab, types, ids)
    return GGUFRules(
        types=types, bos_id=bos_id, eos_id=eos_id, unk_id=_valid_id(vocab.unk_id, n, rules.unk),
        pad_id=_valid_id(vocab.pad_id, n, rules.pad), eog_ids=sorted(eog, key=lambda i: (i != eos_id, i)),
        add_bos=add_bos,
        add_space_prefix=rules.add_space_prefix if vocab.add_space_prefix is None else vocab.add_space_prefix,
        lstrip=lstrip, rstrip=rstrip,
    )


def _drop_shadowed_eog(eog: set[int], ids: Mapping[str, int]) -> set[int]:
    """llama.cpp's exceptions: gpt-oss's and Kimi-K2's <|end|> ends a message, not the generation."""
    def ends(text: str) -> bool:
        return text in ids and ids[text] in eog

    if ends("<|end|>") and ((ends("<|return|>") and ends("<|call|>")) or (ends("<|calls|>") and ends("<|flush|>"))):
        eog.discard(ids["<|end|>"])
    return eog


def _add_bos(vocab: GGUFVocab, rules: _ModelRules, pre: PreTokenizer | None, bos_id: int | None, source: str) -> bool:
    """tokenizer.ggml.add_bos_token, else the model's (or the pre-tokenizer's) default; BOS must then exist."""
    default = pre.add_bos if rules.add_bos is None and pre is not None else bool(rules.add_bos)
    add_bos = default if vocab.add_bos is None else vocab.add_bos
    add_bos |= pre is not None and pre.force_add_bos
    if add_bos and bos_id is None:
        raise TokenizerError(f"{source}: tokenizer.ggml.add_bos_token is true (or defaults to true) but there is no "
                             "tokenizer.ggml.bos_token_id in the vocabulary")
    return add_bos


def _strip_attributes(metadata: Mapping[str, Any], vocab: GGUFVocab, types: list[int],
                      ids: Mapping[str, int]) -> tuple[frozenset[int], frozenset[int]]:
    """Tokens that eat the whitespace before (lstrip) or after (rstrip) them, set by llama.cpp per model name."""
    name = str(metadata.get("general.name", "")).lower()
    arch = str(metadata.get("general.architecture", ""))
    lstrip: set[int] = set()
    rstrip: set[int] = set()
    if vocab.pre in ("jina-v2-de", "jina-v2-es", "jina-v2-code") or arch in ("nomic-bert-moe", "jina-bert-v3"):
        lstrip |= {ids["<mask>"]} if "<mask>" in ids else set()
    elif "phi-3" in name or "phi3" in name:
        rstrip = {i for i, t in enumerate(types) if t in _SPECIAL_TYPES}
        rstrip |= {ids["</s>"]} if "</s>" in ids else set()
        rstrip -= {ids[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in ids}
    return frozenset(lstrip), frozenset(rstrip)


# --------------------------------------------------------------------------------------------- backend


class GGUFBackend:
    """A GGUF vocabulary as a Tokenizer backend (see tokenizer._Backend)."""

    def __init__(self, vocab: GGUFVocab, metadata: Mapping[str, Any], source: str):
        model = vocab.model
        if model in _REFUSED_MODELS:
            raise TokenizerError(f"{source}: tokenizer.ggml.model {model!r} is not supported: {_REFUSED_MODELS[model]}")
        if model not in _MODELS:
            raise TokenizerError(f"{source}: unsupported tokenizer.ggml.model {model!r} "
                                 f"(supported: {', '.join(map(repr, _MODELS))})")
        self.source, self.gguf_vocab = source, vocab
        rules = _MODELS[model]
        self._kind = rules.kind
        # llama.cpp reads tokenizer.ggml.pre for BPE vocabularies only (and ignores it for Gemma 4's).
        pre_name = rules.forced_pre or vocab.pre or rules.default_pre
        self._pre = pre_tokenizer(pre_name, source) if rules.kind == "bpe" else None
        self._tokens = [text or f"[EMPTY_{i}]" for i, text in enumerate(vocab.tokens)]  # llama.cpp names empty ones
        self._ids = _ids_by_text(self._tokens, source)
        self.rules = load_rules(vocab, self._ids, metadata, rules, self._pre, source)
        self.vocab_size = len(self._tokens)
        types = self.rules.types
        self.added = {
            i: AddedToken(i, self._tokens[i], special=types[i] != TokenType.USER_DEFINED)
            for i in range(self.vocab_size) if types[i] in _SPECIAL_TYPES
        }
        # llama.cpp sorts its special tokens by length, longest first, and cuts them out in that order.
        self._specials = sorted(self.added, key=lambda i: len(self._tokens[i]), reverse=True)
        self._encode_fragment = self._fragment_encoder()
        self._piece = functools.lru_cache(maxsize=1 << 17)(self.piece_bytes)

    # ------------------------------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Ids of `text`: special tokens as single ids, each text fragment through the vocabulary's model."""
        return self._encode(text, at_start=True)

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` following earlier text: like encode, but no space prefix before the first fragment."""
        return self._encode(text, at_start=False)

    def _encode(self, text: str, at_start: bool) -> list[int]:
        ids: list[int] = []
        previous_special = at_start  # SPM puts its space prefix before the first fragment and after every token
        for fragment in self._partition(text):
            if isinstance(fragment, int):
                ids.append(fragment)
                previous_special = True
            elif fragment:
                ids += self._encode_fragment(fragment, previous_special)
                previous_special = False
        return ids

    def _partition(self, text: str) -> list[str | int]:
        """The text with every special token cut out (ids), longest token first, as tokenizer_st_partition."""
        fragments: list[str | int] = [text]
        for token_id in self._specials:
            token = self._tokens[token_id]
            if not any(isinstance(f, str) and token in f for f in fragments):
                continue
            cut: list[str | int] = []
            for fragment in fragments:
                cut += self._split_on(fragment, token, token_id) if isinstance(fragment, str) else [fragment]
            fragments = [f for f in cut if f != ""]
        return fragments

    def _split_on(self, fragment: str, token: str, token_id: int) -> list[str | int]:
        """`fragment` cut at each occurrence of one special token, stripping spaces beside LSTRIP/RSTRIP tokens."""
        pieces = fragment.split(token)
        out: list[str | int] = []
        for k, piece in enumerate(pieces):
            if k > 0 and token_id in self.rules.rstrip:
                piece = piece.lstrip(_ASCII_SPACES)
            if k < len(pieces) - 1 and token_id in self.rules.lstrip:
                piece = piece.rstrip(_ASCII_SPACES)
            out.append(piece)
            if k < len(pieces) - 1:
                out.append(token_id)
        return out

    def _fragment_encoder(self):
        """fragment, previous_was_special -> ids, for this vocabulary's model."""
        vocab, rules, tokens = self.gguf_vocab, self.rules, self._tokens
        scores = vocab.scores or [0.0] * len(tokens)
        if self._kind == "spm":
            fallback = tm.ByteFallback(self._ids, rules.unk_id, self.source)
            spm = tm.SentencePieceBPE(self._ids, scores, fallback)
            prefix = rules.add_space_prefix

            def encode_spm(fragment: str, previous_special: bool) -> list[int]:
                text = " " + fragment if prefix and previous_special else fragment
                return spm.encode(text.replace(" ", tm.SPACE_ESCAPE))
            return encode_spm
        if self._kind == "bpe":
            return _BPE(self._ids, vocab.merges, self._pre, self.source).encode
        if self._kind == "ugm":
            model = self._unigram(scores)
            return lambda fragment, _: model.encode(fragment)
        if self._kind == "rwkv":
            model = tm.GreedyBytes(tokens, rules.unk_id, self.source)
            return lambda fragment, _: model.encode(fragment)
        byte_ids = [i for i, t in enumerate(rules.types) if t == TokenType.BYTE]
        model = tm.Plamo2(tokens, scores, byte_ids, self.source)
        return lambda fragment, _: model.encode(fragment)

    def _unigram(self, scores: list[float]) -> tm.Unigram:
        """llama.cpp's UGM model: NORMAL, USER_DEFINED and UNUSED tokens are matchable."""
        types, vocab = self.rules.types, self.gguf_vocab

        def of(*kinds: TokenType) -> list[int]:
            return [i for i, t in enumerate(types) if t in kinds]

        options = {"escape_whitespaces": True, "add_space_prefix": self.rules.add_space_prefix,
                   "remove_extra_whitespaces": bool(vocab.remove_extra_whitespaces)}
        return tm.Unigram(self._tokens, scores, of(TokenType.NORMAL, TokenType.USER_DEFINED, TokenType.UNUSED),
                          set(of(TokenType.NORMAL)), set(of(TokenType.USER_DEFINED)), self.rules.unk_id,
                          vocab.precompiled_charsmap, options, self.source)

    # ------------------------------------------------------------------------------------------ decoding

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes one token renders as (llama.cpp's token_to_piece with special tokens rendered)."""
        text, kind = self._tokens[token_id], self.rules.types[token_id]
        if kind in _SPECIAL_TYPES:
            return text.encode()
        if kind == TokenType.BYTE and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            return bytes([int(text[3:5], 16)])
        if kind != TokenType.NORMAL:
            return b""  # UNUSED and undefined tokens render as nothing in llama.cpp
        if self._kind == "rwkv":
            return tm.unescape_rwkv(text)
        if self._kind == "bpe" and self._pre.byte_encode:
            return tm.unbyte(text)
        return text.replace(tm.SPACE_ESCAPE, " ").encode()

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (Tokenizer has already removed the special ids to skip)."""
        self._check(ids)
        data = b"".join(map(self._piece, ids))
        if self.rules.add_space_prefix and ids and self.rules.types[ids[0]] == TokenType.NORMAL:
            data = data.removeprefix(b" ")  # the space prefix encoding added
        return data.decode("utf-8", "replace")

    def _check(self, ids: Iterable[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"{self.source}: token id {bad[0]} is not in the vocabulary")

    def id_to_piece(self, token_id: int) -> str:
        """The token's text as the file stores it."""
        self._check([token_id])
        return self._tokens[token_id]

    def token_to_id(self, piece: str) -> int | None:
        """The id of a token text, or None."""
        return self._ids.get(piece)


# --------------------------------------------------------------------------------------------- byte-pair encoding


class _BPE:
    """llama.cpp's BPE session on the `tokenizers` library: the pre-tokenizer's regexes, then merges by rank."""

    def __init__(self, ids: Mapping[str, int], merges: list[str] | None, pre: PreTokenizer, source: str):
        if merges is None:
            raise TokenizerError(f"{source}: GGUF metadata has no tokenizer.ggml.merges (BPE vocabularies need them)")
        self._pre, self._ids = pre, ids
        pairs = _merge_pairs(merges, source)
        try:
            model = self._model(ids, pairs, pre)
        except Exception:  # the Rust side raises plain Exception; retry without the unusable merges
            # A merge whose parts or result are not tokens can never fire in llama.cpp (it looks the result
            # up); `tokenizers` refuses the whole list, so such merges are dropped.
            model = self._model(ids, [p for p in pairs if p[0] in ids and p[1] in ids and p[0] + p[1] in ids], pre)
        self._tok = tokenizers.Tokenizer(model)
        splits = [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in pre.regexes]
        if pre.byte_encode:
            splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
        self._tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
        self._newline_runs = re.compile(r"(\n+)") if pre.whole_newline_runs else None

    @staticmethod
    def _model(ids: Mapping[str, int], pairs: list[tuple[str, str]], pre: PreTokenizer) -> models.BPE:
        # Without GPT-2's byte map, characters the vocabulary lacks are spelt in <0xXX> tokens.
        return models.BPE(dict(ids), pairs, ignore_merges=pre.ignore_merges, byte_fallback=not pre.byte_encode)

    def encode(self, fragment: str, _previous_special: bool = False) -> list[int]:
        """Ids of one text fragment."""
        if self._pre.escape_whitespace:
            fragment = fragment.replace(" ", tm.SPACE_ESCAPE)
        if self._newline_runs is None:
            return self._tok.encode(fragment, add_special_tokens=False).ids
        ids: list[int] = []
        for k, part in enumerate(self._newline_runs.split(fragment)):
            if k % 2 and part in self._ids:  # Gemma 4 keeps a run of newlines whole when it is a token
                ids.append(self._ids[part])
            elif part:
                ids += self._tok.encode(part, add_special_tokens=False).ids
        return ids


def _merge_pairs(merges: list[str], source: str) -> list[tuple[str, str]]:
    """Merges as pairs, split at the first space after the first character (llama.cpp's rule)."""
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)
        if cut < 0:
            raise TokenizerError(f"{source}: tokenizer.ggml.merges entry {merge!r} is not two tokens separated by a "
                                 "space")
        pairs.append((merge[:cut], merge[cut + 1 :]))
    return pairs


# --------------------------------------------------------------------------------------------- entry point


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str) -> Tokenizer:
    """The Tokenizer of a GGUF file's metadata (plain Python values), tokenizing as llama.cpp does."""
    vocab = read_gguf_vocab(metadata, source)
    backend = GGUFBackend(vocab, metadata, source)
    rules = backend.rules
    return Tokenizer(backend, bos_id=rules.bos_id, eos_ids=rules.eog_ids, pad_id=rules.pad_id, add_bos=rules.add_bos,
                     chat_template=vocab.chat_template)
