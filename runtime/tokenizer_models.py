"""The tokenizer models of GGUF vocabularies that no library runs exactly as llama.cpp does, in plain Python.

Each class turns one text fragment (special tokens already split out) into ids, following llama.cpp's
src/llama-vocab.cpp:
- SentencePieceBPE ("llama"): merge the adjacent pair whose concatenation is the highest-scoring token.
- Unigram ("t5"): SentencePiece's normaliser (precompiled charsmap) and Viterbi over token log-probabilities.
- GreedyBytes ("rwkv"): longest token first over the UTF-8 bytes.
- Plamo2 ("plamo2"): lowest total cost, with unknown characters as byte tokens.
Byte-pair vocabularies ("gpt2", "gemma4") go through the `tokenizers` library instead (gguf_tokenizer.py).
"""

from __future__ import annotations

import functools
import heapq
import math
import struct
from collections.abc import Iterable, Mapping

from kilnlm.errors import TokenizerError

SPACE_ESCAPE = "\u2581"  # "▁", SentencePiece's visible space


def byte_token_text(byte: int) -> str:
    """The text of a byte-fallback token, "<0x0A>" for a newline."""
    return f"<0x{byte:02X}>"


def _prefixes(texts: Iterable[str | bytes]) -> set:
    """Every non-empty prefix of every text: lets a longest-match scan stop as soon as no token can continue."""
    return {text[:k] for text in texts for k in range(1, len(text) + 1)}


def _longest_match(data: bytes, start: int, prefixes: set, entries: Mapping | set) -> int:
    """Length of the longest entry that `data` holds at `start` (0 if none), walking only through prefixes."""
    length, best = 1, 0
    while start + length <= len(data) and data[start : start + length] in prefixes:
        if data[start : start + length] in entries:
            best = length
        length += 1
    return best


class ByteFallback:
    """The ids that spell a byte the vocabulary has no token for: <0xXX>, else the byte's own one-char token."""

    def __init__(self, token_ids: Mapping[str, int], unk_id: int | None, source: str):
        self._ids = [token_ids.get(byte_token_text(b), token_ids.get(chr(b)) if b < 0x80 else None) for b in range(256)]
        self._unk_id, self._source = unk_id, source

    def ids(self, text: str) -> list[int]:
        """The byte tokens of `text`'s UTF-8 bytes."""
        out = []
        for byte in text.encode("utf-8", "surrogatepass"):
            token_id = self._ids[byte]
            if token_id is None:
                token_id = self._unk_id
            if token_id is None:
                raise TokenizerError(f"{self._source}: the vocabulary has no token for byte 0x{byte:02X} and no <unk>")
            out.append(token_id)
        return out


