"""Where a run executes: device, mixed precision and the torchrun process group.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1 in the environment) the process group is
initialised from torchrun's env vars: gloo on CPU, nccl on CUDA (one GPU per local rank). Everything else
in ``training/`` asks this object for its rank rather than reading the environment again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceContext:
    """Device, autocast dtype (``None``: fp32) and this process's place in the process group."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, bundles, reports and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def amp_name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes (identity when not distributed)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def max(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> tuple[float, str]:
        """``(MiB, kind)``: CUDA max allocated since the last reset, else the process's peak RSS (lifetime)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"  # Linux: KiB


def _resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        if amp not in ("auto", "none"):
            log.warning("amp=%s ignored: mixed precision is for CUDA, CPU runs train in fp32", amp)
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


@contextlib.contextmanager
def device_context(device: str = "auto", amp: str = "auto") -> Iterator[DeviceContext]:
    """Set up the device and, under torchrun, the process group; tear the group down on exit."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available on this machine")
    if use_cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    rank = 0
    if world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend)
        rank = dist.get_rank()
        log.info("process group up backend=%s rank=%d world_size=%d", backend, rank, world_size)
    try:
        yield DeviceContext(dev, _resolve_amp(amp, dev), rank, world_size)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
