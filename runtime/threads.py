"""CPU thread counts: the default (physical cores this process may run on) and torch's setting during a call."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (SMT siblings share one core's FMA units, so decode gains
    nothing from them); the usable CPU count where the topology is unknown."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in usable:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(usable))
    return max(1, len(cores))


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside the block and restored after (None: left alone).

    torch keeps one process-wide count, so other threads of the process see it too while the block runs."""
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
