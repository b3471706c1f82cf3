"""Attention kernels against torch and the memory roofline, on the same shapes in one run.

    python benchmarks/attention.py              # on a CUDA GPU
    python benchmarks/attention.py --json
    python benchmarks/attention.py --dry-run    # the harness on tiny shapes, on the CPU (Triton interpreter)

Prefill: kilnlm's FlashAttention (causal, GQA 32 query / 8 kv heads, head_dim 128, fp16) against torch SDPA
with the flash backend on the same tensors, at 2k-16k tokens: TFLOP/s (causal: half the square) and the
ratio. Decode: one query per sequence over 4k / 32k / 128k cached positions held in 16-position pages, with
f16, q8_0 and q4_0 keys and values: GB/s of K/V bytes read, the share of the device's copy bandwidth
(measured in the same run), and the speedup over the f16 cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
PREFILL_TOKENS = (2048, 4096, 8192, 16384)
DECODE_POSITIONS = (4096, 32768, 131072)
DRY = {"heads": 4, "kv_heads": 2, "head_dim": 64, "prefill": (40,), "decode": (64, 200)}
KV_TYPES = (None, "q8_0", "q4_0")  # None: the model dtype (f16)


def _prefill_rows(device, dtype, timer, repeats, heads, kv_heads, head_dim, lengths):
    import torch
    import torch.nn.functional as F

    from kilnlm.kernels.attention import attention_triton

    rows = []
    for tokens in lengths:
        q = torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype)
        k = torch.randn(1, kv_heads, tokens, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        ours = timer(lambda: attention_triton(q, k, v), repeats)
        backend = torch.nn.attention.SDPBackend.FLASH_ATTENTION if device.type == "cuda" else \
            torch.nn.attention.SDPBackend.MATH
        with torch.nn.attention.sdpa_kernel(backend):
            theirs = timer(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), repeats)
        flops = 2 * 2 * heads * tokens * tokens * head_dim / 2  # QK^T and PV, causal half
        rows.append({"kind": "prefill", "tokens": tokens, "seconds": ours, "TFLOP_per_s": flops / ours / 1e12,
                     "sdpa_seconds": theirs, "ratio_vs_sdpa": theirs / ours})
    return rows


def _decode_rows(device, dtype, timer, repeats, bandwidth, heads, kv_heads, head_dim, positions):
    import torch

    from kilnlm.kernels.decode_attention import decode_attention_triton
    from kilnlm.quant.formats import get_format

    rows = []
    for length in positions:
        pages = -(-length // PAGE)
        table = torch.arange(pages, dtype=torch.int32, device=device)[None]
        lens = torch.tensor([length], dtype=torch.int32, device=device)
        q = torch.randn(1, heads, head_dim, device=device, dtype=dtype)
        f16_seconds = None
        for kv in KV_TYPES:
            pools = []
            for _ in range(2):
                pool = torch.randn(pages, kv_heads, PAGE, head_dim, device=device)
                pools.append(get_format(kv).quantize(pool) if kv else pool.to(dtype))
            kv_bytes = sum(p.numel() * p.element_size() for p in pools)
            seconds = timer(lambda pools=pools, kv=kv: decode_attention_triton(q, *pools, table, lens, kv, kv), repeats)
            f16_seconds = f16_seconds or seconds
            rows.append({"kind": "decode", "positions": length, "kv_type": kv or "f16", "seconds": seconds,
                         "GB_per_s": kv_bytes / seconds / 1e9, "share_of_copy_bandwidth": kv_bytes / seconds / 1e9 / bandwidth,
                         "speedup_vs_f16": f16_seconds / seconds, "copy_bandwidth_GB_per_s": bandwidth})
    return rows


def run(dry_run: bool) -> list[dict]:
    """Time every case; one row per (kind, size, KV type)."""
    import torch

    from kilnlm.runtime.bench import measure_bandwidth, median_timer

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float32 if dry_run else torch.float16
    timer, repeats = median_timer(device), (1 if dry_run else 20)
    bandwidth = measure_bandwidth(device, megabytes=16 if dry_run else 1024)
    shape = (DRY["heads"], DRY["kv_heads"], DRY["head_dim"]) if dry_run else (HEADS, KV_HEADS, HEAD_DIM)
    prefill = DRY["prefill"] if dry_run else PREFILL_TOKENS
    decode = DRY["decode"] if dry_run else DECODE_POSITIONS
    return [*_prefill_rows(device, dtype, timer, repeats, *shape, prefill),
            *_decode_rows(device, dtype, timer, repeats, bandwidth, *shape, decode)]


def main() -> None:
    """Parse arguments, run, print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of tables")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are defined in this mode
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --dry-run to check the harness on the CPU")
    rows = run(args.dry_run)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if args.dry_run:
        print("dry run on the CPU: the figures mean nothing")
    print(f"{'prefill':<8} {'tokens':>7} {'ms':>9} {'TFLOP/s':>8} {'SDPA ms':>9} {'vs SDPA':>8}")
    for r in (r for r in rows if r["kind"] == "prefill"):
        print(f"{'':<8} {r['tokens']:>7} {r['seconds'] * 1e3:9.3f} {r['TFLOP_per_s']:8.2f} "
              f"{r['sdpa_seconds'] * 1e3:9.3f} {r['ratio_vs_sdpa']:8.2f}")
    decode = [r for r in rows if r["kind"] == "decode"]
    print(f"decode (copy bandwidth {decode[0]['copy_bandwidth_GB_per_s']:.0f} GB/s)")
    print(f"{'KV':<8} {'positions':>9} {'us':>9} {'GB/s':>8} {'%copy':>6} {'vs f16':>7}")
    for r in decode:
        print(f"{r['kv_type']:<8} {r['positions']:>9} {r['seconds'] * 1e6:9.1f} {r['GB_per_s']:8.1f} "
              f"{100 * r['share_of_copy_bandwidth']:5.1f}% {r['speedup_vs_f16']:7.2f}")


if __name__ == "__main__":
    main()
