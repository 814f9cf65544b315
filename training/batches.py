"""From dataset splits to batches: preprocessing, seeded sharded batch order, cached backbone features.

Images go through :func:`repadapter.preprocess.build_transform` with the task's
:class:`~repadapter.PreprocessConfig`, the exact function the service applies to requests, so the model
never sees a pixel pipeline at training time that it will not see at serving time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from .device import DeviceContext

Sample = tuple[Image.Image, int]


class Transformed(Dataset[tuple[Tensor, int]]):
    """A split whose PIL images are preprocessed on access: ``(x [3, H, W] float32, label)``."""

    def __init__(self, dataset: Dataset[Sample], transform: Callable[[Image.Image], Tensor]) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.dataset[i]
        return self.transform(image), label


def labels_of(dataset: Dataset) -> Tensor:
    """Labels ``[N]`` (int64) of a split without decoding images (``training.data`` splits keep them)."""
    inner = dataset.dataset if isinstance(dataset, Transformed) else dataset
    labels = getattr(inner, "labels", None)
    if labels is None:
        labels = [inner[i][1] for i in range(len(inner))]  # type: ignore[arg-type]
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches from a seeded per-epoch permutation, each cut into this rank's share.

    Every rank steps through the same global batches a single process would draw, so a torchrun run with
    the same ``--batch-size`` follows the same optimisation path (up to dropout masks and summation
    order). The order depends only on ``(seed, epoch)``: resuming at an epoch boundary needs no sampler
    state. A trailing batch too small to give every rank one sample is dropped (no rank idles in a step).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the {world_size} processes")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.world_size:
                break
            yield batch[self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest >= self.world_size)


def train_loader(dataset: Dataset, batch_size: int, seed: int, rt: DeviceContext, workers: int) -> DataLoader:
    """Loader over this rank's share of each global batch; call ``loader.batch_sampler.set_epoch(e)``."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, seed, rt.rank, rt.world_size)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=rt.device.type == "cuda")


def eval_loader(dataset: Dataset, batch_size: int, rt: DeviceContext, workers: int, *, shard: bool = True) -> DataLoader:
    """Sequential loader over this rank's strided shard (``shard``) or over the whole split."""
    assert isinstance(dataset, Sized)
    if shard and rt.distributed:
        dataset = Subset(dataset, range(rt.rank, len(dataset), rt.world_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=rt.device.type == "cuda")


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, batch_size: int, rt: DeviceContext, workers: int) -> TensorDataset:
    """Features ``[N, F]`` (fp32, CPU) and labels of a whole split, for the linear probe.

    The probe's backbone is frozen and unadapted, so its features are computed once instead of every
    epoch. Under torchrun each rank embeds a strided shard and all ranks receive every row.
    """
    model.eval()
    chunks = []
    for x, _ in eval_loader(dataset, batch_size, rt, workers):
        with rt.autocast():
            chunks.append(model(x.to(rt.device, non_blocking=True)).float())
    local = torch.cat(chunks)  # [ceil-or-floor(N / world), F]
    n = len(dataset)  # type: ignore[arg-type]
    if rt.distributed:
        rows = -(-n // rt.world_size)
        padded = local.new_zeros(rows, local.shape[1])
        padded[:len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(rt.world_size)]
        dist.all_gather(gathered, padded)
        full = local.new_empty(n, local.shape[1])
        for r, part in enumerate(gathered):
            full[r::rt.world_size] = part[:len(range(r, n, rt.world_size))]
        local = full
    return TensorDataset(local.cpu(), labels_of(dataset))
