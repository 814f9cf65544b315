"""The training loop of one trial (one adapter scale): AdamW, cosine schedule with warmup, AMP, DDP.

Scheduling is per optimizer step (timm ``CosineLRScheduler`` with ``t_in_epochs=False``), so short runs
capped by ``--max-steps`` still warm up and decay. A checkpoint is written after every epoch; the data
order and the dropout/drop-path randomness of an epoch are seeded from ``(seed, epoch)``, so a run
resumed from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from repadapter.errors import CheckpointError

from .batches import batches, class_weights, eval_loader, labels_of, train_loader
from .checkpoint import flatten_optimizer, load_checkpoint, save_checkpoint, unflatten_optimizer
from .config import TrainConfig
from .device import DeviceContext
from .model import TaskModel, set_train_mode, train_state

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    """One epoch's figures; ``seconds`` covers the training steps only, ``eval_seconds`` the validation."""

    epoch: int
    step: int
    lr: float
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    eval_seconds: float
    images_per_second: float


COLLAPSE_SHARE = 0.95
"""A model has collapsed onto a class when it gives that class to at least this share of the validation
images *and* to at least this share of the validation images of the other classes (see
:attr:`TrialResult.collapse`)."""


@dataclass
class TrialResult:
    """A finished trial: its history, the final trained state (CPU copies, see ``model.train_state``) and
    its final state's validation counts per class ``c``: images it gives to ``c`` (``val_predicted[c]``),
    images of ``c`` (``val_true[c]``) and images of ``c`` it gets right (``val_correct[c]``)."""

    scale: float
    history: list[EpochStats]
    steps: int
    resumed_at_epoch: int
    state: dict[str, Tensor] = field(repr=False)
    val_predicted: list[int] = field(default_factory=list)
    val_true: list[int] = field(default_factory=list)
    val_correct: list[int] = field(default_factory=list)

    @property
    def val_accuracy(self) -> float:
        return self.history[-1].val_accuracy

    @property
    def collapse(self) -> tuple[int, float] | None:
        """``(class, share)`` when the final model has collapsed onto one class: it gives that class to at
        least :data:`COLLAPSE_SHARE` of the validation images (``share``) *and* to at least that share of the
        images of the other classes (:meth:`others_called`), i.e. it recalls at most 5% of them.

        The second condition tells a collapse from a skewed split: where one class really is 97% of the
        images, a good model also predicts it for ~97% of them, but it recognises most of the other 3%; a
        collapsed one (a model that ignores its input) does not (an input-blind guesser that answers the
        class for 95% of the images also answers it for 95% of the others). A split holding one class only
        cannot tell, and flags nothing.
        """
        total = sum(self.val_predicted)
        top = max(range(len(self.val_predicted)), key=self.val_predicted.__getitem__, default=0)
        share = self.val_predicted[top] / total if total else 0.0
        called = self.others_called(top)
        return (top, share) if share >= COLLAPSE_SHARE and called is not None and called >= COLLAPSE_SHARE else None

    def others_called(self, c: int) -> float | None:
        """The share of the validation images of the classes other than ``c`` that the model gives to ``c``
        (``None`` when every image is of class ``c``; without true counts, every image counts as other)."""
        true = self.val_true[c] if c < len(self.val_true) else 0
        right = self.val_correct[c] if c < len(self.val_correct) else 0
        others = sum(self.val_predicted) - true
        return (self.val_predicted[c] - right) / others if others > 0 else None

    @property
    def train_seconds(self) -> float:
        return sum(h.seconds for h in self.history)


