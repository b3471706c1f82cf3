"""Quantization: format registry and algorithms (RTN, GPTQ, LLM.int8) arrive with their issues."""
