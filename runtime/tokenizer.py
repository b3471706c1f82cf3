"""Text <-> token ids: SentencePiece (tokenizer.model) or HF `tokenizers` (tokenizer.json), with one BOS rule.

Both backends, and gguf_tokenizer.GGUFBackend for GGUF files, sit behind the same small interface (`encode`
without BOS, `decode` of already filtered ids, piece lookups, the set of added tokens); `Tokenizer` owns
everything they share: BOS, eos ids, which ids are special, `skip_special`, and streaming.

SentencePiece and added tokens: the text is split on the added-token strings (longest match first) and
each remaining chunk goes through sentencepiece. Sentencepiece prepends its dummy prefix "▁" to every call,
so the choice is where a chunk gets it. We follow transformers 5's LlamaTokenizer: only the chunk that
starts the text gets it ("<s>Hello" -> <s>, "Hello"), unless tokenizer_config.json sets `"legacy": true`,
where every chunk gets it ("<s>Hello" -> <s>, "▁Hello"), which is also what llama.cpp does (GGUF files are
read by gguf_tokenizer.py, which follows llama.cpp). Decoding keeps every "▁" as a space except at the very start of
the output, as transformers and llama.cpp do, so in the default mode decode(encode(s), skip_special=False)
== s wherever sentencepiece itself round-trips s. Each chunk is otherwise exactly sentencepiece's own
encoding, whitespace included (" Hi" -> "▁", "▁Hi"; transformers 5 gives "▁Hi" and also merges runs of
spaces differently; llama.cpp agrees with sentencepiece).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import sentencepiece as spm
import tokenizers

from kilnlm.errors import TokenizerError
from kilnlm.runtime.tokenizer_models import SPACE_ESCAPE, unbyte

# A serialized NormalizerSpec (ModelProto field 3) holding only add_dummy_prefix (its field 3) = false.
# Protobuf merges a repeated singular message field into the first one, so appending these four bytes to a
# model turns the dummy prefix off without a protobuf dependency; the sentencepiece API has no switch for it.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"
_REPLACEMENT_CHAR = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces


@dataclass(frozen=True)
class AddedToken:
    """A token that encode() matches as a whole string in the text (e.g. "<|im_start|>"), and its id."""

    id: int
    content: str
    special: bool = True


class _Backend(Protocol):
    """What Tokenizer needs from a tokenization library."""

    source: str
    vocab_size: int
    added: dict[int, AddedToken]

    def encode(self, text: str) -> list[int]: ...
    def encode_continuation(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def id_to_piece(self, token_id: int) -> str: ...
    def token_to_id(self, piece: str) -> int | None: ...
    def piece_bytes(self, token_id: int) -> bytes: ...


# --------------------------------------------------------------------------------------------- backends


def _load_sentencepiece(model_proto: bytes, source: str) -> spm.SentencePieceProcessor:
    """Parse a serialized SentencePiece ModelProto, raising TokenizerError when it is not one."""
    try:
        sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as e:
        raise TokenizerError(f"{source}: not a valid SentencePiece model ({e})") from e
    if sp.piece_size() == 0:
        raise TokenizerError(f"{source}: not a valid SentencePiece model (it has no pieces)")
    return sp


def _split_pattern(contents: Iterable[str]) -> re.Pattern[str] | None:
    """Regex splitting text on the given strings, longest first, keeping the matches."""
    alternatives = sorted({c for c in contents if c}, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None


class _SentencePieceBackend:
    """A SentencePiece model plus added tokens, which are split out of the text before sentencepiece sees it."""

    def __init__(self, model_proto: bytes, added: Iterable[AddedToken], prefix_after_special: bool, source: str):
        self.source = source
        self.sp = _load_sentencepiece(model_proto, source)
        self._sp_no_prefix = _load_sentencepiece(model_proto + _NO_DUMMY_PREFIX, source)
        self._n_pieces = self.sp.piece_size()
        builtin = [AddedToken(i, self.sp.id_to_piece(i)) for i in range(self._n_pieces) if self._is_builtin_special(i)]
        self.added = {t.id: t for t in [*builtin, *added]}  # entries from the config override the model's
        self._by_content = {t.content: t.id for t in self.added.values()}
        self._pattern = _split_pattern(self._by_content)
        self._prefix_after_special = prefix_after_special
        self.vocab_size = max(self._n_pieces, max(self.added, default=-1) + 1)

    def _is_builtin_special(self, i: int) -> bool:
        """Control symbols (<s>, </s>) and <unk> are special, as in transformers."""
        return self.sp.is_control(i) or self.sp.is_unknown(i)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`: added tokens as single ids, every other chunk through sentencepiece."""
        parts = self._pattern.split(text) if self._pattern else [text]
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:  # re.split puts the matched added tokens at odd positions
                ids.append(self._by_content[part])
            elif part:
                sp = self.sp if k == 0 or self._prefix_after_special else self._sp_no_prefix
                ids.extend(sp.encode(part))
        return ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as it would be tokenized after earlier text: no dummy-prefix space anywhere."""
        parts = self._pattern.split(text) if self._pattern else [text]
        return [i for k, part in enumerate(parts) if part
                for i in ([self._by_content[part]] if k % 2 else self._sp_no_prefix.encode(part))]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; added tokens render as their content, runs of other ids through sentencepiece."""
        out: list[str] = []
        for is_added, group in itertools.groupby(ids, key=self.added.__contains__):
            run = list(group)
            if is_added:
                out.extend(self.added[i].content for i in run)
                continue
            self._check_pieces(run)
            # Only text at the start of the output drops the dummy-prefix space (see module docstring).
            out.append((self._sp_no_prefix if out else self.sp).decode(run))
        return "".join(out)

    def _check_pieces(self, ids: list[int]) -> None:
        """Raise TokenizerError for ids that are neither pieces nor added tokens."""
        bad = [i for i in ids if not 0 <= i < self._n_pieces]
        if bad:
            raise TokenizerError(f"{self.source}: token id {bad[0]} is not in the vocabulary")

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of an id (e.g. "▁Hello", "<0x0A>", "<s>")."""
        if token_id in self.added:
            return self.added[token_id].content
        self._check_pieces([token_id])
        return self.sp.id_to_piece(token_id)

    def token_to_id(self, piece: str) -> int | None:
        """The id of a piece string, or None."""
        if piece in self._by_content:
            return self._by_content[piece]
        token_id = self.sp.piece_to_id(piece)
        return token_id if self.sp.id_to_piece(token_id) == piece else None  # unknown pieces map to <unk>

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes the id adds inside a text: "▁" is a space, a byte-fallback piece its byte."""
        if token_id in self.added:
            return self.added[token_id].content.encode()
        self._check_pieces([token_id])
        if self.sp.is_byte(token_id):
            return bytes([int(_BYTE_PIECE.fullmatch(self.sp.id_to_piece(token_id)).group(1), 16)])
        if self.sp.is_unused(token_id):
            return b""
        return self.sp.id_to_piece(token_id).replace(SPACE_ESCAPE, " ").encode()


