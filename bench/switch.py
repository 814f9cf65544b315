"""Task switch: how long ``WeightSwitcher.activate`` takes to make another task's merged weights live.

The floor for rewriting the affected weights is one copy of them (read + write the same bytes), so the
figure is the switch time over ONE ``dst.copy_(src)`` of a contiguous buffer of exactly the affected
bytes (targets' weights and bias parts) in their dtype: the memory-bandwidth limit, with no per-tensor
overhead at all. It is measured interleaved in the same rounds. Goal: switch A -> B <= 1.5 x copy. Cases:
- ``switch``: A -> B with A active (deltas prepared beforehand: the per-task, once-only ``prepare`` is
  timed separately as ``prepare``, the first-use cost of a task): a cold switch, one ``addmm`` per target;
- ``switch_hot``: the same from both tasks' merged-weight snapshots (``WeightSwitcher.snapshot``: what the
  service's live tier keeps for recently merged tasks, ``REPSERVE_LIVE_CACHE_BYTES``): one copy;
- ``to_base`` (A -> plain backbone) and ``from_base`` (plain -> A);
- naive alternatives on a plain model: ``reload_memory`` (``load_state_dict`` of a full fine-tuned copy
  held in memory on the device: the best case of one-full-model-per-task), ``reload_disk`` (the same from
  a safetensors file, page cache warm) and ``deepcopy`` (``copy.deepcopy`` of the model).
A second, kernel-level comparison on tensors of the targets' weight shapes explains the ratio: ``copy``
(the flat floor again), ``copy_loop`` (one ``copy_`` per tensor from Python), ``foreach_copy`` (one
``torch._foreach_copy_`` over the list: what ``activate`` runs for hot switches and restores),
``addmm`` (what a cold switch runs per target; on a CPU its ``out = base + u a`` is a copy of ``base``
into ``out`` then a GEMM updating ``out``: two passes over the weights), ``mm_only`` (the rank-r product
alone, no base read: the compute floor of recomputing), ``chunked`` (copy then in-place addmm per
L2-sized row chunk), ``stacked`` (targets of one shape stored as one ``[n, out, in]`` buffer, one
``baddbmm`` per shape: two kernel launches for a ViT instead of a few per layer, what matters on a GPU)
and ``swap`` (pointing the parameters at cached merged tensors:
a merged-weight cache, which costs one copy of the affected weights per cached task).

    python -m bench.switch [--quick] [--archs vit_tiny,vit_base] [--repeats 15]
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from repadapter import WeightSwitcher, attach_slots

from . import backbones, cli, markdown, plots, timing
from .timing import Case

TITLE = "Task switch"
NAME = "switch"
GOAL = 1.5
FULL = {"archs": ["embedded", "vit_tiny", "vit_small", "vit_base"], "repeats": 15}
QUICK = {"archs": ["vit_tiny"], "repeats": 2}
CASES = ("switch", "switch_hot", "to_base", "from_base", "copy", "prepare", "reload_memory", "reload_disk", "deepcopy")
KERNELS = ("copy", "copy_loop", "foreach_copy", "addmm", "mm_only", "chunked", "stacked", "swap")
CHUNK_BYTES = 1 << 20
"""Row chunk of the ``chunked`` kernel: about one core's L2, so the in-place addmm re-reads from cache."""


def switch_cases(name: str, device: torch.device, dtype: torch.dtype, seed: int,
                 tmp: Path) -> tuple[dict[str, Case], dict[str, Any], list[tuple[int, int]]]:
    """The timed cases for one backbone, the byte counts the ratios are about, the targets' weight shapes."""
    bb = backbones.load(name, device, dtype, seed)
    plain = bb.model
    model = copy.deepcopy(plain)
    sw = WeightSwitcher(attach_slots(model), pack=True)  # as the service runs it
    a, b, c = ({k: w.to(device) for k, w in backbones.random_adapters(sw.sites, seed + i).items()} for i in (1, 2, 3))
    delta_a, delta_b = sw.prepare("a", a), sw.prepare("b", b)
    affected = sw.live_tensors(range(len(sw.targets)))
    src, dst = _flat_pair(affected)
    hot = WeightSwitcher(attach_slots(copy.deepcopy(plain)), pack=True)
    hot_a, hot_b = hot.prepare("a", a), hot.prepare("b", b)
    hot.activate(hot_a)
    merged_a = hot.snapshot(hot_a)
    hot.activate(hot_b)
    merged_b = hot.snapshot(hot_b)  # both hot from now on
    finetuned = {k: v.clone() for k, v in plain.state_dict().items()}  # one full model per task
    path = tmp / f"{name}.safetensors"
    save_file({k: v.contiguous().cpu() for k, v in finetuned.items()}, str(path))

    cases = {
        "switch": Case(lambda: sw.activate(delta_b), setup=lambda: sw.activate(delta_a)),
        "switch_hot": Case(lambda: hot.activate(hot_b, merged_b), setup=lambda: hot.activate(hot_a, merged_a)),
        "to_base": Case(lambda: sw.activate(None), setup=lambda: sw.activate(delta_a)),
        "from_base": Case(lambda: sw.activate(delta_a), setup=lambda: sw.activate(None)),
        "copy": Case(lambda: dst.copy_(src)),
        "prepare": Case(lambda: sw.prepare("c", c)),
        "reload_memory": Case(lambda: plain.load_state_dict(finetuned)),
        "reload_disk": Case(lambda: plain.load_state_dict(load_file(str(path), device=str(device)))),
        "deepcopy": Case(lambda: copy.deepcopy(plain)),
    }
    facts = {"targets": len(sw.targets), "affected_bytes": backbones.nbytes(affected),
             "delta_bytes": delta_a.nbytes(), "model_bytes": backbones.model_nbytes(plain)}
    return cases, facts, [tuple(t.weight_2d.shape) for t in sw.targets]


