"""Golden output of a real trained model: stories260K must write Karpathy's published greedy story."""

from __future__ import annotations

from kilnlm.runtime.engine import Engine


def test_stories260k_hf_greedy_from_bos_reproduces_published_text(shared_dir):
    engine = Engine.load(shared_dir / "checkpoints/stories260K-hf", progress=False)
    expected = (shared_dir / "checkpoints/stories260K-llamacpp/expected_greedy_t0.txt").read_text()
    # llama2.c's 256 "steps" are 256 sampled tokens after BOS; its printf adds the final newline.
    text = engine.generate([engine.tokenizer.bos_id], max_tokens=256, temperature=0, ignore_eos=True)
    assert text == expected.rstrip("\n")
    assert engine.last_stats.generated_tokens == 256