class _TokenizersBackend:
    """An HF `tokenizers` Tokenizer (tokenizer.json); it matches its own added tokens."""

    def __init__(self, tok: tokenizers.Tokenizer, source: str):
        self.source = source
        tok.no_truncation()  # a tokenizer.json may carry training-time truncation/padding settings
        tok.no_padding()
        self._tok = tok
        self.added = {i: AddedToken(i, t.content, t.special) for i, t in tok.get_added_tokens_decoder().items()}
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        data = json.loads(tok.to_str())
        # GPT-2 style vocabularies spell bytes as printable characters; SentencePiece-style ones use "▁".
        self._byte_level = "ByteLevel" in json.dumps(data.get("decoder"))
        self._no_prefix_tok = tokenizers.Tokenizer.from_str(json.dumps(_without_space_prefix(data)))

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without the post-processor (Tokenizer adds BOS itself)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as it would be tokenized after earlier text (no prefix space added at its start)."""
        return self._no_prefix_tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens included (Tokenizer has already removed the ones to skip)."""
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        """The token string of an id (byte-level form, e.g. "Ġhello")."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise TokenizerError(f"{self.source}: token id {token_id} is not in the vocabulary")
        return piece

    def token_to_id(self, piece: str) -> int | None:
        """The id of a token string, or None."""
        return self._tok.token_to_id(piece)

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes the id adds inside a text (byte-level pieces mapped back to bytes, "▁" as a space)."""
        if token_id in self.added:
            return self.added[token_id].content.encode()
        piece = self.id_to_piece(token_id)
        if self._byte_level:
            return unbyte(piece)
        if byte := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(byte.group(1), 16)])
        return piece.replace(SPACE_ESCAPE, " ").encode()


