"""GGUF tokenizer metadata (`tokenizer.ggml.*`) <-> Tokenizer, tokenizing as llama.cpp does.

Reading: `tokenizer_from_gguf` turns the metadata of a GGUF file into a Tokenizer.
- "llama" (SentencePiece): a SentencePiece ModelProto is rebuilt from tokens/scores/types (a BPE model merging by
  piece score, byte fallback, Llama's normalizer: no normalization, a dummy prefix, spaces escaped as "▁") and
  loaded with prefix_after_special=True, since llama.cpp puts the dummy prefix before every text chunk that
  follows a special token. User-defined tokens are matched as whole strings before sentencepiece sees the text.
- "gpt2" (byte-level BPE): a tokenizer.json is built whose pre-tokenizer runs the regexes llama.cpp runs for
  `tokenizer.ggml.pre` (see _PRE_TOKENIZERS) followed by the byte-to-unicode mapping.

Writing: `gguf_vocab_from_tokenizer` gives the GGUF vocabulary of a Tokenizer the way llama.cpp's
convert_hf_to_gguf.py builds it; `GGUFVocab.metadata()` gives the keys to write.

The SentencePiece ModelProto is (de)serialized by the small protobuf wire-format codec below, so the runtime does
not need the protobuf package.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from kilnlm.errors import TokenizerError
from kilnlm.runtime.tokenizer import AddedToken, Tokenizer

KEY_MODEL = "tokenizer.ggml.model"
KEY_PRE = "tokenizer.ggml.pre"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_SCORES = "tokenizer.ggml.scores"
KEY_TOKEN_TYPE = "tokenizer.ggml.token_type"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_BOS = "tokenizer.ggml.bos_token_id"
KEY_EOS = "tokenizer.ggml.eos_token_id"
KEY_EOT = "tokenizer.ggml.eot_token_id"
KEY_EOM = "tokenizer.ggml.eom_token_id"
KEY_PAD = "tokenizer.ggml.padding_token_id"
KEY_UNK = "tokenizer.ggml.unknown_token_id"
KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
KEY_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"


class TokenType(IntEnum):
    """llama.cpp's token types; SentencePiece's ModelProto.SentencePiece.Type uses the same numbers."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Texts llama.cpp treats as end of generation whatever the eos key says (llama-vocab.cpp, special_eog_ids); its
# "</s>" entry (added for one OCR model) is left out: Qwen2's vocabulary has an ordinary token "</s>".
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<|end_of_text|>", "<EOT>",
})


# --------------------------------------------------------------------------------------------- pre-tokenizers

_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_CONTRACTIONS_HF = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


@dataclass(frozen=True)
class _PreTokenizer:
    """The regexes llama.cpp applies in turn for one `tokenizer.ggml.pre`, and the flags that pre type sets."""

    regexes: tuple[str, ...]  # what we run; llama.cpp's form
    other_forms: tuple[tuple[str, ...], ...] = ()  # equivalent spellings (tokenizer.json files), for detection
    ignore_merges: bool = False  # a pre-split word that is itself a token is emitted whole
    add_bos: bool = False  # llama.cpp's add_bos default for this pre type


_PRE_TOKENIZERS = {
    # llama.cpp spells the case-insensitive contractions as classes; HF's "(?i:...)" also folds e.g. "ſ" to "s".
    "llama-bpe": _PreTokenizer(
        (_CONTRACTIONS_CI + _LLAMA3_TAIL,), ((_CONTRACTIONS_HF + _LLAMA3_TAIL,),), ignore_merges=True, add_bos=True
    ),
    "qwen2": _PreTokenizer((_CONTRACTIONS_CI + _QWEN2_TAIL,), ((_CONTRACTIONS_HF + _QWEN2_TAIL,),)),
    # llama.cpp's custom GPT-2 splitter also implements the "|\s+" that its regex string omits.
    "gpt-2": _PreTokenizer((_GPT2 + r"|\s+",), ((_GPT2,),)),
    # llama.cpp's fallback (and what it assumes when the key is missing): four regexes applied in turn.
    "default": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
}
_PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "deepseek-r1-qwen": "qwen2"}


