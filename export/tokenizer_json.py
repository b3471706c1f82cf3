"""tokenizer.json (the `tokenizers` library's format, which onnxruntime-genai needs) for a SentencePiece BPE
vocabulary, built without transformers.

A Llama-style SentencePiece BPE model is a byte-fallback BPE over "▁"-for-space text with a "▁" prefix:
- vocab: every piece with its id; BPE merges rebuilt from the pieces' scores (SentencePiece merges the
  highest-scoring pair first; every piece that is the concatenation of two pieces is the merge of the split
  with the lowest ids, ranked by the piece's score), as transformers' SentencePiece converter does;
- normalizer: squeeze spaces when the model says so (remove_extra_whitespaces), prepend "▁"
  (add_dummy_prefix) and replace spaces by "▁"; decoder the inverse, with byte
  fallback for <0xNN> pieces; control pieces (<s>, </s>) are special tokens.
"""

from __future__ import annotations

from kilnlm.errors import TokenizerError
from kilnlm.runtime.gguf_vocab import GGUFVocab, TokenType

SPACE = "\u2581"  # SentencePiece's "▁"


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score order: for each piece (best score first), its splits into
    two pieces, lowest ids first."""
    ids = {piece: i for i, piece in enumerate(tokens)}
    ranked = sorted(range(len(tokens)), key=lambda i: -scores[i])
    merges = []
    for index in ranked:
        piece = tokens[index]
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        merges += sorted(splits, key=lambda pair: (ids[pair[0]], ids[pair[1]]))
    return merges


def tokenizer_json(tokenizer) -> str:
    """tokenizer.json text for a kilnlm Tokenizer with a SentencePiece BPE model (an HF tokenizer.model or a GGUF
    'llama' vocabulary)."""
    from dataclasses import replace

    from kilnlm.runtime.gguf_vocab import gguf_vocab_from_tokenizer, spm_whitespace_rules

    rules = spm_whitespace_rules(tokenizer)
    if rules is None:
        raise TokenizerError(f"{tokenizer.source}: tokenizer.json can be written for SentencePiece BPE vocabularies "
                             "only; copy the source's own tokenizer.json instead")
    vocab = gguf_vocab_from_tokenizer(tokenizer)
    return spm_tokenizer_json(replace(vocab, add_space_prefix=rules[0], remove_extra_whitespaces=rules[1]))


def spm_tokenizer_json(vocab: GGUFVocab) -> str:
    """tokenizer.json text for a SentencePiece BPE ("llama") vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    if vocab.model != "llama" or vocab.scores is None:
        raise TokenizerError(f"tokenizer.json can be written for SentencePiece BPE vocabularies, not {vocab.model!r}")
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    model = models.BPE(vocab={piece: i for i, piece in enumerate(vocab.tokens)},
                       merges=spm_merges(vocab.tokens, vocab.scores), unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    steps = [normalizers.Replace(" ", SPACE)]
    if vocab.add_space_prefix is not False:
        steps.insert(0, normalizers.Prepend(SPACE))
    if vocab.remove_extra_whitespaces:  # SentencePiece's option: no leading, trailing or repeated spaces
        steps[:0] = [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip(left=True, right=True)]
    tokenizer.normalizer = normalizers.Sequence(steps)
    strip = [decoders.Strip(" ", 1, 0)] if vocab.add_space_prefix is not False else []
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *strip])
    special = [piece for piece, kind in zip(vocab.tokens, vocab.token_types, strict=True)
               if kind in (TokenType.CONTROL, TokenType.UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in special])
    return tokenizer.to_str(pretty=True)