def _flat_pair(tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Two contiguous buffers of the total size, device and dtype of ``tensors``: the copy floor's."""
    n = sum(t.numel() for t in tensors)
    src = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(tensors[0].device, tensors[0].dtype)
    return src, torch.empty_like(src)


class _Kernels:
    """Standalone tensors of the targets' weight shapes ``[out, in]`` (seeded), and every candidate switch
    kernel over them, each a method: what :func:`kernel_cases` times."""

    NAMES = ("copy", "copy_loop", "foreach_copy", "addmm", "mm_only", "chunked", "stacked", "swap")

    def __init__(self, shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype, seed: int,
                 hidden: int) -> None:
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g).to(device, dtype)

        self.base = [rnd(*s) for s in shapes]
        self.live = [torch.empty_like(t) for t in self.base]
        self.u = [rnd(s[0], hidden) for s in shapes]
        self.a = [rnd(hidden, s[1]) for s in shapes]
        self.params = [nn.Parameter(t.clone(), requires_grad=False) for t in self.base]
        self.cached = [[torch.addmm(bw, uu, aa) for bw, uu, aa in zip(self.base, self.u, self.a, strict=True)]
                       for _ in range(2)]
        self.which = 0
        self.flat_src, self.flat_dst = _flat_pair(self.base)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(shapes):
            groups.setdefault(tuple(s), []).append(i)
        self.stacked_args = [(torch.stack([self.base[i] for i in idx]), torch.stack([self.u[i] for i in idx]),
                              torch.stack([self.a[i] for i in idx])) for idx in groups.values()]
        self.stacked_out = [torch.empty_like(b) for b, _, _ in self.stacked_args]

    def copy(self) -> None:
        self.flat_dst.copy_(self.flat_src)

    def copy_loop(self) -> None:
        for lv, bw in zip(self.live, self.base, strict=True):
            lv.copy_(bw)

    def foreach_copy(self) -> None:
        torch._foreach_copy_(self.live, self.base)

    def addmm(self) -> None:
        for lv, bw, uu, aa in zip(self.live, self.base, self.u, self.a, strict=True):
            torch.addmm(bw, uu, aa, out=lv)

    def mm_only(self) -> None:
        for lv, uu, aa in zip(self.live, self.u, self.a, strict=True):
            torch.mm(uu, aa, out=lv)

    def chunked(self) -> None:
        for lv, bw, uu, aa in zip(self.live, self.base, self.u, self.a, strict=True):
            rows = max(1, CHUNK_BYTES // (bw.shape[1] * bw.element_size()))
            for i in range(0, bw.shape[0], rows):
                part = lv[i:i + rows]
                part.copy_(bw[i:i + rows])
                part.addmm_(uu[i:i + rows], aa)

    def stacked(self) -> None:
        for out, (bw, uu, aa) in zip(self.stacked_out, self.stacked_args, strict=True):
            torch.baddbmm(bw, uu, aa, out=out)

    def swap(self) -> None:
        self.which ^= 1
        for p, t in zip(self.params, self.cached[self.which], strict=True):
            p.data = t


def kernel_cases(shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype,
                 seed: int, hidden: int = 8) -> dict[str, Case]:
    """Candidate switch kernels on standalone tensors of the targets' weight shapes ``[out, in]``."""
    kernels = _Kernels(shapes, device, dtype, seed, hidden)
    return {name: Case(getattr(kernels, name)) for name in _Kernels.NAMES}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--min-time", type=float, help="seconds per timing sample (default 0.05; quick: 0)")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel-level comparison")
    args = p.parse_args(argv)
    run = cli.Run(NAME, args, argv)
    archs = cli.pick(args.archs, QUICK["archs"], FULL["archs"], args.quick)
    repeats = cli.pick(args.repeats, QUICK["repeats"], FULL["repeats"], args.quick)
    min_time = cli.pick(args.min_time, 0.0, 0.05, args.quick)
    rows, kernels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in archs:
            for dt in run.dtypes:
                dtype = backbones.DTYPES[dt]
                run.log.info("%s %s", name, dt)
                cases, facts, shapes = switch_cases(name, run.device, dtype, args.seed, Path(tmp))
                samples = timing.measure(cases, repeats=repeats, warmup=args.warmup, min_time=min_time,
                                         device=run.device)
                rows.append(_row(name, dt, samples, facts))
                if not args.no_kernels:
                    ks = timing.measure(kernel_cases(shapes, run.device, dtype, args.seed), repeats=repeats,
                                        warmup=args.warmup, min_time=min_time, device=run.device)
                    kernels.append({"arch": name, "dtype": dt,
                                    **{k: timing.summarize(v) for k, v in ks.items()},
                                    "vs_copy": {k: timing.paired_ratio(v, ks["copy"]) for k, v in ks.items()}})
                del cases
    if run.device.type == "cpu" and any(k != "fp32" for k in run.dtypes):
        run.note("CPU half precision: activate() may fold in float32 and round once (no fast CPU bf16 matmul); "
                 "the kernel table times the plain addmm in the target dtype.")
    run.note("reload_memory keeps each task's full fine-tuned state dict on the device (its best case); "
             "reload_disk reads a safetensors file from a warm page cache.")
    worst = max(rows, key=lambda r: r["ratios"]["switch_vs_copy"])
    worst_hot = max(rows, key=lambda r: r["ratios"]["switch_hot_vs_copy"])
    results = {"rows": rows, "kernels": kernels,
               "goal": {"switch_vs_copy_max": GOAL, "met": sum(r["ratios"]["switch_vs_copy"] <= GOAL for r in rows),
                        "met_hot": sum(r["ratios"]["switch_hot_vs_copy"] <= GOAL for r in rows),
                        "of": len(rows), "worst": {"arch": worst["arch"], "dtype": worst["dtype"],
                                                   "switch_vs_copy": worst["ratios"]["switch_vs_copy"]},
                        "worst_hot": {"arch": worst_hot["arch"], "dtype": worst_hot["dtype"],
                                      "switch_vs_copy": worst_hot["ratios"]["switch_hot_vs_copy"]}}}
    config = {"archs": archs, "repeats": repeats, "warmup": args.warmup, "min_time_s": min_time,
              "dtypes": run.dtypes, "adapter": {"hidden": 8, "groups": 2, "scale": 1.0},
              "chunk_bytes": CHUNK_BYTES}
    return run.finish(config, results, render, plot)