def _without_space_prefix(node: Any) -> Any:
    """A copy of tokenizer.json data whose normalizer and pre-tokenizer add no space at the start of a text
    (Prepend("▁") normalizers dropped, Metaspace never prepending, ByteLevel not adding a prefix space)."""
    if isinstance(node, list):
        return [_without_space_prefix(item) for item in node
                if not (isinstance(item, dict) and item.get("type") == "Prepend")]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Prepend":
        return None
    node = {key: _without_space_prefix(value) for key, value in node.items()}
    if node.get("type") == "Metaspace":
        node.update(prepend_scheme="never", add_prefix_space=False)
    if node.get("type") == "ByteLevel" and "add_prefix_space" in node:
        node["add_prefix_space"] = False
    return node


def _load_tokenizers_json(json_str: str, source: str) -> tokenizers.Tokenizer:
    """Build an HF `tokenizers` Tokenizer from tokenizer.json text, raising TokenizerError when it is malformed."""
    try:
        return tokenizers.Tokenizer.from_str(json_str)
    except Exception as e:  # the Rust side raises plain Exception for every parse error
        raise TokenizerError(f"{source}: not a valid tokenizer.json ({e})") from e


# --------------------------------------------------------------------------------------------- Tokenizer


class Tokenizer:
    """Text <-> token ids, backed by sentencepiece (SentencePiece models) or HF `tokenizers` (tokenizer.json)."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_id: int | None,
        eos_ids: Sequence[int],
        pad_id: int | None,
        add_bos: bool,
        chat_template: str | None = None,
    ):
        self._backend = backend
        self.source = backend.source
        self.vocab_size = backend.vocab_size
        for name, token_id in [("bos_id", bos_id), ("pad_id", pad_id), *(("eos_ids", i) for i in eos_ids)]:
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                size = self.vocab_size
                raise TokenizerError(f"{self.source}: {name} {token_id} is outside the vocabulary ({size} ids)")
        if add_bos and bos_id is None:
            raise TokenizerError(f"{self.source}: add_bos is set but the tokenizer has no BOS token")
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.pad_id = pad_id
        self.add_bos = add_bos
        self.bos_token = backend.id_to_piece(bos_id) if bos_id is not None else None
        self.eos_token = backend.id_to_piece(self.eos_ids[0]) if self.eos_ids else None
        self.chat_template = chat_template
        own = {i for i in (bos_id, pad_id, *self.eos_ids) if i is not None}
        self.special_ids = frozenset(own | {t.id for t in backend.added.values() if t.special})

    @classmethod
    def from_sentencepiece_proto(
        cls,
        model_proto: bytes,
        *,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
        add_bos: bool = False,
        added_tokens: Iterable[AddedToken] = (),
        prefix_after_special: bool = False,
        chat_template: str | None = None,
        source: str = "SentencePiece model",
    ) -> Tokenizer:
        """Build from a serialized SentencePiece ModelProto; `prefix_after_special` is HF's legacy mode."""
        backend = _SentencePieceBackend(model_proto, added_tokens, prefix_after_special, source)
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id, add_bos=add_bos, chat_template=chat_template)

    @classmethod
    def from_tokenizers_json(
        cls,
        json_str: str,
        *,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        source: str = "tokenizer.json",
    ) -> Tokenizer:
        """Build from the text of an HF tokenizer.json; its post-processor is ignored, `add_bos` decides BOS."""
        backend = _TokenizersBackend(_load_tokenizers_json(json_str, source), source)
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id, add_bos=add_bos, chat_template=chat_template)

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model folder (tokenizer.model preferred, else tokenizer.json)."""
        return _HFFolder(Path(folder)).load(cls)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text` (special-token strings become their ids), BOS first if add_bos (None: self.add_bos)."""
        ids = self._backend.encode(text)
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: cannot add BOS, the tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped when skip_special, else rendered as their strings."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"{self.source}: token id {bad[0]} is outside the vocabulary ({self.vocab_size} ids)")
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self._backend.decode(ids)

    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece or added token, or None if there is none."""
        return self._backend.token_to_id(piece)

    @property
    def backend(self) -> _Backend:
        """The tokenization backend (sentencepiece, `tokenizers`, or a GGUF vocabulary)."""
        return self._backend

    @property
    def model_file(self) -> bytes | str:
        """The backend's model: a serialized SentencePiece ModelProto (bytes) or a tokenizer.json (str)."""
        backend = self._backend
        if isinstance(backend, _SentencePieceBackend):
            return backend.sp.serialized_model_proto()
        if isinstance(backend, _TokenizersBackend):
            return backend._tok.to_str()
        raise TokenizerError(f"{self.source}: this tokenizer has no SentencePiece or tokenizer.json model file")

    @property
    def added_tokens(self) -> Mapping[int, AddedToken]:
        """Tokens matched as whole strings (special and user-defined), by id."""
        return MappingProxyType(self._backend.added)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece (or added-token string) of an id."""
        return self._backend.id_to_piece(token_id)

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as a continuation of earlier text: no BOS, and no start-of-text space prefix (the
        tokenization a grammar's forced text gets in the middle of an answer)."""
        return self._backend.encode_continuation(text)

    def token_bytes(self) -> list[bytes]:
        """What each id adds to a text, as bytes, by id (the vocabulary a grammar is matched against). Special
        tokens are b"\xff" + their string, the mark llguidance and llama.cpp give text no grammar can spell."""
        return [b"\xff" + self.id_to_piece(i).encode() if i in self.special_ids else self._backend.piece_bytes(i)
                for i in range(self.vocab_size)]

    def stream(self, skip_special: bool = True) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get text pieces that concatenate to decode(all ids).

    It never emits broken UTF-8. Like vLLM's detokenizer it decodes only a window: the ids of the previous
    emission (the prefix, already emitted) plus the ids pushed since, and emits what the window's text adds to
    the prefix's text. Both decodes start at the same id, so start-of-text rules (sentencepiece dropping the
    first space) affect them alike and the difference is exactly what decode(all ids) adds there.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._reset()

    def _reset(self) -> None:
        """Forget everything pushed so far."""
        self._ids: list[int] = []  # the window; older ids are dropped
        self._read = 0  # _ids[:_read] is the prefix (emitted), _ids[_read:] is not emitted yet
        self._prefix_text = ""  # decode(_ids[:_read])

    def _decode(self, ids: list[int]) -> str:
        """Decode a window with this stream's skip_special setting."""
        return self._tokenizer.decode(ids, skip_special=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        text = self._decode([*self._ids, token_id])  # decode first: an invalid id leaves the stream as it was
        self._ids.append(token_id)
        # A trailing U+FFFD may be a UTF-8 sequence whose remaining bytes are still to come: hold it back.
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        new = text[len(self._prefix_text) :]
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new

    def flush(self) -> str:
        """Return the text still held back (an unfinished byte sequence decodes to U+FFFD) and reset the stream."""
        rest = self._decode(self._ids)[len(self._prefix_text) :]
        self._reset()
        return rest


# --------------------------------------------------------------------------------------------- HF folders


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, {} if the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any, path: Path, field: str) -> str | None:
    """A token given as a string or as an AddedToken dict {"content": ...}; None when absent."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerError(f"{path}: {field} must be a string or {{\"content\": string}}, found {value!r}")


def _id_list(value: Any, path: Path, field: str) -> list[int]:
    """Token ids given as an int or a list of ints; [] when absent."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{path}: {field} must be an int or a list of ints, found {value!r}")
    return values


