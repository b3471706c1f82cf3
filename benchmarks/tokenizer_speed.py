"""Tokenizing speed of GGUF vocabularies against HF `tokenizers` on the same vocabulary and text.

    python benchmarks/tokenizer_speed.py ../shared/llama.cpp-vocab/ggml-vocab-llama-bpe.gguf \\
        --text ../shared/text/wikitext-2/test.txt

For a byte-level BPE vocabulary ("gpt2") the peer is the tokenizer.json transformers would hold for it: the
same tokens, merges and added tokens, the pre-tokenizer's regexes as Split steps and GPT-2's ByteLevel map.
For a SentencePiece vocabulary ("llama") the peer is sentencepiece itself, on the model rebuilt from the file.
Both sides tokenize the whole text as one string, best of --repeat runs on fresh tokenizers; the ids are compared too, so a fast
but wrong tokenizer shows up here. Prints seconds, MB/s and the ratio (kilnlm / peer; lower is better).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kilnlm.export.gguf_file import GGUFFile
from kilnlm.runtime.gguf_tokenizer import tokenizer_from_gguf
from kilnlm.runtime.gguf_vocab import TokenType, read_gguf_vocab
from kilnlm.runtime.pretokenizers import pre_tokenizer


def bpe_peer(metadata: dict, source: str):
    """An HF `tokenizers` Tokenizer holding the GGUF file's byte-level BPE vocabulary."""
    import tokenizers

    vocab = read_gguf_vocab(metadata, source)
    pre = pre_tokenizer(vocab.pre or "default", source)
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in pre.regexes]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": vocab.token_types[i] == TokenType.CONTROL}
             for i, t in enumerate(vocab.tokens) if vocab.token_types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    data = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            *splits, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                            "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre.ignore_merges, "vocab": {t: i for i, t in enumerate(vocab.tokens)},
                  "merges": [m.split(" ", 1) for m in vocab.merges]},
    }
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def spm_peer(metadata: dict, source: str):
    """sentencepiece on a ModelProto rebuilt from the file (needs the protobuf package)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = read_gguf_vocab(metadata, source)
    proto = pb.ModelProto()
    for text, score, kind in zip(vocab.tokens, vocab.scores, vocab.token_types):
        proto.pieces.add(piece=text, score=score, type=kind)
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return sp.encode


def best_of(make, text: str, repeat: int) -> tuple[float, list[int]]:
    """Fastest of `repeat` runs, each on a freshly built tokenizer (no warm word caches), and the ids."""
    times, ids = [], None
    for _ in range(repeat):
        fn = make()
        start = time.perf_counter()
        ids = fn(text)
        times.append(time.perf_counter() - start)
    return min(times), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path, help="a GGUF file (a vocab-only one is enough)")
    parser.add_argument("--text", type=Path, required=True, help="UTF-8 text to tokenize")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    metadata = GGUFFile(args.gguf).metadata
    text = args.text.read_text(encoding="utf-8")
    start = time.perf_counter()
    tokenizer_from_gguf(metadata, str(args.gguf))
    load = time.perf_counter() - start
    model = metadata["tokenizer.ggml.model"]
    peers = {"gpt2": ("tokenizers", bpe_peer), "llama": ("sentencepiece", spm_peer)}
    if model not in peers:
        raise SystemExit(f"no peer for tokenizer.ggml.model {model!r}")
    peer_name, make_peer = peers[model]

    def make_ours():
        tokenizer = tokenizer_from_gguf(metadata, str(args.gguf))
        return lambda t: tokenizer.encode(t, add_bos=False)

    our_s, our_ids = best_of(make_ours, text, args.repeat)
    peer_s, peer_ids = best_of(lambda: make_peer(metadata, str(args.gguf)), text, args.repeat)
    mb = len(text.encode()) / 1e6
    print(f"{args.gguf.name}: {mb:.2f} MB, {len(our_ids)} tokens, kilnlm load {load:.2f} s")
    print(f"  kilnlm        {our_s:7.3f} s  {mb / our_s:6.2f} MB/s")
    print(f"  {peer_name:13s} {peer_s:7.3f} s  {mb / peer_s:6.2f} MB/s")
    print(f"  ratio kilnlm/{peer_name} {our_s / peer_s:.2f}; same ids: {our_ids == peer_ids}")


if __name__ == "__main__":
    main()
