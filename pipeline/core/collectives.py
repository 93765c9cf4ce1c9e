"""What workers exchange over the process group, with the device rules of NCCL kept everywhere.

Free of Ray: Ray Train's workers (`pipeline.ray.distributed`) and the GPU check
(`benchmarks/gpu_check.py`, plain `torch.distributed`) use the same code. A NCCL process group
takes CUDA tensors only ("No backend type associated with device type cpu"), so every tensor a
collective sees is built on the worker's `device`; gloo (CPU) takes CPU tensors, which is what
`device` is there.
"""

from __future__ import annotations

from typing import Any

import torch


def on_device(t: torch.Tensor, device: torch.device) -> bool:
    """`t` is on `device` ("cuda" matches any CUDA index; "cuda:1" only that one)."""
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


class Collectives:
    """Means and gathers over `world` workers; every collective tensor lives on `device`.

    `dist` is `torch.distributed` (a test passes a recorder that checks each tensor's device).
    """

    def __init__(self, world: int, device: torch.device | str, dist: Any = None):
        if dist is None:
            import torch.distributed as dist
        self.world, self.device, self.dist = world, torch.device(device), dist

    def _all_reduce(self, t: torch.Tensor) -> None:
        if not on_device(t, self.device):  # the NCCL rule, checked on CPU too, where gloo would not mind
            raise RuntimeError(f"collective on a {t.device} tensor; this worker's collectives run on {self.device}")
        self.dist.all_reduce(t)

    def mean_in_place(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the workers: one all-reduce for the lot."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self._all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def sync_grads(self, module: torch.nn.Module) -> None:
        """Average `.grad` of `module` across workers (the loop's `Hooks.sync_grads`)."""
        self.mean_in_place([p.grad for p in module.parameters() if p.grad is not None])

    def average_buffers(self, module: torch.nn.Module | None) -> None:
        """Average floating-point buffers (batch-norm running mean/var) across workers.

        On CPU (gloo) batch norm normalises with each worker's own slice of the batch (torch's
        SyncBatchNorm needs GPUs); its running statistics are averaged here so that workers agree.
        """
        if module is not None:
            self.mean_in_place([b for b in module.buffers() if b.is_floating_point()])

    def mean_values(self, values: list[float]) -> torch.Tensor:
        """The workers' mean of each value, as a float64 tensor on `device` (no host copy)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._all_reduce(t)
        return t / self.world

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """The workers' mean of each logged value (the loop's `Hooks.reduce_stats`)."""
        keys = sorted(stats)
        return dict(zip(keys, self.mean_values([stats[k] for k in keys]).tolist()))

    def gather(self, value: Any) -> list[Any]:
        """Every worker's `value` (picklable), in rank order. On NCCL, torch moves the pickled bytes
        through the current CUDA device, which Ray Train and the GPU check set for each worker."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, value)
        return out