def _optional_bool(data: dict[str, Any], path: Path, field: str) -> bool | None:
    """A boolean field, None when absent."""
    value = data.get(field)
    if value is not None and not isinstance(value, bool):
        raise TokenizerError(f"{path}: {field} must be true or false, found {value!r}")
    return value


def _added_tokens_decoder(cfg: dict[str, Any], path: Path) -> list[AddedToken]:
    """tokenizer_config.json's added_tokens_decoder: {"id": {"content": ..., "special": ...}}."""
    entries = cfg.get("added_tokens_decoder") or {}
    try:
        return [AddedToken(int(i), str(e["content"]), bool(e.get("special", False))) for i, e in entries.items()]
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise TokenizerError(f"{path}: malformed added_tokens_decoder ({e!r})") from e


def _template_bos(tokenizer_json: dict[str, Any]) -> str | None:
    """The special token a TemplateProcessing post-processor puts first in a single sequence, if any."""
    stack = [tokenizer_json.get("post_processor")]
    while stack:
        proc = stack.pop()
        if not isinstance(proc, dict):
            continue
        stack.extend(proc.get("processors") or [])  # a "Sequence" post-processor
        single = proc.get("single") if proc.get("type") == "TemplateProcessing" else None
        if single and isinstance(single[0], dict) and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"].get("id")
    return None


