"""`kiln inspect`: what a GGUF file holds, as a dict (for --json) and as a readable table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kilnlm.export.gguf_file import GGUFFile

LONG_ARRAY = 8  # arrays longer than this (token lists, merges) are summarised by their length


def _summarise(value: Any) -> Any:
    if isinstance(value, list) and len(value) > LONG_ARRAY:
        return f"[{len(value)} items: {', '.join(repr(v) for v in value[:3])}, ...]"
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """Metadata (long arrays summarised), the tensor table and totals of a GGUF file."""
    gguf_file = GGUFFile(path)
    tensors = [
        {"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.nbytes}
        for t in gguf_file.tensors.values()
    ]
    parameters = sum(math.prod(t["shape"]) for t in tensors)
    file_bytes = Path(path).stat().st_size
    return {
        "file": str(path),
        "version": gguf_file.version,
        "file_bytes": file_bytes,
        "parameters": parameters,
        "bits_per_weight": file_bytes * 8 / parameters if parameters else None,
        "metadata": {key: _summarise(value) for key, value in gguf_file.metadata.items()},
        "tensors": tensors,
        "loadable_by": _runtimes(gguf_file),
    }


def _runtimes(gguf_file: GGUFFile) -> list[str]:
    """Which runtimes can load the file: kilnlm-specific schemes (LLM.int8) need kilnlm."""
    if gguf_file.metadata.get("kilnlm.quantization.scheme") == "llm.int8":
        return ["kilnlm (LLM.int8 int8 codes + fp16 outlier columns; llama.cpp and ollama cannot load it)"]
    return ["kilnlm", "llama.cpp", "ollama"]


def format_description(description: dict[str, Any]) -> str:
    """The description as text: metadata lines, a tensor table, totals."""
    lines = [f"{description['file']}: GGUF v{description['version']}, {description['file_bytes'] / 2**20:.2f} MiB"]
    lines += [f"  {key} = {value}" for key, value in description["metadata"].items()]
    name_width = max((len(t["name"]) for t in description["tensors"]), default=4)
    lines.append(f"\n  {'tensor':<{name_width}}  {'type':<6}  {'shape':<20}  bytes")
    for t in description["tensors"]:
        shape = "x".join(str(d) for d in t["shape"])
        lines.append(f"  {t['name']:<{name_width}}  {t['type']:<6}  {shape:<20}  {t['bytes']}")
    bpw = description["bits_per_weight"]
    lines.append(f"\n{len(description['tensors'])} tensors, {description['parameters'] / 1e6:.3f}M parameters"
                 + (f", {bpw:.2f} bits per weight" if bpw else ""))
    lines.append(f"loadable by: {', '.join(description['loadable_by'])}")
    return "\n".join(lines)
