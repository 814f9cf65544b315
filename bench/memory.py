"""Memory: one backbone plus N registered tasks, against one fine-tuned model per task.

Every point is a fresh subprocess (so nothing freed earlier hides in the allocator; ``--jobs`` of them at a
time, since RSS does not depend on timing), measured after ``gc`` + ``malloc_trim``: process RSS, and on
CUDA ``torch.cuda.memory_allocated``. Modes:
- ``baseline``: the interpreter with torch, timm, repadapter and the service imported (subtracted from
  both sides);
- ``repserve``: the service's own objects (:class:`service.lifecycle.Runtime`: backbone, switcher with its
  pristine copies, registry, residency tiers) over a store of N tasks (:mod:`bench.taskgen`), every task
  loaded once so that all N are in the host tier (which is given room for all), and the last
  ``--working-set`` tasks served by a merged request each, so the device tier (``--device-mib``) and the
  live tier (``--live-mib``) hold what a busy replica's would;
- ``copies``: N full models (a deep copy of the backbone each, plus its own head). Copies are measured
  only while they fit a budget (``--max-gib``, and half of the available memory shared by the jobs); beyond
  it the figure is a linear fit of the measured points, marked as extrapolated.
Goal: backbone + N x bundle; each row gives RepServe's memory over that ideal (a process holding one model,
measured, plus the N tasks' tensor bytes), and a fit splits RepServe's memory into a fixed part and a
per-task part (the device and live tiers, bounded by their settings, taken out).

    python -m bench.memory [--quick] [--archs vit_tiny,vit_base] [--tasks 1,10,100,1000] [--working-set 8]
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import ROOT, backbones, cli, markdown, memstat, plots, taskgen

TITLE = "Memory"
NAME = "memory"
log = logging.getLogger(f"bench.{NAME}")
FULL = {"archs": ["embedded", "vit_tiny", "vit_small", "vit_base"], "tasks": [1, 10, 100, 1000]}
QUICK = {"archs": ["vit_tiny"], "tasks": [1, 10]}
HEAD_CLASSES = 10
EXTRA_COPY_POINTS = (1,)
"""Copy counts measured besides the ``--tasks`` that fit the budget (``--quick`` measures only these and
extrapolates by the model's bytes)."""


def child(argv: Sequence[str]) -> dict[str, Any]:
    """One measurement point, run in its own process; prints nothing but returns the figures."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.memory child")
    p.add_argument("mode", choices=["baseline", "repserve", "copies"])
    p.add_argument("--arch", default="vit_tiny")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--store", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--working-set", type=int, default=8)
    p.add_argument("--device-mib", type=int, default=32)
    p.add_argument("--live-mib", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), backbones.DTYPES[a.dtype]
    _first_use(device)
    keep: list[Any] = []  # everything measured stays referenced until RSS is read
    facts: dict[str, Any] = {}
    if a.mode == "repserve":
        keep, facts = _repserve(a, device)
    elif a.mode == "copies":
        keep, facts = _copies(a.arch, a.n, device, dtype, a.seed)
    memstat.settle_memory()
    out = {"rss_bytes": memstat.rss_bytes(), **facts}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
    del keep
    return out


def _first_use(device: torch.device) -> None:
    """Page in the library code both sides use (matmul kernels, safetensors, the service's modules, the CUDA
    context), so that it counts in the baseline rather than on whichever side happens to call it first."""
    from safetensors.torch import load, save

    import service.lifecycle  # noqa: F401 - its imports (FastAPI, pydantic, prometheus) count in the baseline

    x = torch.randn(64, 64, device=device)
    torch.addmm(x, x, x)
    load(save({"x": x.cpu()}))


def _repserve(a: Any, device: torch.device) -> tuple[list[Any], dict[str, Any]]:
    """The service's runtime over the store at ``a.store``: all N tasks host-resident, the working set
    served (merged) once each."""
    import asyncio

    from service.lifecycle import Runtime
    from service.metrics import Metrics
    from service.settings import Settings

    settings = Settings(store=a.store, backbone=backbones.arch_name(a.arch), seed=a.seed, device=device.type,
                        dtype=backbones.dtype_name(a.dtype), warmup=False,
                        builtin_task="", store_poll_s=0, policy="auto", host_cache_bytes=1 << 40,
                        device_cache_bytes=a.device_mib << 20, live_cache_bytes=a.live_mib << 20)
    runtime = Runtime(settings, Metrics())
    runtime.initialize()
    if not runtime.ready.is_set():
        raise RuntimeError(f"runtime not ready: {runtime.failure}")
    tasks = runtime.registry.tasks()
    for task in tasks:
        runtime.residency.acquire_blocking(task)
    for task in tasks[-a.working_set:] if a.working_set else []:
        x = torch.zeros(1, *task.shape)
        asyncio.run(runtime.engine.submit(task, x, 1))  # one task queued: a merged batch (fold, live snapshot)
    stats = runtime.residency.stats()
    facts = {"model_bytes": backbones.model_nbytes(runtime.backbone.model),
             "pristine_bytes": runtime.residency.switcher.pristine_nbytes,
             "bundle_bytes": stats["host"].nbytes, "tasks_host": stats["host"].entries,
             "device_tier_bytes": stats["device"].nbytes, "device_tier_tasks": stats["device"].entries,
             "live_tier_bytes": stats["live"].nbytes, "live_tier_tasks": stats["live"].entries,
             # the bounded caches: on a CPU in fp32 the device tier's adapters and heads are views of the host
             # tier's buffers, so only its folds add memory; they are taken out of the per-task fit
             "working_set_bytes": stats["device"].nbytes + stats["live"].nbytes}
    runtime.engine.stop()
    return [runtime], facts


def _copies(name: str, n: int, device: torch.device, dtype: torch.dtype,
            seed: int) -> tuple[list[Any], dict[str, Any]]:
    bb = backbones.load(name, device, dtype, seed)
    bb.model.head_task = nn.Linear(bb.num_features, HEAD_CLASSES).to(device, dtype)  # each copy's own head
    models = [bb.model] + [copy.deepcopy(bb.model) for _ in range(n - 1)]
    return [models], {"model_bytes": backbones.model_nbytes(bb.model)}


def measure_point(mode: str, arch: str, n: int, args: Any, device: torch.device, dtype: str,
                  store: Path | None = None) -> dict[str, Any]:
    """Run one child process and return its figures."""
    cmd = [sys.executable, "-m", "bench.memory", "child", mode, "--arch", arch, "--n", str(n), "--device",
           str(device), "--dtype", dtype, "--working-set", str(args.working_set), "--device-mib",
           str(args.device_mib), "--live-mib", str(args.live_mib), "--threads", str(args.threads),
           "--seed", str(args.seed), *(["--store", str(store)] if store else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli.child_env(), capture_output=True, text=True,
                          timeout=args.child_timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("%s %s N=%d: RSS %s", mode, arch, n, markdown.fmt_bytes(out["rss_bytes"]))
    return out


def model_bytes(name: str, dtype: torch.dtype) -> int:
    """Tensor bytes of one backbone copy, from a model built on the meta device (instant, no memory)."""
    import timm

    from repadapter.backbone import EMBEDDED, EMBEDDED_ARCH

    arch = EMBEDDED_ARCH if name == EMBEDDED else backbones.arch_name(name)
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0).to(dtype)
    return backbones.model_nbytes(model)


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)``; one point gives a zero slope."""
    if len(points) < 2:
        return points[0][1], 0.0
    slope, intercept = np.polyfit(*zip(*points, strict=True), 1)
    return float(intercept), float(slope)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["child"]:
        print(json.dumps(child(argv[1:])))
        return {}
    p = cli.parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=cli.csv(int), help="task counts N (default 1,10,100,1000; quick: 1,10)")
    p.add_argument("--working-set", type=int, default=8, help="tasks served by one merged request each (their "
                   "folds and merged weights are what the device and live tiers hold)")
    p.add_argument("--device-mib", type=int, default=32, help="RepServe's device tier (REPSERVE_DEVICE_CACHE_BYTES)")
    p.add_argument("--live-mib", type=int, default=16, help="RepServe's live tier (REPSERVE_LIVE_CACHE_BYTES)")
    p.add_argument("--max-gib", type=float, default=6.0, help="budget for one process's full-model copies")
    p.add_argument("--jobs", type=int, default=2, help="measurement processes at a time: RSS does not depend "
                   "on timing; the copy budget is shared between them")
    p.add_argument("--child-timeout", type=float, default=600.0, help="seconds per measurement process")
    args = p.parse_args(argv)
    run = cli.Run(NAME, args, argv)
    archs = cli.pick(args.archs, QUICK["archs"], FULL["archs"], args.quick)
    tasks = sorted(cli.pick(args.tasks, QUICK["tasks"], FULL["tasks"], args.quick))
    jobs = max(1, args.jobs)
    budget = min(args.max_gib * 2**30, 0.5 * memstat.available_bytes() / jobs or args.max_gib * 2**30)
    if run.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(run.device)
        budget = min(budget, 0.5 * free / jobs)
    run.note(f"RepServe: every task host-resident, the last {args.working_set} served merged once each; device "
             f"tier {args.device_mib} MiB, live tier {args.live_mib} MiB; tasks have {HEAD_CLASSES}-class heads. "
             f"Full-model copies measured up to a {markdown.fmt_bytes(budget)} budget, beyond that extrapolated "
             "linearly (marked *).")
    dt = run.dtypes[0]
    if len(run.dtypes) > 1:
        run.note(f"memory measured in {dt} only")
    points = [("baseline", "none", 0)]
    stores: dict[tuple[str, int], Path] = {}
    stores_dir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    for name in archs:
        wanted = EXTRA_COPY_POINTS if args.quick else (*EXTRA_COPY_POINTS, *tasks)
        size = model_bytes(name, backbones.DTYPES[dt])
        points += [("repserve", name, n) for n in tasks]
        for n in tasks:
            stores[name, n] = stores_dir / f"{name}-{n}"
            taskgen.build_store(stores[name, n], name, tasks=n, distinct=min(n, 16), image_size=None,
                                seed=args.seed)
        points += [("copies", name, n) for n in sorted({n for n in wanted if n * size <= budget} | {1})]
    run.log.info("%d measurement processes, %d at a time", len(points), jobs)
    with ThreadPoolExecutor(jobs) as pool:
        measured = dict(zip(points, pool.map(lambda pt: measure_point(*pt, args, run.device, dt,
                                                                      stores.get((pt[1], pt[2]))), points),
                            strict=True))
    shutil.rmtree(stores_dir, ignore_errors=True)
    baseline = measured[points[0]]
    per_arch = []
    for name in archs:
        rep = {n: v for (mode, arch, n), v in measured.items() if (mode, arch) == ("repserve", name)}
        cop = {n: v for (mode, arch, n), v in measured.items() if (mode, arch) == ("copies", name)}
        per_arch.append(_summarize(name, tasks, rep, cop, baseline, run))
    results = {"baseline": baseline, "archs": per_arch,
               "goal": {"ideal": "model + N x bundle", "n": tasks[-1],
                        "vs_ideal": {a["arch"]: a["rows"][-1]["vs_ideal"] for a in per_arch},
                        "vs_copies": {a["arch"]: a["rows"][-1]["copies_vs_repserve"] for a in per_arch}}}
    config = {"archs": archs, "tasks": tasks, "working_set": args.working_set, "device_mib": args.device_mib,
              "live_mib": args.live_mib, "dtype": dt, "copy_budget_bytes": int(budget),
              "head_classes": HEAD_CLASSES, "adapter": {"hidden": 8, "groups": 2}}
    return run.finish(config, results, render, plot)