def _chat_template(folder: Path, cfg: dict[str, Any], cfg_path: Path) -> str | None:
    """chat_template.jinja if present (newer transformers write it there), else tokenizer_config's chat_template."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{jinja}: cannot read the chat template ({e})") from e
    value = cfg.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        return next((t.get("template") for t in value if t.get("name") == "default"), None)
    raise TokenizerError(f"{cfg_path}: chat_template must be a string or a list of {{name, template}}")


@dataclass
class _ModelDefaults:
    """Special-token ids the tokenizer model itself declares, used when the configs do not name them."""

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False


class _HFFolder:
    """Reads one HF model folder; each config file is read once."""

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: tokenizer folder does not exist")
        self.folder = folder
        self.cfg_path = folder / "tokenizer_config.json"
        self.map_path = folder / "special_tokens_map.json"
        self.gen_path = folder / "generation_config.json"
        self.model_path = folder / "config.json"
        self.cfg = _read_json_object(self.cfg_path)
        self.map = _read_json_object(self.map_path)
        self.gen = _read_json_object(self.gen_path)
        self.model = _read_json_object(self.model_path)

    def load(self, cls: type[Tokenizer]) -> Tokenizer:
        """Build the Tokenizer from the folder's files."""
        backend, defaults = self._backend()
        bos_id = self._bos_id(backend, defaults)
        add_bos = _optional_bool(self.cfg, self.cfg_path, "add_bos_token")
        if add_bos and bos_id is None:
            raise TokenizerError(f"{self.cfg_path}: add_bos_token is true but no BOS token is defined")
        return cls(
            backend,
            bos_id=bos_id,
            eos_ids=self._eos_ids(backend, defaults),
            pad_id=self._pad_id(backend, defaults),
            add_bos=(defaults.add_bos and bos_id is not None) if add_bos is None else add_bos,
            chat_template=_chat_template(self.folder, self.cfg, self.cfg_path),
        )

    def _backend(self) -> tuple[_Backend, _ModelDefaults]:
        """The tokenizer model file and the special ids it declares itself."""
        model_file, json_file = self.folder / "tokenizer.model", self.folder / "tokenizer.json"
        if model_file.is_file():
            return self._sentencepiece(model_file)
        if json_file.is_file():
            return self._tokenizers(json_file)
        raise TokenizerError(f"{self.folder}: no tokenizer found (looked for tokenizer.model and tokenizer.json)")

    def _sentencepiece(self, path: Path) -> tuple[_Backend, _ModelDefaults]:
        """SentencePiece backend; BOS by default (the Llama convention)."""
        legacy = _optional_bool(self.cfg, self.cfg_path, "legacy")
        added = _added_tokens_decoder(self.cfg, self.cfg_path)
        backend = _SentencePieceBackend(_read_bytes(path), added, bool(legacy), str(path))
        sp = backend.sp
        ids = [i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.pad_id())]
        return backend, _ModelDefaults(*ids, add_bos=True)

    def _tokenizers(self, path: Path) -> tuple[_Backend, _ModelDefaults]:
        """HF tokenizers backend; BOS by default only if its post-processor inserts one."""
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path}: cannot read JSON ({e})") from e
        if not isinstance(data, dict):
            raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
        backend = _TokenizersBackend(_load_tokenizers_json(text, str(path)), str(path))
        bos = _template_bos(data)
        bos_id = backend.token_to_id(bos) if bos is not None else None
        return backend, _ModelDefaults(bos_id=bos_id, add_bos=bos_id is not None)

    def _config_token_id(self, backend: _Backend, field: str) -> int | None:
        """The id of `field` ("bos_token", ...) named in tokenizer_config.json, else special_tokens_map.json."""
        for path, data in ((self.cfg_path, self.cfg), (self.map_path, self.map)):
            content = _token_content(data.get(field), path, field)
            if content is None:
                continue
            token_id = backend.token_to_id(content)
            if token_id is None and field != "pad_token":
                raise TokenizerError(f"{path}: {field} {content!r} is not in the vocabulary of {backend.source}")
            # transformers would append a missing pad token to the vocabulary; generation never needs it.
            return token_id
        return None

    def _ids(self, backend: _Backend, path: Path, data: dict[str, Any], field: str) -> list[int]:
        """Ids from a generation_config.json / config.json field, checked against the vocabulary."""
        ids = _id_list(data.get(field), path, field)
        bad = [i for i in ids if not 0 <= i < backend.vocab_size]
        if bad:
            raise TokenizerError(f"{path}: {field} {bad[0]} is outside the vocabulary of {backend.source}")
        return ids

    def _bos_id(self, backend: _Backend, defaults: _ModelDefaults) -> int | None:
        """generation_config's bos_token_id overrides the tokenizer's; config.json is the last resort."""
        candidates = [
            *self._ids(backend, self.gen_path, self.gen, "bos_token_id"),
            self._config_token_id(backend, "bos_token"),
            defaults.bos_id,
            *self._ids(backend, self.model_path, self.model, "bos_token_id"),
        ]
        return next((i for i in candidates if i is not None), None)

    def _eos_ids(self, backend: _Backend, defaults: _ModelDefaults) -> list[int]:
        """The tokenizer's eos followed by generation_config's (Llama-3 instruct lists several)."""
        own = self._config_token_id(backend, "eos_token")
        own = defaults.eos_id if own is None else own
        ids = ([] if own is None else [own]) + self._ids(backend, self.gen_path, self.gen, "eos_token_id")
        return ids or self._ids(backend, self.model_path, self.model, "eos_token_id")

    def _pad_id(self, backend: _Backend, defaults: _ModelDefaults) -> int | None:
        """The configured pad token, else generation_config's pad_token_id, else the model's."""
        candidates = [
            self._config_token_id(backend, "pad_token"),
            *self._ids(backend, self.gen_path, self.gen, "pad_token_id"),
            defaults.pad_id,
        ]
        return next((i for i in candidates if i is not None), None)


def _read_bytes(path: Path) -> bytes:
    """The bytes of a file, raising TokenizerError when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from e
