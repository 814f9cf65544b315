"""From dataset splits to batches: preprocessing, seeded sharded batch order, cached backbone features.

Images go through :func:`repadapter.preprocess.build_transform` with the task's
:class:`~repadapter.PreprocessConfig`, the exact function the service applies to requests, so the model
never sees a pixel pipeline at training time that it will not see at serving time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset
from tqdm.auto import tqdm

from .device import DeviceContext

log = logging.getLogger(__name__)

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
    if isinstance(inner, TensorDataset):  # cached features: (features, labels)
        return inner.tensors[1].long()
    labels = getattr(inner, "labels", None)
    if labels is None:
        labels = [inner[i][1] for i in range(len(inner))]  # type: ignore[arg-type]
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)


def class_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Per-class weights ``n / (classes present x count)`` ``[C]`` (float32; 0 for an absent class).

    scikit-learn's "balanced" weights: every class carries the same total weight, and a balanced set gets
    1 everywhere. They weight the cross-entropy (``--balance loss``) or, per image, the sampler (``sampler``).
    """
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights.float()


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches from a seeded per-epoch permutation, each cut into this rank's share.

    Every rank steps through the same global batches a single process would draw, so a torchrun run with
    the same ``--batch-size`` follows the same optimisation path (up to dropout masks and summation
    order). The order depends only on ``(seed, epoch)``: resuming at an epoch boundary needs no sampler
    state. A trailing batch too small to give every rank one sample is dropped (no rank idles in a step).
    With ``weights`` ``[N]`` an epoch is ``N`` draws with replacement, index ``i`` at probability
    ``weights[i] / sum``, instead of a permutation: the same draws on every rank, so it shards the same way.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 weights: Tensor | None = None) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the {world_size} processes")
        if weights is not None and weights.shape != (n,):
            raise ValueError(f"{tuple(weights.shape)} sampling weights for {n} samples")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.weights = None if weights is None else weights.double()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = (torch.randperm(self.n, generator=g) if self.weights is None
                 else torch.multinomial(self.weights, self.n, replacement=True, generator=g))
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.world_size:
                break
            yield batch[self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest >= self.world_size)


def train_loader(dataset: Dataset, batch_size: int, seed: int, rt: DeviceContext, workers: int,
                 weights: Tensor | None = None) -> DataLoader:
    """Loader over this rank's share of each global batch (``weights``: per-sample draw weights, see
    :class:`ShardedBatchSampler`); call ``loader.batch_sampler.set_epoch(e)``."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, seed, rt.rank, rt.world_size,  # type: ignore[arg-type]
                                  weights)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=rt.device.type == "cuda")


def eval_loader(dataset: Dataset, batch_size: int, rt: DeviceContext, workers: int, *,
                shard: bool = True) -> DataLoader:
    """Sequential loader over this rank's strided shard (``shard``) or over the whole split."""
    assert isinstance(dataset, Sized)
    if shard and rt.distributed:
        dataset = Subset(dataset, range(rt.rank, len(dataset), rt.world_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=rt.device.type == "cuda")


def batches(loader: DataLoader, desc: str, enabled: bool, *, level: int = logging.INFO) -> Iterator[Any]:
    """``loader``'s batches behind a tqdm bar (when ``enabled``), then a log line at ``level`` with the pass's
    duration: a pass over a split (features, evaluation, the served-bundle proof) can take tens of seconds."""
    start = time.perf_counter()
    yield from tqdm(loader, desc=desc, unit="batch", leave=False, disable=not enabled, dynamic_ncols=True)
    log.log(level, "%s: %d images in %.1f s", desc, len(loader.dataset), time.perf_counter() - start)  # type: ignore[arg-type]


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, batch_size: int, rt: DeviceContext, workers: int, *,
                     desc: str = "features", progress: bool = False) -> TensorDataset:
    """Features ``[N, F]`` (fp32, CPU) and labels of a whole split, for the linear probe.

    The probe's backbone is frozen and unadapted, so its features are computed once instead of every
    epoch. Under torchrun each rank embeds a strided shard and all ranks receive every row.
    """
    model.eval()
    chunks = []
    for x, _ in batches(eval_loader(dataset, batch_size, rt, workers), desc, progress and rt.is_main):
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
