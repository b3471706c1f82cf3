"""Readers and writers for checkpoint formats (Hugging Face folders now; GGUF and ONNX later)."""
