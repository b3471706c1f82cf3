"""Runtime: model config, reference models, caches, tokenizer, sampling, generation and the Engine API."""