def _summarize(name: str, tasks: list[int], rep: dict[int, dict], cop: dict[int, dict], baseline: dict,
               run: cli.Run) -> dict[str, Any]:
    """Rows per N (memory above the baseline), the per-task and per-copy fits, and the goal figure.

    The metric is where the models live: process RSS on a CPU, CUDA allocated bytes on a GPU. The device and
    live tiers (bounded by their settings) are taken out of the per-task fit.
    """
    key = "cuda_allocated_bytes" if run.device.type == "cuda" else "rss_bytes"
    b0 = baseline.get(key, 0)
    c0, c1 = fit_line([(n, p[key] - b0) for n, p in cop.items()])
    if len(cop) == 1:  # nothing to fit: each further copy costs the model's tensor bytes
        c1 = rep[tasks[0]]["model_bytes"]
        c0 = cop[1][key] - b0 - c1
    r0, r1 = fit_line([(n, p[key] - b0 - p["working_set_bytes"]) for n, p in rep.items()])
    bundle_per_task = rep[tasks[-1]]["bundle_bytes"] / tasks[-1]
    rows = []
    for n in tasks:
        mine = rep[n][key] - b0
        measured = n in cop
        theirs = cop[n][key] - b0 if measured else c0 + c1 * n
        ideal = cop[1][key] - b0 + rep[n]["bundle_bytes"]
        rows.append({"n": n, "repserve_bytes": mine, "copies_bytes": theirs, "copies_extrapolated": not measured,
                     "copies_vs_repserve": theirs / mine, "ideal_bytes": ideal, "vs_ideal": mine / ideal,
                     "repserve_rss_bytes": rep[n]["rss_bytes"] - baseline["rss_bytes"],
                     "bundle_bytes": rep[n]["bundle_bytes"], "tasks_host": rep[n]["tasks_host"],
                     "device_tier_bytes": rep[n]["device_tier_bytes"], "live_tier_bytes": rep[n]["live_tier_bytes"],
                     "working_set_bytes": rep[n]["working_set_bytes"]})
    if any(r["copies_extrapolated"] for r in rows):
        run.note(f"{name}: copies beyond N={max(cop)} extrapolated ({markdown.fmt_bytes(c1)} per model)")
    first = rep[tasks[0]]
    return {
        "arch": name, "metric": key, "rows": rows, "copies_measured": sorted(cop),
        "model_bytes": first["model_bytes"], "pristine_bytes": first["pristine_bytes"],
        "bundle_bytes_per_task": bundle_per_task,

        "fit": {"repserve_fixed_bytes": r0, "repserve_per_task_bytes": r1, "copies_fixed_bytes": c0,
                "copies_per_model_bytes": c1},
        "per_task_vs_bundle": r1 / bundle_per_task if len(rep) > 1 else 0.0,
    }


