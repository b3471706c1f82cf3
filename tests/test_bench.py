"""kiln bench: the harness runs anywhere (--dry-run) and its roofline arithmetic is right."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from kilnlm.runtime import bench


def test_dry_run_reports_every_figure_as_json():
    result = subprocess.run([sys.executable, "-m", "kilnlm.cli", "bench", "--dry-run", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["device"] == "cpu" and report["prompt_tokens"] == 32 and report["new_tokens"] == 8
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "bandwidth_gb_per_s", "roofline_tokens_per_s"):
        assert report[key] > 0
    assert report["roofline_share"] == pytest.approx(report["decode_tokens_per_s"] / report["roofline_tokens_per_s"])


def test_weight_bytes_count_what_decode_reads():
    config = bench.synthetic_config("tiny")
    model = bench.synthetic_model(config, torch.device("cpu"), torch.float16)
    params = sum(p.numel() for p in model.parameters())
    # Tied embeddings are also the output projection, so the whole table is read for every token.
    assert bench.weight_bytes_per_token(model) == params * 2 + model.rotary.inv_freq.numel() * 4
    untied = bench.synthetic_model(bench.synthetic_config("tiny").__class__(
        **{**config.__dict__, "tie_word_embeddings": False}), torch.device("cpu"), torch.float16)
    table = untied.embed_tokens.weight.numel() * 2
    assert bench.weight_bytes_per_token(untied) == sum(p.numel() for p in untied.parameters()) * 2 \
        + untied.rotary.inv_freq.numel() * 4 - table


def test_synthetic_shapes_are_real_llama_sizes():
    one_b, eight_b = bench.synthetic_config("llama-1b"), bench.synthetic_config("llama-8b")
    assert (one_b.hidden_size, one_b.num_layers, one_b.num_kv_heads) == (2048, 16, 8)
    assert (eight_b.hidden_size, eight_b.num_layers, eight_b.intermediate_size) == (4096, 32, 14336)
    with pytest.raises(ValueError, match="unknown shape"):
        bench.synthetic_config("llama-70b")


def test_kernel_benchmark_dry_run_times_every_format_and_shape():
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--dry-run", "--json"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {r["format"] for r in rows} == {"q4_0", "q4_1", "q8_0"} and {r["M"] for r in rows} == {1, 33}
    assert all(r["seconds"] > 0 and r["GB_per_s"] > 0 for r in rows)


def test_attention_benchmark_dry_run_covers_prefill_and_every_kv_type():
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention.py"), "--dry-run", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    prefill = [r for r in rows if r["kind"] == "prefill"]
    decode = [r for r in rows if r["kind"] == "decode"]
    assert prefill and all(r["seconds"] > 0 and r["sdpa_seconds"] > 0 for r in prefill)
    assert {r["kv_type"] for r in decode} == {"f16", "q8_0", "q4_0"} and {r["positions"] for r in decode} == {64, 200}
    assert all(r["GB_per_s"] > 0 for r in decode)
