"""A GGUF vocabulary (`tokenizer.ggml.*` keys): reading and checking it, and building it from a Tokenizer.

Reading: `read_gguf_vocab` checks the keys of a GGUF file and returns them as a GGUFVocab, exactly as stored;
gguf_tokenizer.py applies llama.cpp's loading rules (default ids, control-looking tokens) and tokenizes.

Writing: `gguf_vocab_from_tokenizer` gives the GGUF vocabulary of a Tokenizer the way llama.cpp's
convert_hf_to_gguf.py builds it; `GGUFVocab.metadata()` gives the keys to write.

SentencePiece models (tokenizer.model) are read by the small protobuf wire-format decoder below, so the runtime
does not need the protobuf package.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any

from kilnlm.errors import TokenizerError
from kilnlm.runtime.pretokenizers import GPT2, detect_pre_tokenizer
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
KEY_ADD_EOS = "tokenizer.ggml.add_eos_token"
KEY_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
KEY_REMOVE_EXTRA_WS = "tokenizer.ggml.remove_extra_whitespaces"
KEY_CHARSMAP = "tokenizer.ggml.precompiled_charsmap"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"
# Other special-token ids llama.cpp reads; kept verbatim so a GGUF -> GGUF copy loses nothing.
OTHER_ID_KEYS = tuple(f"tokenizer.ggml.{name}_token_id" for name in (
    "seperator", "cls", "mask", "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep",
))
OTHER_FLAG_KEYS = ("tokenizer.ggml.add_sep_token",)


class TokenType(IntEnum):
    """llama.cpp's token types; SentencePiece's ModelProto.SentencePiece.Type uses the same numbers."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass
class GGUFVocab:
    """A tokenizer as the `tokenizer.*` keys of a GGUF file hold it (None: the key is absent)."""

    model: str  # "llama" (SentencePiece BPE), "gpt2" (byte-level BPE), "gemma4", "t5", "rwkv", "plamo2"
    pre: str | None  # tokenizer.ggml.pre: the BPE pre-tokenizer ("llama-bpe", "qwen2", ...)
    tokens: list[str]
    scores: list[float] | None
    token_types: list[int]  # TokenType values
    merges: list[str] | None  # BPE only, "a b" strings in rank order
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool | None
    chat_template: str | None
    eot_id: int | None = None
    eom_id: int | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    precompiled_charsmap: bytes | None = None  # SentencePiece's normalisation rules (unigram vocabularies)
    other: dict[str, Any] = field(default_factory=dict)  # OTHER_ID_KEYS / OTHER_FLAG_KEYS present in the file

    def metadata(self) -> dict[str, Any]:
        """The GGUF key/value pairs of this vocabulary (ids as ints, scores as floats, types as ints)."""
        out: dict[str, Any] = {
            KEY_MODEL: self.model,
            KEY_TOKENS: list(self.tokens),
            KEY_TOKEN_TYPE: [int(t) for t in self.token_types],
        }
        optional = {
            KEY_PRE: self.pre, KEY_SCORES: self.scores, KEY_MERGES: self.merges, KEY_BOS: self.bos_id, KEY_EOS: self.eos_id,
            KEY_EOT: self.eot_id, KEY_EOM: self.eom_id, KEY_PAD: self.pad_id, KEY_UNK: self.unk_id,
            KEY_ADD_BOS: self.add_bos, KEY_ADD_EOS: self.add_eos, KEY_ADD_SPACE_PREFIX: self.add_space_prefix,
            KEY_REMOVE_EXTRA_WS: self.remove_extra_whitespaces, KEY_CHARSMAP: self.precompiled_charsmap,
            KEY_CHAT_TEMPLATE: self.chat_template, **self.other,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out


# --------------------------------------------------------------------------------------------- reading


def read_gguf_vocab(metadata: Mapping[str, Any], source: str) -> GGUFVocab:
    """The `tokenizer.*` keys of a GGUF file (plain Python values), checked; TokenizerError names the bad key."""
    model = _require(metadata, KEY_MODEL, str, source)
    tokens = _require(metadata, KEY_TOKENS, list, source)
    if not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{source}: {KEY_TOKENS} must hold strings")
    n = len(tokens)
    if n == 0:
        raise TokenizerError(f"{source}: {KEY_TOKENS} is empty")
    types = _per_token(metadata, KEY_TOKEN_TYPE, n, source)
    scores = _per_token(metadata, KEY_SCORES, n, source)
    if types is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
        raise TokenizerError(f"{source}: {KEY_TOKEN_TYPE} must hold integers")
    if scores is not None and not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise TokenizerError(f"{source}: {KEY_SCORES} must hold numbers")
    merges = _require(metadata, KEY_MERGES, list, source) if KEY_MERGES in metadata else None
    if merges is not None and not all(isinstance(m, str) for m in merges):
        raise TokenizerError(f"{source}: {KEY_MERGES} must hold strings")
    template = metadata.get(KEY_CHAT_TEMPLATE)
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{source}: {KEY_CHAT_TEMPLATE} must be a string")
    pre = metadata.get(KEY_PRE)
    if pre is not None and not isinstance(pre, str):
        raise TokenizerError(f"{source}: unsupported {KEY_PRE} {pre!r} (it must be a string)")
    return GGUFVocab(
        model=model, pre=pre, tokens=list(tokens), scores=None if scores is None else [float(s) for s in scores],
        token_types=list(types) if types is not None else [TokenType.NORMAL] * n, merges=merges,
        bos_id=_id(metadata, KEY_BOS, source), eos_id=_id(metadata, KEY_EOS, source),
        pad_id=_id(metadata, KEY_PAD, source), unk_id=_id(metadata, KEY_UNK, source),
        add_bos=_flag(metadata, KEY_ADD_BOS, source), chat_template=template,
        eot_id=_id(metadata, KEY_EOT, source), eom_id=_id(metadata, KEY_EOM, source),
        add_eos=_flag(metadata, KEY_ADD_EOS, source), add_space_prefix=_flag(metadata, KEY_ADD_SPACE_PREFIX, source),
        remove_extra_whitespaces=_flag(metadata, KEY_REMOVE_EXTRA_WS, source),
        precompiled_charsmap=_charsmap(metadata, source),
        other={k: metadata[k] for k in (*OTHER_ID_KEYS, *OTHER_FLAG_KEYS) if k in metadata},
    )


def _require(metadata: Mapping[str, Any], key: str, kind: type, source: str) -> Any:
    """metadata[key], raising TokenizerError when it is missing or not of `kind`."""
    if key not in metadata:
        raise TokenizerError(f"{source}: GGUF metadata has no {key}")
    value = metadata[key]
    if not isinstance(value, kind):
        raise TokenizerError(f"{source}: {key} must be a {kind.__name__}, found {type(value).__name__}")
    return value


def _per_token(metadata: Mapping[str, Any], key: str, n_tokens: int, source: str) -> list | None:
    """A per-token list (scores, token types), None when absent; longer lists are cut, as llama.cpp indexes them."""
    if key not in metadata:
        return None
    values = _require(metadata, key, list, source)
    if len(values) < n_tokens:
        raise TokenizerError(f"{source}: {key} has {len(values)} entries but {KEY_TOKENS} has {n_tokens}")
    return values[:n_tokens]


def _id(metadata: Mapping[str, Any], key: str, source: str) -> int | None:
    """A token-id key as stored (range checks are the loader's: llama.cpp treats out-of-range ids as absent)."""
    value = metadata.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise TokenizerError(f"{source}: {key} = {value!r} is not a token id")
    return value


def _flag(metadata: Mapping[str, Any], key: str, source: str) -> bool | None:
    """A boolean key, None when absent."""
    value = metadata.get(key)
    if value is not None and not isinstance(value, bool):
        raise TokenizerError(f"{source}: {key} must be a bool, found {value!r}")
    return value


def _charsmap(metadata: Mapping[str, Any], source: str) -> bytes | None:
    """tokenizer.ggml.precompiled_charsmap (an array of bytes) as bytes."""
    value = metadata.get(KEY_CHARSMAP)
    if value is None or isinstance(value, bytes):
        return value
    try:
        return bytes(v & 0xFF for v in value)  # tolerate files that store the bytes as int8
    except TypeError as e:
        raise TokenizerError(f"{source}: {KEY_CHARSMAP} must be an array of bytes ({e})") from e


# --------------------------------------------------------------------------------------------- SentencePiece models


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
    for number, value in _pb_fields(proto):
        if number == _MODEL_PIECES:
            piece = dict(_pb_fields(value))
            model.tokens.append(piece.get(_PIECE_TEXT, b"").decode())
            model.scores.append(struct.unpack("<f", piece[_PIECE_SCORE])[0] if _PIECE_SCORE in piece else 0.0)
            model.types.append(piece.get(_PIECE_TYPE, TokenType.NORMAL))
        elif number == _MODEL_TRAINER:
            model.model_type = dict(_pb_fields(value)).get(_TRAINER_MODEL_TYPE, model.model_type)
        elif number == _MODEL_NORMALIZER:
            spec = dict(_pb_fields(value))  # protobuf merges repeated sub-messages: the last value of a field wins
            model.normalizer = spec.get(_NORM_NAME, model.normalizer.encode()).decode()
            model.charsmap = spec.get(_NORM_CHARSMAP, model.charsmap)
            model.add_dummy_prefix = bool(spec.get(_NORM_DUMMY_PREFIX, model.add_dummy_prefix))
            model.remove_extra_whitespaces = bool(spec.get(_NORM_REMOVE_EXTRA_WS, model.remove_extra_whitespaces))
            model.escape_whitespaces = bool(spec.get(_NORM_ESCAPE_WS, model.escape_whitespaces))
    return model


# --------------------------------------------------------------------------------------------- writing


def gguf_vocab_from_tokenizer(tokenizer: Tokenizer) -> GGUFVocab:
    """The GGUF vocabulary of a Tokenizer, built as llama.cpp's convert_hf_to_gguf.py builds it.

    A tokenizer read from a GGUF file gives back that file's vocabulary unchanged.
    """
    stored = getattr(tokenizer.backend, "gguf_vocab", None)
    if stored is not None:
        return replace(stored, tokens=list(stored.tokens), token_types=list(stored.token_types),
                       scores=None if stored.scores is None else list(stored.scores), other=dict(stored.other))
    model_file = tokenizer.model_file
    if isinstance(model_file, bytes):
        vocab = _spm_vocab(model_file, tokenizer.added_tokens, tokenizer.source)
    else:
        vocab = _bpe_vocab(json.loads(model_file), tokenizer.source)
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    vocab.bos_id, vocab.eos_id, vocab.pad_id = tokenizer.bos_id, eos, tokenizer.pad_id
    vocab.add_bos, vocab.chat_template = tokenizer.add_bos, tokenizer.chat_template
    return vocab


def spm_whitespace_rules(tokenizer: Tokenizer) -> tuple[bool, bool] | None:
    """(add_dummy_prefix, remove_extra_whitespaces) of a SentencePiece tokenizer's model, None for other kinds.

    GGUF vocabularies leave these out for Llama-style models (as convert_hf_to_gguf does); a tokenizer.json
    written for the same model needs them to tokenize as SentencePiece does.
    """
    stored = getattr(tokenizer.backend, "gguf_vocab", None)
    if stored is not None:
        if stored.model != "llama":
            return None
        return stored.add_space_prefix is not False, bool(stored.remove_extra_whitespaces)
    if not isinstance(tokenizer.model_file, bytes):
        return None
    spm = _parse_spm_model(tokenizer.model_file)
    return spm.add_dummy_prefix, spm.remove_extra_whitespaces


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
    # "default" is what convert_hf_to_gguf writes for SentencePiece vocabularies (llama.cpp ignores it there).
    return GGUFVocab("llama", "default", tokens, scores, types, None, None, None, None, unk, False, None)


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
    pre = _detect_pre(data, source)
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
        elif kind == "Digits":  # StarCoder's and DeepSeek's digit splitting, as a regex
            regexes.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            regexes += [GPT2] if step.get("use_regex", True) else []
        else:
            raise TokenizerError(f"{source}: pre-tokenizer step {json.dumps(step)} has no llama.cpp equivalent")
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise TokenizerError(f"{source}: the pre-tokenizer is not byte-level (no ByteLevel step at the end)")
    return tuple(regexes)


def _detect_pre(data: dict[str, Any], source: str) -> str:
    """The tokenizer.ggml.pre whose llama.cpp regexes and flags are the ones this tokenizer.json uses."""
    pre_tokenizer = data.get("pre_tokenizer")
    if not isinstance(pre_tokenizer, dict):
        raise TokenizerError(f"{source}: the tokenizer.json has no pre-tokenizer; llama.cpp needs a known one")
    regexes = _split_regexes(pre_tokenizer, source)
    name = detect_pre_tokenizer(regexes, bool((data.get("model") or {}).get("ignore_merges")))
    if name is None:
        raise TokenizerError(
            f"{source}: the pre-tokenizer regexes {list(regexes)} (with this ignore_merges) match none of "
            f"llama.cpp's {KEY_PRE} entries; the GGUF file would tokenize differently"
        )
    return name