class SentencePieceBPE:
    """llama.cpp's SPM tokenizer: merge by the merged token's score, leftmost pair first on ties.

    This is what SentencePiece's BPE model computes, without SentencePiece's checks on the vocabulary (llama.cpp
    and the GGUF files it writes accept duplicate unknown tokens, pieces of any type, missing byte pieces).
    A pair of adjacent characters that no token contains can never be merged across, so the text is cut there
    into independent segments, and each distinct segment is merged once (a cache, as for BPE words).
    """

    def __init__(self, token_ids: Mapping[str, int], scores: list[float], fallback: ByteFallback):
        self._token_ids, self._scores, self._fallback = token_ids, scores, fallback
        self._pairs = {text[k : k + 2] for text in token_ids for k in range(len(text) - 1)}
        self._segment = functools.lru_cache(maxsize=1 << 16)(self._merge)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (spaces already escaped to "▁")."""
        ids: list[int] = []
        pairs, start = self._pairs, 0
        for i in range(1, len(text)):
            if text[i - 1 : i + 1] not in pairs:
                ids += self._segment(text[start:i])
                start = i
        if text:
            ids += self._segment(text[start:])
        return ids

    def _merge(self, text: str) -> list[int]:
        """Merge one segment: symbols are characters, then tokens; a heap of candidate pairs by (-score, left)."""
        n = len(text)
        begin, size = list(range(n)), [1] * n
        prev, next_ = list(range(-1, n - 1)), [*range(1, n), -1]
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            piece = text[begin[left] : begin[left] + size[left] + size[right]]
            token_id = self._token_ids.get(piece)
            if token_id is not None:
                heapq.heappush(heap, (-self._scores[token_id], left, right, len(piece)))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != merged:
                continue  # one side was merged elsewhere since this pair was queued
            size[left], size[right] = merged, 0
            next_[left] = next_[right]
            if next_[right] >= 0:
                prev[next_[right]] = left
            if prev[left] >= 0:
                push(prev[left], left)
            if next_[left] >= 0:
                push(left, next_[left])
        ids: list[int] = []
        i = 0
        while i >= 0:
            piece = text[begin[i] : begin[i] + size[i]]
            token_id = self._token_ids.get(piece)
            ids += [token_id] if token_id is not None else self._fallback.ids(piece)
            i = next_[i]
        return ids


class _CharsMap:
    """SentencePiece's precompiled normalisation map: a double-array trie over UTF-8 bytes plus replacements."""

    def __init__(self, blob: bytes, source: str):
        if len(blob) < 4:
            raise TokenizerError(f"{source}: tokenizer.ggml.precompiled_charsmap is too short for its header")
        trie_bytes = struct.unpack_from("<I", blob)[0]
        if trie_bytes % 4 or 4 + trie_bytes >= len(blob):
            raise TokenizerError(f"{source}: tokenizer.ggml.precompiled_charsmap's trie size {trie_bytes} is invalid")
        self._nodes = struct.unpack_from(f"<{trie_bytes // 4}I", blob, 4)
        self._replacements = blob[4 + trie_bytes :]
        self._source = source

    def _node(self, index: int) -> int:
        if index >= len(self._nodes):
            raise TokenizerError(f"{self._source}: the precompiled charsmap's trie points outside itself")
        return self._nodes[index]

    @staticmethod
    def _base(node: int) -> int:
        return (node >> 10) << ((node & (1 << 9)) >> 6)

    def match(self, data: bytes, start: int) -> tuple[int, bytes] | None:
        """(bytes consumed, replacement) for the longest input prefix at `start` the map rewrites, else None."""
        index = self._base(self._node(0))
        best: tuple[int, int] | None = None
        for pos in range(start, len(data)):
            byte = data[pos]
            if byte == 0:
                break
            index ^= byte
            node = self._node(index)
            if node & ((1 << 31) | 0xFF) != byte:
                break
            index ^= self._base(node)
            if (node >> 8) & 1:  # a leaf: the next node holds the replacement's offset
                best = (pos - start + 1, self._node(index) & ((1 << 31) - 1))
        if best is None:
            return None
        length, offset = best
        end = self._replacements.find(b"\0", offset)
        if offset >= len(self._replacements) or end < 0:
            raise TokenizerError(f"{self._source}: the precompiled charsmap's replacement strings are malformed")
        return length, self._replacements[offset:end]