def _pre_tokenizer(name: str, source: str) -> _PreTokenizer:
    """The pre-tokenizer for a `tokenizer.ggml.pre` value, raising TokenizerError for unsupported ones."""
    pre = _PRE_TOKENIZERS.get(_PRE_ALIASES.get(name, name)) if isinstance(name, str) else None
    if pre is None:
        supported = ", ".join(sorted([*_PRE_TOKENIZERS, *_PRE_ALIASES]))
        raise TokenizerError(f"{source}: unsupported {KEY_PRE} {name!r} (supported: {supported})")
    return pre


# --------------------------------------------------------------------------------------------- protobuf wire format


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint; negative ints take ten bytes (two's complement), as protobuf writes int32."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    """A varint field (int32, bool, enum)."""
    return _varint(field << 3) + _varint(value)


def _pb_bytes(field: int, data: bytes) -> bytes:
    """A length-delimited field (string, bytes, sub-message)."""
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _pb_float(field: int, value: float) -> bytes:
    """A 32-bit float field."""
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at `pos`; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise TokenizerError("truncated SentencePiece model (varint runs past the end)")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _pb_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of a serialized message: ints for varints, raw bytes for everything else."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire in (1, 2, 5):
            size, pos = (8, pos) if wire == 1 else (4, pos) if wire == 5 else _read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise TokenizerError(f"SentencePiece model uses unsupported protobuf wire type {wire}")
        yield key >> 3, value


# SentencePiece's sentencepiece_model.proto field numbers.
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_BYTE_FALLBACK = 3, 35
_NORM_NAME, _NORM_CHARSMAP, _NORM_DUMMY_PREFIX, _NORM_REMOVE_EXTRA_WS, _NORM_ESCAPE_WS = 1, 2, 3, 4, 5
_SPM_BPE = 2


def _spm_model_proto(tokens: list[str], scores: list[float], types: list[int], add_dummy_prefix: bool) -> bytes:
    """A serialized SentencePiece BPE ModelProto with Llama's normalizer."""
    pieces = b"".join(
        _pb_bytes(_MODEL_PIECES, _pb_bytes(_PIECE_TEXT, text.encode()) + _pb_float(_PIECE_SCORE, score)
                  + _pb_int(_PIECE_TYPE, kind))
        for text, score, kind in zip(tokens, scores, types)
    )
    byte_fallback = TokenType.BYTE in types
    trainer = _pb_int(_TRAINER_MODEL_TYPE, _SPM_BPE) + _pb_int(_TRAINER_BYTE_FALLBACK, byte_fallback)
    normalizer = (
        _pb_bytes(_NORM_NAME, b"identity") + _pb_int(_NORM_DUMMY_PREFIX, add_dummy_prefix)
        + _pb_int(_NORM_REMOVE_EXTRA_WS, False) + _pb_int(_NORM_ESCAPE_WS, True)
    )
    return pieces + _pb_bytes(_MODEL_TRAINER, trainer) + _pb_bytes(_MODEL_NORMALIZER, normalizer)


@dataclass
class _SpmModel:
    """The parts of a SentencePiece ModelProto a GGUF vocabulary needs (proto2 defaults where a field is absent)."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = 1  # UNIGRAM
    normalizer: str = ""
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _parse_spm_model(proto: bytes) -> _SpmModel:
    """Decode the pieces, model type and normalizer of a serialized SentencePiece ModelProto."""
    model = _SpmModel([], [], [])
    for field, value in _pb_fields(proto):
        if field == _MODEL_PIECES:
            piece = dict(_pb_fields(value))
            model.tokens.append(piece.get(_PIECE_TEXT, b"").decode())
            model.scores.append(struct.unpack("<f", piece[_PIECE_SCORE])[0] if _PIECE_SCORE in piece else 0.0)
            model.types.append(piece.get(_PIECE_TYPE, TokenType.NORMAL))
        elif field == _MODEL_TRAINER:
            model.model_type = dict(_pb_fields(value)).get(_TRAINER_MODEL_TYPE, model.model_type)
        elif field == _MODEL_NORMALIZER:
            spec = dict(_pb_fields(value))  # protobuf merges repeated sub-messages: the last value of a field wins
            model.normalizer = spec.get(_NORM_NAME, model.normalizer.encode()).decode()
            model.charsmap = spec.get(_NORM_CHARSMAP, model.charsmap)
            model.add_dummy_prefix = bool(spec.get(_NORM_DUMMY_PREFIX, model.add_dummy_prefix))
            model.remove_extra_whitespaces = bool(spec.get(_NORM_REMOVE_EXTRA_WS, model.remove_extra_whitespaces))
            model.escape_whitespaces = bool(spec.get(_NORM_ESCAPE_WS, model.escape_whitespaces))
    return model


# --------------------------------------------------------------------------------------------- reading


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str) -> Tokenizer:
    """Build the Tokenizer described by a GGUF file's `tokenizer.*` metadata (plain Python values)."""
    model = _require(metadata, KEY_MODEL, str, source)
    tokens = _require(metadata, KEY_TOKENS, list, source)
    types = _optional_list(metadata, KEY_TOKEN_TYPE, len(tokens), source) or [TokenType.NORMAL] * len(tokens)
    if not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{source}: {KEY_TOKENS} must hold strings")
    if len(set(tokens)) != len(tokens):
        raise TokenizerError(f"{source}: {KEY_TOKENS} holds duplicate tokens")
    if model == "llama":
        return _spm_tokenizer(metadata, tokens, types, source)
    if model == "gpt2":
        return _bpe_tokenizer(metadata, tokens, types, source)
    raise TokenizerError(f"{source}: unsupported {KEY_MODEL} {model!r} (supported: 'llama', 'gpt2')")


def _require(metadata: Mapping[str, Any], key: str, kind: type, source: str) -> Any:
    """metadata[key], raising TokenizerError when it is missing or not of `kind`."""
    if key not in metadata:
        raise TokenizerError(f"{source}: GGUF metadata has no {key}")
    value = metadata[key]
    if not isinstance(value, kind):
        raise TokenizerError(f"{source}: {key} must be a {kind.__name__}, found {type(value).__name__}")
    return value


def _optional_list(metadata: Mapping[str, Any], key: str, n_tokens: int, source: str) -> list | None:
    """A per-token list (scores, token types), None when absent, checked to hold one entry per token."""
    if key not in metadata:
        return None
    values = _require(metadata, key, list, source)
    if len(values) != n_tokens:
        raise TokenizerError(f"{source}: {key} has {len(values)} entries but {KEY_TOKENS} has {n_tokens}")
    return values


def _token_id(metadata: Mapping[str, Any], key: str, n: int, source: str, default: int | None = None) -> int | None:
    """A special-token id key, checked against the vocabulary; `default` (if in the vocabulary) when absent."""
    if key not in metadata:
        return default if default is not None and default < n else None
    value = metadata[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TokenizerError(f"{source}: {key} = {value!r} is not a token id")
    if not 0 <= value < n:
        # llama.cpp writes -1 as uint32 (4294967295) for "none" and falls back to the default on any id
        # outside the vocabulary; do the same so its files load.
        return default if default is not None and default < n else None
    return value


def _add_bos(metadata: Mapping[str, Any], default: bool, source: str) -> bool:
    """tokenizer.ggml.add_bos_token, `default` when absent."""
    value = metadata.get(KEY_ADD_BOS, default)
    if not isinstance(value, bool):
        raise TokenizerError(f"{source}: {KEY_ADD_BOS} must be a bool, found {value!r}")
    return value


def _special_kwargs(
    metadata: Mapping[str, Any], tokens: list[str], add_bos: bool, source: str, bos: int | None, eos: int | None
) -> dict[str, Any]:
    """bos/eos/pad/add_bos/chat_template arguments; eos_ids lists every token llama.cpp stops on, eos first."""
    n = len(tokens)
    _token_id(metadata, KEY_UNK, n, source)  # validated only: the model's UNKNOWN-type token is what encoding uses
    eos_id = _token_id(metadata, KEY_EOS, n, source, eos)
    eog = [_token_id(metadata, KEY_EOT, n, source), _token_id(metadata, KEY_EOM, n, source)]
    eog += [i for i, t in enumerate(tokens) if t in _EOG_TEXTS]
    bos_id, add_bos = _token_id(metadata, KEY_BOS, n, source, bos), _add_bos(metadata, add_bos, source)
    if add_bos and bos_id is None:
        raise TokenizerError(f"{source}: {KEY_ADD_BOS} is true (or defaults to true) but there is no {KEY_BOS}")
    template = metadata.get(KEY_CHAT_TEMPLATE)
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{source}: {KEY_CHAT_TEMPLATE} must be a string")
    return dict(
        bos_id=bos_id,
        eos_ids=[i for i in (eos_id, *eog) if i is not None],
        pad_id=_token_id(metadata, KEY_PAD, n, source),
        add_bos=add_bos,
        chat_template=template,
        source=source,
    )


def _spm_tokenizer(metadata: Mapping[str, Any], tokens: list[str], types: list[int], source: str) -> Tokenizer:
    """SentencePiece tokenizer from tokens/scores/types."""
    scores = _optional_list(metadata, KEY_SCORES, len(tokens), source) or [0.0] * len(tokens)
    add_prefix = metadata.get(KEY_ADD_SPACE_PREFIX, True)
    proto = _spm_model_proto(tokens, scores, types, bool(add_prefix))
    user_defined = [AddedToken(i, t, special=False) for i, t in enumerate(tokens) if types[i] == TokenType.USER_DEFINED]
    # llama.cpp's defaults for SPM vocabularies when the keys are absent: <s> = 1, </s> = 2.
    special = _special_kwargs(metadata, tokens, True, source, bos=1, eos=2)
    return Tokenizer.from_sentencepiece_proto(proto, added_tokens=user_defined, prefix_after_special=True, **special)


def _split_merge(merge: Any, source: str) -> list[str]:
    """'a b' -> ['a', 'b'], splitting at the first space after the first character as llama.cpp does."""
    cut = merge.find(" ", 1) if isinstance(merge, str) else -1
    if cut < 0:
        raise TokenizerError(f"{source}: {KEY_MERGES} entry {merge!r} is not two tokens separated by a space")
    return [merge[:cut], merge[cut + 1 :]]


def _bpe_tokenizer(metadata: Mapping[str, Any], tokens: list[str], types: list[int], source: str) -> Tokenizer:
    """Byte-level BPE tokenizer from tokens/types/merges and the pre-tokenizer named by tokenizer.ggml.pre."""
    pre_name = metadata.get(KEY_PRE, "default")  # llama.cpp's choice when the key is missing
    pre = _pre_tokenizer(pre_name, source)
    merges = [_split_merge(m, source) for m in _require(metadata, KEY_MERGES, list, source)]
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": types[i] == TokenType.CONTROL}
        for i, t in enumerate(tokens) if types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED)
    ]
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in pre.regexes]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*splits, byte_level]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": pre.ignore_merges, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges,
        },
    }
    special = _special_kwargs(metadata, tokens, pre.add_bos, source, bos=None, eos=None)
    return Tokenizer.from_tokenizers_json(json.dumps(tokenizer_json), **special)


