"""Open any supported model source by what it is (a GGUF file or an HF folder), never by its name."""

from __future__ import annotations

from pathlib import Path

from kilnlm.errors import CheckpointError
from kilnlm.export.gguf_file import MAGIC


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False):
    """An HFCheckpoint for a folder, a GGUFCheckpoint for a file that starts with the GGUF magic."""
    path = Path(path)
    if path.is_dir():
        from kilnlm.export.hf import open_hf_checkpoint

        return open_hf_checkpoint(path, allow_pickle=allow_pickle)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == MAGIC:
        from kilnlm.export.gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    raise CheckpointError(
        f"{path}: not a GGUF file (it starts with {magic!r}) and not a Hugging Face checkpoint folder"
    )


def open_tokenizer(path: str | Path):
    """Just the tokenizer of an HF folder or a GGUF file (vocab-only GGUF files included)."""
    path = Path(path)
    if path.is_dir():
        from kilnlm.runtime.tokenizer import Tokenizer

        return Tokenizer.from_hf_folder(path)
    from kilnlm.export.gguf_file import GGUFFile
    from kilnlm.runtime.gguf_tokenizer import tokenizer_from_gguf

    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return tokenizer_from_gguf(GGUFFile(path).metadata, str(path))