def render(payload: dict[str, Any]) -> str:
    """Markdown: goal verdict, components per backbone, and memory vs N for both sides."""
    res = payload["results"]
    goal, b = res["goal"], markdown.fmt_bytes
    at = ", ".join(f"{arch} **x{v:.2f}** (N models: x{goal['vs_copies'][arch]:.0f})"
                   for arch, v in goal["vs_ideal"].items())
    parts = [
        f"Goal: backbone + N x bundle (ideal = one model, measured, + N x the tasks' tensor bytes). RepServe over "
        f"that ideal at N={goal['n']}: {at}. The fixed extra is mostly the switcher's pristine copies of the "
        "affected weights (the price of drift-free switching) and the device and live tiers, bounded by their "
        "settings; the per-task extra is the registry's manifest and the tiers' bookkeeping around each task's "
        "one-buffer bundle.",
        "",
        f"Figures are above the baseline process (Python + torch + timm imported: "
        f"{b(res['baseline']['rss_bytes'])} RSS). Marked * = extrapolated from the measured copies.",
        "",
        markdown.md_table(
            ["backbone", "model", "pristine copies (switcher)", "bundle / task", "device + live tiers (at max N)",
             "RepServe fixed (fit)", "RepServe per task (fit, tiers excluded)", "per task / bundle"],
            [[a["arch"], b(a["model_bytes"]), b(a["pristine_bytes"]), b(a["bundle_bytes_per_task"]),
              b(a["rows"][-1]["working_set_bytes"]), b(a["fit"]["repserve_fixed_bytes"]),
              b(a["fit"]["repserve_per_task_bytes"]), f"{a['per_task_vs_bundle']:.2f}"] for a in res["archs"]]),
        "",
    ]
    table = []
    for a in res["archs"]:
        for r in a["rows"]:
            star = "*" if r["copies_extrapolated"] else ""
            table.append([a["arch"], r["n"], b(r["repserve_bytes"]), f"{b(r['ideal_bytes'])} (x{r['vs_ideal']:.2f})",
                          f"{b(r['copies_bytes'])}{star}", f"x{r['copies_vs_repserve']:.1f}{star}"])
    metric = res["archs"][0]["metric"] if res["archs"] else "rss_bytes"
    parts.append(f"Memory above the baseline ({'process RSS' if metric == 'rss_bytes' else 'CUDA allocated'}):")
    parts += ["", markdown.md_table(["backbone", "tasks N", "RepServe", "ideal (RepServe / ideal)",
                                   "N fine-tuned models", "models / RepServe"], table)]
    return "\n".join(parts)