# --------------------------------------------------------------------------------------------- writing


@dataclass
class GGUFVocab:
    """A tokenizer as the `tokenizer.*` keys of a GGUF file hold it."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str | None  # tokenizer.ggml.pre for gpt2 ("llama-bpe", "qwen2", ...), None for llama
    tokens: list[str]
    scores: list[float] | None  # SentencePiece only
    token_types: list[int]  # TokenType values
    merges: list[str] | None  # BPE only, "a b" strings in rank order
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str | None

    def metadata(self) -> dict[str, Any]:
        """The GGUF key/value pairs of this vocabulary (ids as ints, scores as floats, types as ints)."""
        out: dict[str, Any] = {
            KEY_MODEL: self.model,
            KEY_PRE: self.pre if self.pre is not None else "default",  # what convert_hf_to_gguf writes for SPM
            KEY_TOKENS: list(self.tokens),
            KEY_TOKEN_TYPE: [int(t) for t in self.token_types],
            KEY_ADD_BOS: self.add_bos,
        }
        optional = {
            KEY_SCORES: self.scores, KEY_MERGES: self.merges, KEY_BOS: self.bos_id, KEY_EOS: self.eos_id,
            KEY_PAD: self.pad_id, KEY_UNK: self.unk_id, KEY_CHAT_TEMPLATE: self.chat_template,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out


def gguf_vocab_from_tokenizer(tokenizer: Tokenizer) -> GGUFVocab:
    """The GGUF vocabulary of a Tokenizer, built as llama.cpp's convert_hf_to_gguf.py builds it."""
    model_file, added = _model_file(tokenizer)
    if isinstance(model_file, bytes):
        vocab = _spm_vocab(model_file, added, tokenizer.source)
    else:
        vocab = _bpe_vocab(json.loads(model_file), tokenizer.source)
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    vocab.bos_id, vocab.eos_id, vocab.pad_id = tokenizer.bos_id, eos, tokenizer.pad_id
    vocab.add_bos, vocab.chat_template = tokenizer.add_bos, tokenizer.chat_template
    return vocab


