"""kilnlm: an on-device quantized LLM runtime (HF/GGUF in, GGUF/ONNX out, Triton kernels on GPU)."""

from kilnlm.errors import KilnError

__version__ = "0.1.0"
__all__ = ["Engine", "Grammar", "KilnError", "__version__"]


def __getattr__(name: str):
    # Engine pulls in torch; importing it lazily keeps `import kilnlm` cheap for tools like the CLI's --help.
    if name == "Engine":
        from kilnlm.runtime.engine import Engine

        return Engine
    if name == "Grammar":
        from kilnlm.runtime.grammar import Grammar

        return Grammar
    raise AttributeError(f"module 'kilnlm' has no attribute {name!r}")