def plot(payload: dict[str, Any], path: Path) -> None:
    """Memory vs N (log-log) per backbone: RepServe, its goal, and the copies (dashed where extrapolated)."""
    archs = payload["results"]["archs"]
    fig, axes = plots.subplots(len(archs), 1)
    for ax, a in zip(axes[0], archs, strict=True):
        ns = [r["n"] for r in a["rows"]]
        ax.plot(ns, [r["repserve_bytes"] / 2**20 for r in a["rows"]], "o-", label="RepServe")
        ax.plot(ns, [r["ideal_bytes"] / 2**20 for r in a["rows"]], ":", color="grey",
                label="goal: backbone + N x bundle")
        ax.plot(ns, [r["copies_bytes"] / 2**20 for r in a["rows"]], "s--", color="tab:red",
                label="one model per task (dashed: extrapolated)")
        meas = [r for r in a["rows"] if not r["copies_extrapolated"]]
        ax.plot([r["n"] for r in meas], [r["copies_bytes"] / 2**20 for r in meas], "s-", color="tab:red")
        ax.set(title=a["arch"], xlabel="tasks N", ylabel="MiB above baseline")
        plots.log_axes(ax, x=True, xticks=ns)
        ax.legend(fontsize=6)
    plots.save_figure(fig, path)


if __name__ == "__main__":
    main()