@torch.no_grad()
def predict(model: Callable[[Tensor], Tensor], loader: DataLoader, rt: DeviceContext, desc: str = "predict", *,
            progress: bool = False, level: int = logging.INFO) -> tuple[Tensor, Tensor]:
    """Logits ``[N, C]`` (fp32, CPU) and labels ``[N]`` over a loader; the caller sets eval mode.

    ``desc`` names the pass in its progress bar (main process, when ``progress``) and its timing log line.
    """
    logits, labels = [], []
    for x, y in batches(loader, desc, progress and rt.is_main, level=level):
        with rt.autocast():
            logits.append(model(x.to(rt.device, non_blocking=True)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def loss_and_accuracy(logits: Tensor, labels: Tensor, rt: DeviceContext) -> tuple[float, float]:
    """Mean cross-entropy and accuracy, summed over every process's shard."""
    loss_sum = F.cross_entropy(logits, labels, reduction="sum").item()
    correct = (logits.argmax(1) == labels).sum().item()
    loss_sum, correct, n = rt.sum([loss_sum, correct, len(labels)])
    return loss_sum / max(n, 1), correct / max(n, 1)


def _balance(cfg: TrainConfig, train_set: Dataset, num_classes: int) -> tuple[Tensor | None, Tensor | None]:
    """``(loss class weights [C], sampler weights [N])`` for ``cfg.balance``; ``None`` where not used."""
    if cfg.balance == "none":
        return None, None
    labels = labels_of(train_set)
    weights = class_weights(labels, num_classes)
    log.info("balance=%s class_counts=%s class_weights=%s", cfg.balance,
             torch.bincount(labels, minlength=num_classes).tolist(), [round(w, 3) for w in weights.tolist()])
    return (weights, None) if cfg.balance == "loss" else (None, weights[labels])


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch) * 1024 + rank


class Trainer:
    """Trains ``model`` on ``train_set`` for one scale, checkpointing to ``ckpt_path`` after every epoch.

    ``on_epoch_end`` is called (on every rank) after an epoch's checkpoint is written; raising there
    (e.g. KeyboardInterrupt in tests) leaves exactly that checkpoint behind. ``name`` prefixes the progress
    bars and log lines (``trial 2/5 scale=0.5`` in a scale search).
    """

    def __init__(self, cfg: TrainConfig, rt: DeviceContext, model: TaskModel, train_set: Dataset, val_set: Dataset,
                 scale: float, ckpt_path: Path, *, workers: int = 0, progress: bool = False,
                 on_epoch_end: Callable[[EpochStats], None] | None = None, name: str = "") -> None:
        self.cfg, self.rt, self.module, self.scale, self.ckpt_path = cfg, rt, model, scale, ckpt_path
        self.progress, self.on_epoch_end, self.name = progress, on_epoch_end, name
        self.loss_weights, sample_weights = _balance(cfg, train_set, model.head.out_features)
        self.loss_weights = None if self.loss_weights is None else self.loss_weights.to(rt.device)
        self.val_predicted: list[int] | None = None
        self.val_true: list[int] = []
        self.val_correct: list[int] = []
        self.net: torch.nn.Module = model
        if rt.distributed:  # frozen BN statistics are identical everywhere: no buffer broadcast needed
            self.net = DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda" else None,
                                               forward_sync_buffers=cfg.method == "full")
        self.optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.loader = train_loader(train_set, cfg.batch_size, cfg.seed, rt, workers, sample_weights)
        self.val_loader = eval_loader(val_set, cfg.batch_size, rt, workers)
        steps_per_epoch = len(self.loader)
        if steps_per_epoch == 0:
            raise ValueError(f"{len(train_set)} training images cannot feed {rt.world_size} processes")  # type: ignore[arg-type]
        self.total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.epochs = math.ceil(self.total_steps / steps_per_epoch)
        warmup = min(round(cfg.warmup_epochs * steps_per_epoch), self.total_steps // 10)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=self.total_steps, lr_min=cfg.min_lr,
                                           warmup_t=warmup, warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
        self.epoch = self.step = 0
        self.history: list[EpochStats] = []

    # ---- the loop -------------------------------------------------------------------------------------

    def fit(self) -> TrialResult:
        resumed_at = self._resume()
        while self.epoch < self.epochs and self.step < self.total_steps:
            stats = self._train_epoch()
            self.epoch += 1
            self.history.append(stats)
            self._save()
            log.info("%sepoch=%d/%d scale=%g step=%d loss=%.4f acc=%.4f val_loss=%.4f val_acc=%.4f seconds=%.1f "
                     "img_per_s=%.1f", self.name, stats.epoch, self.epochs, self.scale, stats.step, stats.train_loss,
                     stats.train_accuracy, stats.val_loss, stats.val_accuracy, stats.seconds,
                     stats.images_per_second)
            if self.on_epoch_end is not None:
                self.on_epoch_end(stats)
        if self.val_predicted is None:  # resumed a finished trial: no epoch evaluated its final state here
            self.evaluate()
        state = {k: v.detach().to("cpu", copy=True) for k, v in train_state(self.module, self.cfg.method).items()}
        return TrialResult(self.scale, self.history, self.step, resumed_at, state, self.val_predicted or [],
                           self.val_true, self.val_correct)

    def _train_epoch(self) -> EpochStats:
        cfg, rt = self.cfg, self.rt
        self.loader.batch_sampler.set_epoch(self.epoch)  # type: ignore[union-attr]
        torch.manual_seed(_epoch_seed(cfg.seed, self.epoch, rt.rank))
        set_train_mode(self.module, cfg.method)
        sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss * n, correct, n (this rank)
        steps = min(len(self.loader), self.total_steps - self.step)
        bar = tqdm(total=steps, desc=f"{self.name}epoch {self.epoch + 1}/{self.epochs}", unit="step", leave=False,
                   disable=not (self.progress and rt.is_main), dynamic_ncols=True)
        start = time.perf_counter()
        for i, (x, y) in enumerate(self.loader):
            if i >= steps:
                break
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            with rt.autocast():
                logits = self.net(x)  # [B, C]
            loss = F.cross_entropy(logits.float(), y, weight=self.loss_weights,
                                   label_smoothing=cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            self.scheduler.step_update(num_updates=self.step)
            sums[0] += loss.detach() * len(y)
            sums[1] += (logits.detach().argmax(1) == y).sum()
            sums[2] += len(y)
            bar.update()
            if not bar.disable and (i % 5 == 0 or i == steps - 1):
                loss_sum, correct, n = sums.tolist()
                bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}",
                                img_s=f"{n * rt.world_size / (time.perf_counter() - start):.0f}")
        bar.close()
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        seconds = time.perf_counter() - start
        loss_sum, correct, n = rt.sum(sums.tolist())
        start = time.perf_counter()
        val_loss, val_acc = self.evaluate()
        return EpochStats(self.epoch + 1, self.step, self.optimizer.param_groups[0]["lr"], loss_sum / n, correct / n,
                          val_loss, val_acc, seconds, time.perf_counter() - start, n / seconds)

    def evaluate(self) -> tuple[float, float]:
        """Validation loss and accuracy of the current model (eval mode, sharded over processes); records per
        class the images it gives that class, the images of that class and those it gets right
        (``val_predicted``, ``val_true``, ``val_correct``: summed over processes)."""
        self.module.eval()
        logits, labels = predict(self.module, self.val_loader, self.rt, f"{self.name}validation",
                                 progress=self.progress, level=logging.DEBUG)
        n, predicted = logits.shape[1], logits.argmax(1)
        counts = [torch.bincount(t, minlength=n).tolist() for t in (predicted, labels, labels[predicted == labels])]
        summed = [round(c) for c in self.rt.sum([c for per_class in counts for c in per_class])]
        self.val_predicted, self.val_true, self.val_correct = summed[:n], summed[n:2 * n], summed[2 * n:]
        return loss_and_accuracy(logits, labels, self.rt)

    # ---- checkpoints ----------------------------------------------------------------------------------

    def _save(self) -> None:
        if not self.rt.is_main:
            return
        opt_tensors, opt_meta = flatten_optimizer(self.optimizer.state_dict())
        tensors = {f"model.{k}": v for k, v in train_state(self.module, self.cfg.method).items()} | opt_tensors
        meta = {
            "identity": self.cfg.resume_identity(self.scale), "epoch": self.epoch, "step": self.step,
            "finished": self.epoch >= self.epochs or self.step >= self.total_steps,
            "history": [asdict(h) for h in self.history], "optimizer": opt_meta,
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
        }
        save_checkpoint(self.ckpt_path, tensors, meta)

    def _resume(self) -> int:
        """Load the checkpoint when ``--resume`` and one exists; returns the epoch resumed at (0: fresh)."""
        if not self.ckpt_path.exists():
            if self.cfg.resume:
                log.info("no checkpoint at %s: starting from scratch", self.ckpt_path)
            return 0
        if not self.cfg.resume:
            log.warning("%s exists and is being replaced (pass --resume to continue it)", self.ckpt_path)
            return 0
        tensors, meta = load_checkpoint(self.ckpt_path)
        want = self.cfg.resume_identity(self.scale)
        # checkpoints from before those options
        have = {"balance": "none", "class_mix": None, "label_smoothing": 0.0} | meta["identity"]
        if have != want:
            diff = {k: {"checkpoint": have.get(k), "now": v} for k, v in want.items() if have.get(k) != v}
            raise CheckpointError(f"{self.ckpt_path} was trained with other settings {diff}: "
                                  "use another --out-dir, or run without --resume to start over")
        model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        expected = set(train_state(self.module, self.cfg.method))
        if set(model_state) != expected:
            raise CheckpointError(f"{self.ckpt_path} holds {len(model_state)} model tensors, the model needs "
                                  f"{len(expected)} (first differences: {sorted(set(model_state) ^ expected)[:3]})")
        self.module.load_state_dict(model_state, strict=False)
        self.optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.epoch, self.step = meta["epoch"], meta["step"]
        self.scheduler.step_update(num_updates=self.step)
        self.history = [EpochStats(**h) for h in meta["history"]]
        log.info("resumed from %s at epoch=%d step=%d finished=%s", self.ckpt_path, self.epoch, self.step,
                 meta["finished"])
        return self.epoch