def _model_file(tokenizer: Tokenizer) -> tuple[bytes | str, Mapping[int, AddedToken]]:
    """The tokenizer's serialized SentencePiece model (bytes) or tokenizer.json (str), and its added tokens.

    """
    return tokenizer.model_file, tokenizer.added_tokens


def _looks_special(content: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: added tokens some models forget to mark special."""
    return (
        content in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (content.startswith("<|") and content.endswith("|>"))
        or (content.startswith("<｜") and content.endswith("｜>"))
        or (content.startswith("<unused") and content.endswith(">"))
    )


def _added_type(token: AddedToken) -> TokenType:
    """CONTROL for special (or special-looking) added tokens, USER_DEFINED for the rest."""
    return TokenType.CONTROL if token.special or _looks_special(token.content) else TokenType.USER_DEFINED


def _spm_vocab(proto: bytes, added: Mapping[int, AddedToken], source: str) -> GGUFVocab:
    """Pieces, scores and types of a SentencePiece model, then the added tokens over or after them."""
    spm = _parse_spm_model(proto)
    _check_llama_spm(spm, source)
    tokens, scores, types = spm.tokens, spm.scores, spm.types
    for i, token in sorted(added.items()):
        if i < len(tokens) and tokens[i] == token.content:
            continue  # the model's own piece (<s>, <unk>, user-defined pieces) keeps its score and type
        while len(tokens) <= i:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-10000.0)
            types.append(TokenType.UNUSED)
        kind = _added_type(token)
        # convert_hf_to_gguf stores user-defined tokens with real spaces: llama.cpp matches them in the raw text.
        tokens[i] = token.content if kind == TokenType.CONTROL else token.content.replace("▁", " ")
        scores[i], types[i] = -1000.0, kind
    unk = next((i for i, t in enumerate(types) if t == TokenType.UNKNOWN), None)
    return GGUFVocab("llama", None, tokens, scores, types, None, None, None, None, unk, False, None)


def _check_llama_spm(spm: _SpmModel, source: str) -> None:
    """Refuse SentencePiece models llama.cpp's SPM tokenizer cannot run; warn where it will differ a little."""
    if spm.model_type != _SPM_BPE:
        raise TokenizerError(f"{source}: GGUF 'llama' vocabularies are SentencePiece BPE models; this one is not BPE")
    plain = (spm.normalizer in ("identity", "") and not spm.charsmap and not spm.remove_extra_whitespaces
             and spm.escape_whitespaces and spm.add_dummy_prefix)
    if not plain:
        # convert_hf_to_gguf accepts these too (stories260K's tokenizer is one); llama.cpp then skips the
        # normalisation, so runs of spaces or NFKC-foldable characters tokenize differently than in HF.
        warnings.warn(
            f"{source}: the SentencePiece normalizer ({spm.normalizer!r}, remove_extra_whitespaces="
            f"{spm.remove_extra_whitespaces}) is not Llama's; llama.cpp (and kilnlm reading the GGUF file) "
            "will not apply it, so unusual whitespace or characters may tokenize differently",
            stacklevel=2,
        )


def _bpe_vocab(data: dict[str, Any], source: str) -> GGUFVocab:
    """Tokens by id (gaps as [PAD{id}]), merges and types of a byte-level BPE tokenizer.json."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{source}: only byte-level BPE tokenizer.json models map to GGUF 'gpt2'")
    pre = _detect_pre(data.get("pre_tokenizer"), source)
    ids: dict[str, int] = model.get("vocab") or {}
    added = [AddedToken(a["id"], a["content"], a.get("special", False)) for a in data.get("added_tokens", [])]
    n = max([*ids.values(), *(a.id for a in added)], default=-1) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TokenType.UNUSED] * n
    for token, i in ids.items():
        tokens[i], types[i] = token, TokenType.NORMAL
    for a in added:
        tokens[a.id], types[a.id] = a.content, _added_type(a)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    unk = ids.get(model.get("unk_token")) if model.get("unk_token") is not None else None
    return GGUFVocab("gpt2", pre, tokens, None, types, merges, None, None, None, unk, False, None)


def _split_regexes(pre_tokenizer: Any, source: str) -> tuple[str, ...]:
    """The regexes a byte-level pre-tokenizer splits with, in order; TokenizerError for anything else."""
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    regexes: list[str] = []
    for step in steps:
        kind = step.get("type")
        regex = (step.get("pattern") or {}).get("Regex")
        if kind == "Split" and regex is not None and step.get("behavior") == "Isolated" and not step.get("invert"):
            regexes.append(regex)
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            regexes += [_GPT2 + r"|\s+"] if step.get("use_regex", True) else []
        else:
            raise TokenizerError(f"{source}: pre-tokenizer step {json.dumps(step)} has no llama.cpp equivalent")
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise TokenizerError(f"{source}: the pre-tokenizer is not byte-level (no ByteLevel step at the end)")
    return tuple(regexes)


def _detect_pre(pre_tokenizer: Any, source: str) -> str:
    """The tokenizer.ggml.pre whose llama.cpp regexes are the ones this tokenizer.json splits with."""
    if not isinstance(pre_tokenizer, dict):
        raise TokenizerError(f"{source}: the tokenizer.json has no pre-tokenizer; llama.cpp needs a known one")
    regexes = _split_regexes(pre_tokenizer, source)
    for name, pre in _PRE_TOKENIZERS.items():
        if regexes == pre.regexes or regexes in pre.other_forms:
            return name
    raise TokenizerError(
        f"{source}: the pre-tokenizer regexes {list(regexes)} match none llama.cpp knows here "
        f"(supported {KEY_PRE}: {', '.join(_PRE_TOKENIZERS)}); the GGUF file would tokenize differently"
    )
