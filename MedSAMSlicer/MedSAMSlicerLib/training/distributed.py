"""One process or many (``torchrun``) behind one interface: the process group, collective checks, teardown."""

from __future__ import annotations

import os

import torch
import torch.distributed


class Distributed:
    """The process group (torchrun) or a single process, behind one interface."""

    def __init__(self) -> None:
        self.owns_group = False
        env = os.environ
        self.enabled = "WORLD_SIZE" in env and "RANK" in env and "MASTER_ADDR" in env
        self.rank = int(env.get("RANK", 0)) if self.enabled else 0
        self.world = int(env.get("WORLD_SIZE", 1)) if self.enabled else 1
        self.local_rank = int(env.get("LOCAL_RANK", 0)) if self.enabled else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, device_name: str) -> torch.device:
        from ..models.devices import select_device

        if not self.enabled:
            return select_device(device_name)
        import torch.distributed as dist

        if device_name in ("auto", "cuda") and torch.cuda.is_available():
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        else:
            device = select_device(device_name)
            if device.type == "mps":
                device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        return device

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective)."""
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def teardown(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False
