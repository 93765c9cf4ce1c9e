"""Environment variables set for the length of a block, then put back as they were."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def temporarily(values: dict[str, str]):
    """Set `values` in os.environ for the block (child processes started in it inherit them); restore
    each variable afterwards, removing those that were not set. Process-wide: not for threads that
    need different values at once."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def machine_kind() -> str:
    """The CPU features that decide which kernels torch and its BLAS (MKL) run, e.g.
    `x86_64 AVX512 amx_bf16 amx_tile avx2 avx512_bf16 ... fma`. Bit-exact reproduction is promised on
    the same kind only: on the default grid pipeline, MKL's code path alone (MKL_CBWR) moves high
    quality between 0.93 and 0.96 (docs/reproducibility.md)."""
    import platform

    import torch

    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("flags"):
                flags = {f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma"))}
                break
    return " ".join([platform.machine(), torch.backends.cpu.get_cpu_capability(), *sorted(flags)])
