"""Dequant-matmul kernels against the memory roofline and against torch, on the same shapes in one run.

    python benchmarks/kernels.py              # on a CUDA GPU
    python benchmarks/kernels.py --json
    python benchmarks/kernels.py --dry-run    # the harness on tiny shapes, on the CPU (Triton interpreter)

For every format (q4_0, q4_1, q8_0) and weight shape (K x N, as "in x out") it times kilnlm's kernel at
M = 1 (decode: reported as GB/s of weight bytes read and as a share of the device's copy bandwidth,
measured in the same run) and at M = 2048 (prefill: TFLOP/s, and the ratio to torch's fp16 matmul). Beside
it, on the same shapes: torch fp16 `matmul`, and torch's own int4 kernel (`aten._weight_int4pack_mm`, as
gpt-fast uses it) where this torch build has it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (2048, 8192), (8192, 2048)]  # (K, N)
DRY_SHAPES = [(64, 40), (96, 72)]
FORMATS = ("q4_0", "q4_1", "q8_0")


def _int4_baseline(x, w, timer, repeats):
    """torch's int4 weight-only matmul (gpt-fast's path) on the same shape, or the reason it cannot run."""
    import torch

    try:
        n, k = w.shape
        groupsize, inner_k_tiles = 32, 8
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device=w.device)
        packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8),
                                                            inner_k_tiles)
        scales_zeros = torch.ones(k // groupsize, n, 2, dtype=torch.bfloat16, device=w.device)
        xb = x.to(torch.bfloat16)
        return timer(lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, groupsize, scales_zeros), repeats)
    except (RuntimeError, AttributeError, TypeError) as err:  # not in every torch build / device
        return f"n/a ({str(err).splitlines()[0][:60]})"


def run(dry_run: bool) -> list[dict]:
    """Time every kernel and baseline; return one row per (format, shape, M)."""
    import torch

    from kilnlm.kernels.dequant_matmul import dequant_matmul, pack_for_kernel
    from kilnlm.quant.formats import get_format
    from kilnlm.runtime.bench import measure_bandwidth, median_timer

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float32 if dry_run else torch.float16
    timer, repeats = median_timer(device), (1 if dry_run else 20)
    bandwidth = measure_bandwidth(device, megabytes=16 if dry_run else 1024)
    rows = []
    for k, n in DRY_SHAPES if dry_run else SHAPES:
        w = torch.randn(n, k) * 0.02
        w_dev = w.to(device, dtype)
        for m in (1, 33) if dry_run else (1, 2048):
            x = torch.randn(m, k, device=device, dtype=dtype)
            torch_s = timer(lambda: x @ w_dev.t(), repeats)
            int4_s = None if dry_run else _int4_baseline(x, w_dev, timer, repeats)
            for fmt in FORMATS:
                pw = pack_for_kernel(get_format(fmt).quantize(w), fmt, (n, k)).to(device)
                weight_bytes = sum(t.numel() * t.element_size() for t in (pw.qweight, pw.scales, pw.mins) if t is not None)
                ours_s = timer(lambda: dequant_matmul(x, pw), repeats)
                rows.append({
                    "format": fmt, "K": k, "N": n, "M": m, "seconds": ours_s,
                    "GB_per_s": weight_bytes / ours_s / 1e9, "share_of_copy_bandwidth": weight_bytes / ours_s / 1e9 / bandwidth,
                    "TFLOP_per_s": 2 * m * n * k / ours_s / 1e12, "torch_fp16_seconds": torch_s,
                    "speedup_vs_torch_fp16": torch_s / ours_s,
                    "torch_int4_seconds": int4_s, "copy_bandwidth_GB_per_s": bandwidth,
                })
    return rows


def main() -> None:
    """Parse arguments, run, print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
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
    print(f"copy bandwidth {rows[0]['copy_bandwidth_GB_per_s']:.0f} GB/s"
          + ("  (dry run on the CPU: the figures mean nothing)" if args.dry_run else ""))
    print(f"{'fmt':<5} {'K':>6} {'N':>6} {'M':>5} {'us':>9} {'GB/s':>8} {'%copy':>6} {'TFLOP/s':>8} {'vs fp16':>8} {'int4 us':>9}")
    for r in rows:
        int4 = r["torch_int4_seconds"]
        int4_text = f"{int4 * 1e6:9.1f}" if isinstance(int4, float) else f"{'n/a':>9}"
        print(f"{r['format']:<5} {r['K']:>6} {r['N']:>6} {r['M']:>5} {r['seconds'] * 1e6:9.1f} {r['GB_per_s']:8.1f} "
              f"{100 * r['share_of_copy_bandwidth']:5.1f}% {r['TFLOP_per_s']:8.2f} {r['speedup_vs_torch_fp16']:8.2f} {int4_text}")


if __name__ == "__main__":
    main()