def _row(name: str, dt: str, samples: dict[str, list[float]], facts: dict[str, Any]) -> dict[str, Any]:
    copy_s = samples["copy"]
    switch_s = samples["switch"]
    med = {k: timing.summarize(v) for k, v in samples.items()}
    return {
        "arch": name, "dtype": dt, **facts, "times": med,
        "ratios": {
            "switch_vs_copy": timing.paired_ratio(switch_s, copy_s),
            "switch_hot_vs_copy": timing.paired_ratio(samples["switch_hot"], copy_s),
            "to_base_vs_copy": timing.paired_ratio(samples["to_base"], copy_s),
            "from_base_vs_copy": timing.paired_ratio(samples["from_base"], copy_s),
            "prepare_vs_switch": timing.paired_ratio(samples["prepare"], switch_s),
            "reload_memory_vs_switch": timing.paired_ratio(samples["reload_memory"], switch_s),
            "reload_disk_vs_switch": timing.paired_ratio(samples["reload_disk"], switch_s),
            "deepcopy_vs_switch": timing.paired_ratio(samples["deepcopy"], switch_s),
        },
        # read + write of the affected bytes per copy: the bandwidth the floor runs at
        "copy_gb_per_s": 2 * facts["affected_bytes"] / med["copy"]["median_s"] / 1e9,
    }