class Unigram:
    """llama.cpp's UGM tokenizer (T5-style SentencePiece unigram): normalise, then the best-scoring segmentation.

    User-defined tokens score 0 and pass through normalisation untouched; a character no token covers costs
    (lowest token score - 10) and consecutive unknown characters become one <unk>, as SentencePiece does.
    """

    UNKNOWN_PENALTY = 10.0

    def __init__(self, tokens: list[str], scores: list[float], matchable: list[int], normal: set[int],
                 user_defined: set[int], unk_id: int | None, charsmap: bytes | None, options: Mapping[str, bool],
                 source: str):
        if unk_id is None:
            raise TokenizerError(f"{source}: a unigram ('t5') vocabulary needs an unknown token")
        self._unk_id = unk_id
        self._pieces: dict[str, tuple[int, float]] = {}
        for i in matchable:  # the trie keeps the first id of a text, as llama.cpp's insertion order does
            self._pieces.setdefault(tokens[i], (i, 0.0 if i in user_defined else scores[i]))
        self._piece_prefixes = _prefixes(self._pieces)
        normal_scores = [scores[i] for i in normal] or [0.0]
        self._unknown_score = min(normal_scores) - self.UNKNOWN_PENALTY
        self._user_defined = {tokens[i].encode() for i in user_defined}
        self._user_prefixes = _prefixes(self._user_defined)
        self._charsmap = _CharsMap(charsmap, source) if charsmap else None
        self._options = options

    def encode(self, text: str) -> list[int]:
        """Ids of `text`."""
        return self._viterbi(self.normalize(text))

    def normalize(self, text: str) -> str:
        """SentencePiece's normalisation as llama.cpp applies it: charsmap, dummy prefix, space escaping/merging."""
        space = SPACE_ESCAPE.encode() if self._options["escape_whitespaces"] else b" "
        prepend = self._options["add_space_prefix"]
        merge_spaces = self._options["remove_extra_whitespaces"]
        data, out = text.encode("utf-8", "surrogatepass"), bytearray()
        prepended = in_word = False
        offset = 0
        while offset < len(data):
            piece, consumed = self._normalize_prefix(data, offset)
            for byte in piece:
                if byte != 0x20:
                    if not in_word:
                        in_word = True
                        if (prepend and not prepended) or merge_spaces:
                            out += space
                            prepended = True
                    out.append(byte)
                else:
                    in_word = False
                    if not merge_spaces:
                        out += space
            offset += consumed
        return out.decode("utf-8", "replace")

    def _normalize_prefix(self, data: bytes, offset: int) -> tuple[bytes, int]:
        """(normalised bytes, input bytes consumed) at `offset`: a user-defined token, a charsmap rule or a char."""
        best = _longest_match(data, offset, self._user_prefixes, self._user_defined)
        if best:
            return data[offset : offset + best], best
        if self._charsmap is not None:
            rule = self._charsmap.match(data, offset)
            if rule is not None:
                return rule[1], rule[0]
        lead = data[offset]
        width = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4 if lead >> 3 == 30 else 0
        char = data[offset : offset + width] if width else b""
        try:
            char.decode("utf-8")
        except UnicodeDecodeError:
            char = b""
        return (char, width) if char else ("\ufffd".encode(), 1)

    def _viterbi(self, text: str) -> list[int]:
        """The highest-scoring segmentation of the normalised text; runs of unknown characters become one <unk>."""
        n = len(text)
        if n == 0:
            return []
        best: list[tuple[float, int, int]] = [(-math.inf, -1, -1)] * (n + 1)  # (score, token, start)
        best[0] = (0.0, self._unk_id, 0)
        pieces, prefixes = self._pieces, self._piece_prefixes
        for start in range(n):
            score = best[start][0]
            single_char_token = False
            end = start + 1
            while end <= n and text[start:end] in prefixes:
                entry = pieces.get(text[start:end])
                if entry is not None:
                    single_char_token |= end == start + 1
                    if score + entry[1] > best[end][0]:
                        best[end] = (score + entry[1], entry[0], start)
                end += 1
            if not single_char_token and score + self._unknown_score > best[start + 1][0]:
                best[start + 1] = (score + self._unknown_score, self._unk_id, start)
        ids: list[int] = []
        position, previous_unknown = n, False
        while position > 0:
            _, token_id, start = best[position]
            unknown = token_id == self._unk_id
            if not (previous_unknown and unknown):
                ids.append(token_id)
            previous_unknown, position = unknown, start
        return ids[::-1]


def unescape_rwkv(text: str) -> bytes:
    """The bytes of an RWKV token as its GGUF file spells it (\\t, \\n, \\r, \\xNN and \\<char> escapes)."""
    out = bytearray()
    raw = text.encode("utf-8")
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte == 0x5C and i + 1 < len(raw):  # backslash
            code = chr(raw[i + 1])
            if code == "x" and i + 3 < len(raw):
                out.append(int(raw[i + 2 : i + 4], 16))
                i += 4
                continue
            out.append({"t": 9, "n": 10, "r": 13}.get(code, raw[i + 1]))
            i += 2
            continue
        out.append(byte)
        i += 1
    return bytes(out)


