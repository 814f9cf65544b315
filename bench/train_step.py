"""The cost of one training step of each method on a ViT, where the paper's savings should appear.

RepAdapter's training savings (the paper: ~25% less time, ~20% less memory than full tuning on ViT-B/16)
come from what a frozen backbone skips: the weight gradients (about a third of a step's matmuls: the
backward pass computes input and weight gradients) and their AdamW state (three extra copies of the
weights). A 2.2M-parameter CNN cannot show it; a ViT can. This module measures one method in its own
process, so its peak memory is its own: time per step split into forward / backward / optimizer, and the
memory the step adds on top of the loaded model (CPU: peak RSS from ``/proc/self/status``, reset after the
model is built; CUDA: max allocated). The model is timm's, randomly initialised (cost does not depend on
the weights), with the training CLI's own model, train mode and optimizer (``training.model``).

    python -m bench.train_step --method repadapter --arch vit_small_patch16_224 --image-size 96 --batch 32

prints one JSON object; :mod:`bench.training` runs it once per method and renders the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from repadapter import attach_slots, load_backbone
from training.config import TrainConfig
from training.model import build_model, set_train_mode, trainable_parameters

from .memstat import peak_rss_bytes, reset_peak_rss, rss_bytes, settle_memory
from .timing import synchronize

METHODS = ("repadapter", "linear", "full")
PHASES = ("forward", "backward", "optimizer")


def _now(device: torch.device) -> float:
    """The wall clock once the device's queued work is done."""
    synchronize(device)
    return time.perf_counter()


def measure(method: str, arch: str, image_size: int, batch: int, steps: int, warmup: int, device: str = "cpu",
            classes: int = 10, seed: int = 0) -> dict[str, Any]:
    """Median seconds per phase over ``steps`` timed steps (after ``warmup``), and the step's memory.

    The linear probe's step is the frozen backbone's forward without autograd plus the head's step: the
    training CLI caches those features once instead, so this is its cost without the cache.
    """
    cfg = TrainConfig(data="digits", task="cost", recipe="paper", method=method, image_size=image_size,
                      batch_size=batch, seed=seed)  # the paper's adapters (hidden 8), whose savings it claims
    dev = torch.device(device)
    kwargs = {"drop_path_rate": cfg.drop_path} if method != "linear" else {}
    backbone = load_backbone(arch, None, device=device, seed=seed, img_size=image_size, **kwargs)
    sites = attach_slots(backbone.model, cfg.placement) if method == "repadapter" else []
    model = build_model(cfg, backbone, sites, classes, cfg.scale)
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(dev)
    y = torch.randint(0, classes, (batch,), generator=g).to(dev)
    settle_memory()
    base_rss = rss_bytes()
    exact_peak = dev.type == "cuda" or reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    for step in range(warmup + steps):
        set_train_mode(model, method)
        t0 = _now(dev)
        if method == "linear":
            with torch.no_grad():  # the probe's model is the head alone (it trains on cached features)
                features = backbone.model(x)
            logits = model.head(features)
        else:
            logits = model(x)
        loss = F.cross_entropy(logits, y)
        t1 = _now(dev)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = _now(dev)
        optimizer.step()
        t3 = _now(dev)
        if step >= warmup:
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[phase].append(seconds)
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    result: dict[str, Any] = {
        "method": method, "arch": arch, "image_size": image_size, "batch": batch, "steps": steps,
        "device": dev.type, "threads": torch.get_num_threads(),
        "trainable_params": trainable_parameters(model),
        "total_params": sum(p.numel() for p in {*backbone.model.parameters(), *model.parameters()}),
        "seconds": {p: sorted(v)[len(v) // 2] for p, v in times.items()},
        # weight grads + AdamW's two moments of what trains: what full tuning adds over a frozen backbone
        "grad_and_optimizer_state_mib": 3 * state_bytes / 2**20,
    }
    result["seconds"]["step"] = sum(result["seconds"][p] for p in PHASES)
    if dev.type == "cuda":
        result |= {"memory_kind": "cuda_max_allocated_above_model",
                   "step_memory_mib": (torch.cuda.max_memory_allocated(dev) - base_cuda) / 2**20}
    else:
        result |= {"memory_kind": "peak_rss_above_model" if exact_peak else "peak_rss_lifetime_above_model",
                   "step_memory_mib": (peak_rss_bytes() - base_rss) / 2**20, "model_rss_mib": base_rss / 2**20}
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--arch", default="vit_small_patch16_224", help="a timm ViT (randomly initialised)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.method, args.arch, args.image_size, args.batch, args.steps, args.warmup,
                             args.device, seed=args.seed)))


if __name__ == "__main__":
    main()