def render(payload: dict[str, Any]) -> str:
    """Markdown: goal verdict, the switch table, the naive alternatives, and the kernel table."""
    res = payload["results"]
    goal, w = res["goal"], res["goal"]["worst"]
    t = markdown.fmt_s
    parts = [
        f"Goal: switch A -> B <= {goal['switch_vs_copy_max']} x one copy of the affected weights. Cold switch "
        f"(rank-r addmm from pristine): met in **{goal['met']}/{goal['of']}**, worst **{w['switch_vs_copy']:.2f} x** "
        f"({w['arch']}, {w['dtype']}). Hot switch (task in the live tier): met in "
        f"**{goal['met_hot']}/{goal['of']}**, worst **{goal['worst_hot']['switch_vs_copy']:.2f} x** "
        f"({goal['worst_hot']['arch']}, {goal['worst_hot']['dtype']}).",
        *_cold_explained(res["kernels"]),
        "",
        "Medians; ratios in brackets are medians of per-round ratios (switch cases: x copy; "
        "naive alternatives: x switch).",
        "",
    ]
    table = []
    for r in res["rows"]:
        m, q = r["times"], r["ratios"]
        table.append([
            r["arch"], r["dtype"], markdown.fmt_bytes(r["affected_bytes"]),
            f"{t(m['copy']['median_s'])} ({r['copy_gb_per_s']:.1f} GB/s)",
            f"{t(m['switch']['median_s'])} (x{q['switch_vs_copy']:.2f})",
            f"{t(m['switch_hot']['median_s'])} (x{q['switch_hot_vs_copy']:.2f})",
            f"{t(m['to_base']['median_s'])} (x{q['to_base_vs_copy']:.2f})",
            f"{t(m['from_base']['median_s'])} (x{q['from_base_vs_copy']:.2f})",
            f"{t(m['prepare']['median_s'])}",
            f"{t(m['reload_memory']['median_s'])} (x{q['reload_memory_vs_switch']:.1f})",
            f"{t(m['reload_disk']['median_s'])} (x{q['reload_disk_vs_switch']:.1f})",
            f"{t(m['deepcopy']['median_s'])} (x{q['deepcopy_vs_switch']:.1f})",
        ])
    parts.append(markdown.md_table(["backbone", "dtype", "affected weights", "copy (floor)", "switch A->B (cold)",
                                  "switch A->B (hot)", "A->base", "base->A", "prepare (once per task)",
                                  "reload state dict", "reload from disk", "deepcopy"], table))
    if res["kernels"]:
        parts += ["", "Kernels on tensors of the targets' weight shapes (x copy):", ""]
        parts.append(markdown.md_table(
            ["backbone", "dtype", *KERNELS],
            [[k["arch"], k["dtype"], *(f"{t(k[n]['median_s'])} (x{k['vs_copy'][n]:.2f})" for n in KERNELS)]
             for k in res["kernels"]]))
    return "\n".join(parts)


def _cold_explained(kernels: list[dict[str, Any]]) -> list[str]:
    """Why a cold switch costs what it does, from the kernel table: the addmm alone, on the same shapes."""
    if not kernels:
        return []
    ratios = [k["vs_copy"]["addmm"] for k in kernels]
    return ["", f"A cold switch is bound by the ``addmm`` kernel itself: ``out = base + u a`` alone runs at "
            f"x{min(ratios):.2f} to x{max(ratios):.2f} one copy on the targets' shapes here (kernel table), since "
            "torch computes it as a copy of ``base`` into ``out`` and then a GEMM updating ``out``: two passes over "
            "the weights. Below 1.5x needs a fused one-pass kernel (e.g. Triton on a GPU). The service keeps "
            "recently merged tasks' weights in its live tier (``REPSERVE_LIVE_CACHE_BYTES``), switching at the copy "
            "floor; a cold switch is the first merge of a task, or after its eviction."]


def plot(payload: dict[str, Any], path: Path) -> None:
    """Per backbone: bars of median times (log scale), the copy floor as a line."""
    rows = payload["results"]["rows"]
    fig, axes = plots.subplots(len(rows), 1, width=4.6)
    for ax, r in zip(axes[0], rows, strict=True):
        names = [c for c in CASES if c != "copy"]
        ax.bar(names, [r["times"][c]["median_s"] * 1e3 for c in names], color="tab:blue")
        ax.axhline(r["times"]["copy"]["median_s"] * 1e3, color="tab:red", lw=1, label="copy (floor)")
        ax.axhline(GOAL * r["times"]["copy"]["median_s"] * 1e3, color="tab:red", lw=1, ls="--", label="1.5 x copy")
        ax.set(title=f"{r['arch']} {r['dtype']}", ylabel="ms")
        plots.log_axes(ax)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.legend(fontsize=6)
    plots.save_figure(fig, path)


if __name__ == "__main__":
    main()