class GreedyBytes:
    """llama.cpp's RWKV tokenizer: at each position the longest token that matches the UTF-8 bytes."""

    def __init__(self, tokens: list[str], unk_id: int | None, source: str):
        self._ids: dict[bytes, int] = {}
        for i, text in enumerate(tokens):
            try:
                self._ids.setdefault(unescape_rwkv(text), i)
            except ValueError:
                raise TokenizerError(f"{source}: RWKV token {i} {text!r} has a malformed \\x escape") from None
        self._prefixes = _prefixes(self._ids)
        self._unk_id, self._source = unk_id, source

    def encode(self, text: str) -> list[int]:
        """Ids of `text`."""
        data, ids, position = text.encode("utf-8", "surrogatepass"), [], 0
        while position < len(data):
            best = _longest_match(data, position, self._prefixes, self._ids)
            if best:
                ids.append(self._ids[data[position : position + best]])
                position += best
                continue
            if self._unk_id is None:
                raise TokenizerError(f"{self._source}: no token matches byte 0x{data[position]:02X} and there is no <unk>")
            ids.append(self._unk_id)
            position += 1
        return ids


class Plamo2:
    """llama.cpp's PLaMo-2 tokenizer: the segmentation of least total cost, cost = -round(score * 1e4) per token.

    A character no token starts with costs 1e7 and is spelt in byte tokens; among equal costs the longest
    token wins. A leading byte-order mark is dropped.
    """

    UNKNOWN_COST = 10_000_000

    def __init__(self, tokens: list[str], scores: list[float], byte_tokens: list[int], source: str):
        bytes_by_value = {}
        for i in byte_tokens:
            text = tokens[i]
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                bytes_by_value[int(text[3:5], 16)] = i
        missing = [b for b in range(256) if b not in bytes_by_value]
        if missing:
            raise TokenizerError(f"{source}: a PLaMo-2 vocabulary needs all 256 byte tokens; <0x{missing[0]:02X}> is missing")
        self._byte_ids = [bytes_by_value[b] for b in range(256)]
        byte_set = set(byte_tokens)
        self._costs = {
            text: (i, -_round_half_away(scores[i] * 1e4))
            for i, text in enumerate(tokens) if i not in byte_set and math.isfinite(scores[i])
        }
        self._prefixes = _prefixes(self._costs)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`."""
        text = text.removeprefix("\ufeff")
        n = len(text)
        cost = [0] * (n + 1)
        choice: list[tuple[int, int]] = [(0, -1)] * n  # (length, token id; -1 for an unknown character)
        for start in range(n - 1, -1, -1):
            candidates, end = [], start + 1
            while end <= n and text[start:end] in self._prefixes:
                if text[start:end] in self._costs:
                    candidates.append(end)
                end += 1
            best, best_choice = 1 << 60, (1, -1)
            for end in reversed(candidates):  # longest first: on equal cost the longer token stays
                token_id, token_cost = self._costs[text[start:end]]
                if cost[end] + token_cost < best:
                    best, best_choice = cost[end] + token_cost, (end - start, token_id)
            if cost[start + 1] + self.UNKNOWN_COST < best:
                best, best_choice = cost[start + 1] + self.UNKNOWN_COST, (1, -1)
            cost[start], choice[start] = best, best_choice
        ids, position = [], 0
        while position < n:
            length, token_id = choice[position]
            if token_id >= 0:
                ids.append(token_id)
            else:
                ids += [self._byte_ids[b] for b in text[position].encode("utf-8", "surrogatepass")]
            position += length
        return ids


def _round_half_away(value: float) -> int:
    """C's round(): halves go away from zero (Python's round() goes to even)."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


def unbyte(text: str) -> bytes:
    """A byte-level token's bytes; characters outside GPT-2's map are kept as UTF-8, as llama.cpp does."""
    return b"".join(bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE else c.encode() for c in text)
