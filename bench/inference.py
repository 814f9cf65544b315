"""Zero-cost inference, the paper's claim: a merged task runs at the plain backbone's speed.

Per backbone, dtype and batch size, five variants run interleaved in the same rounds on the same input:
- ``plain``: the timm backbone as created, no slots, no hooks;
- ``merged``: RepServe serving one task: slots attached (empty slots keep no hooks), task folded in by
  :class:`WeightSwitcher` (what the engine runs for a batch of one task);
- ``unmerged``: the task's adapters run in the forward, base weights live (what PEFT-style serving does);
- ``mixed``: :func:`mixed_batch` with the rows spread over ``--mixed-tasks`` tasks, each held as the
  service holds it (:class:`PackedFolds`); the per-batch stack and gather of their folds is inside the
  clock, since the engine pays it on every mixed batch;
- ``plain_again``: a second copy of the plain backbone, an A/A control: its ratio to ``plain`` is the run's
  noise floor, the layout of another copy of the same weights in memory included (``merged`` is a copy too).
Figures: images/s and batch latency (medians over rounds) and each variant's speed relative to
``plain`` (median of per-round ratios). Goal: merged >= 0.99 x plain.

    python -m bench.inference [--quick] [--archs vit_tiny,vit_base] [--batches 1,8] [--repeats 7]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repadapter import RepAdapter, WeightSwitcher, attach_slots, mixed_batch

from . import backbones, cli, markdown, plots, timing
from .timing import Case

TITLE = "Zero-cost inference"
NAME = "inference"
VARIANTS = ("plain", "merged", "unmerged", "mixed", "plain_again")
GOAL = 0.99
FULL = {"archs": ["embedded", "vit_tiny", "vit_small", "vit_base"], "batches": [1, 8, 32, 64], "repeats": 15}
QUICK = {"archs": ["embedded", "vit_tiny"], "batches": [1], "repeats": 2}
CPU_CAPS = {"vit_base": {"max_batch": 8, "repeats": 9}, "vit_small": {"max_batch": 32, "repeats": 9}}
"""On a CPU the full default would take hours for vit_base at batch 64; caps apply to the defaults only
(explicit ``--batches``/``--repeats`` win) and are written into the result's notes."""


def build_variants(name: str, device: torch.device, dtype: torch.dtype, seed: int,
                   n_tasks: int) -> tuple[dict[str, Callable[[Tensor, Tensor], Tensor]], dict[str, Any]]:
    """Forward functions ``f(x [B,3,H,W], rows [B]) -> features [B, F]`` for every variant, and facts.

    Four models share the backbone's weights values: ``plain`` (and its twin ``plain_again``), ``merged``
    (task 0 folded in) and ``adapted`` (adapters in the slots: ``unmerged`` runs it as is, ``mixed`` sets
    per-row adapters, which take precedence over the slot's adapter).
    """
    bb = backbones.load(name, device, dtype, seed)
    plain = bb.model
    merged, adapted, plain_again = (copy.deepcopy(plain) for _ in range(3))
    merged_sites, adapted_sites = attach_slots(merged), attach_slots(adapted)
    tasks = [backbones.random_adapters(merged_sites, seed + 1 + i) for i in range(n_tasks)]
    switcher = WeightSwitcher(merged_sites, pack=True)  # the service's layout: weights in one buffer
    switcher.activate(switcher.prepare("task0", {k: w.to(device) for k, w in tasks[0].items()}))
    device_tasks = [{k: w.to(device, dtype) for k, w in t.items()} for t in tasks]
    served = [backbones.served_folds(bb, t, device, dtype) for t in tasks]  # as the device tier holds them
    for site in adapted_sites:
        site.slot.adapter = RepAdapter.from_weights(device_tasks[0][site.name], site.layout).eval()

    def mixed(x: Tensor, rows: Tensor) -> Tensor:
        with mixed_batch(adapted_sites, served, rows):
            return adapted(x)

    fns = {
        "plain": lambda x, rows: plain(x),
        "merged": lambda x, rows: merged(x),
        "unmerged": lambda x, rows: adapted(x),
        "mixed": mixed,
        "plain_again": lambda x, rows: plain_again(x),
    }
    facts = {"sites": len(merged_sites), "params": sum(p.numel() for p in plain.parameters()),
             "adapter_params": sum(t.numel() for w in tasks[0].values() for t in w.tensors().values())}
    return fns, facts


def check(fns: dict[str, Callable[[Tensor, Tensor], Tensor]], x: Tensor, rows: Tensor) -> dict[str, float]:
    """Relative errors proving the variants compute the same task: merged vs unmerged (task 0), and
    mixed row 0 (task 0) vs merged row 0."""
    with torch.inference_mode():
        ref = fns["unmerged"](x, rows).float()
        out = fns["merged"](x, rows).float()
        mix = fns["mixed"](x, rows).float()
    scale = ref.abs().max().clamp_min(1e-12)
    return {"merged_vs_unmerged": ((out - ref).abs().max() / scale).item(),
            "mixed_vs_merged_row0": ((mix[0] - out[0]).abs().max() / out[0].abs().max().clamp_min(1e-12)).item()}


def bench_batch(fns: dict[str, Callable[[Tensor, Tensor], Tensor]], batch: int, *, n_tasks: int, repeats: int,
                warmup: int, min_time: float, device: torch.device, dtype: torch.dtype,
                seed: int) -> list[dict[str, Any]]:
    """One batch size: all variants interleaved; a row per variant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, backbones.IMG_SIZE, backbones.IMG_SIZE, generator=g).to(device, dtype)
    rows = (torch.arange(batch) % n_tasks).to(device)
    with torch.inference_mode():
        samples = timing.measure({v: Case(lambda f=fns[v]: f(x, rows)) for v in VARIANTS}, repeats=repeats,
                                 warmup=warmup, min_time=min_time, device=device)
    out = []
    for v in VARIANTS:
        stats = timing.summarize(samples[v])
        out.append({"variant": v, "batch": batch, **stats, "images_per_s": batch / stats["median_s"],
                    "speed_vs_plain": timing.paired_ratio(samples["plain"], samples[v])})
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--batches", type=cli.csv(int), help="batch sizes (default 1,8,32,64; quick: 1)")
    p.add_argument("--mixed-tasks", type=int, default=4, help="tasks the rows of a mixed batch are spread over")
    p.add_argument("--min-time", type=float, help="seconds per timing sample (default 0.25; quick: 0)")
    args = p.parse_args(argv)
    run = cli.Run(NAME, args, argv)
    archs = cli.pick(args.archs, QUICK["archs"], FULL["archs"], args.quick)
    batches = cli.pick(args.batches, QUICK["batches"], FULL["batches"], args.quick)
    repeats = cli.pick(args.repeats, QUICK["repeats"], FULL["repeats"], args.quick)
    min_time = cli.pick(args.min_time, 0.0, 0.25, args.quick)
    capped = run.device.type == "cpu" and not args.quick
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    for name in archs:
        cap = CPU_CAPS.get(name, {}) if capped else {}
        arch_batches = batches if args.batches or "max_batch" not in cap else [b for b in batches
                                                                               if b <= cap["max_batch"]]
        arch_repeats = repeats if args.repeats or "repeats" not in cap else cap["repeats"]
        if (arch_batches, arch_repeats) != (batches, repeats):
            run.note(f"{name}: CPU cap, batches {arch_batches} and {arch_repeats} repeats (full: {batches}, "
                     f"{repeats}); run on a GPU or pass --batches/--repeats for the rest")
        for dt in run.dtypes:
            dtype = backbones.DTYPES[dt]
            fns, facts[name] = build_variants(name, run.device, dtype, args.seed, args.mixed_tasks)
            probe = torch.randn(2, 3, backbones.IMG_SIZE, backbones.IMG_SIZE).to(run.device, dtype)
            rows0 = (torch.arange(2) % args.mixed_tasks).to(run.device)
            checks.append({"arch": name, "dtype": dt, **check(fns, probe, rows0)})
            for b in arch_batches:
                run.log.info("%s %s batch %d", name, dt, b)
                for row in bench_batch(fns, b, n_tasks=args.mixed_tasks, repeats=arch_repeats, warmup=args.warmup,
                                       min_time=min_time, device=run.device, dtype=dtype, seed=args.seed):
                    rows.append({"arch": name, "dtype": dt, **row})
            del fns
    merged = [r for r in rows if r["variant"] == "merged"]
    worst = min(merged, key=lambda r: r["speed_vs_plain"])
    aa = [r["speed_vs_plain"] for r in rows if r["variant"] == "plain_again"]
    results = {
        "rows": rows,
        "checks": checks,
        "facts": facts,
        "goal": {"merged_vs_plain_min": GOAL, "met": sum(r["speed_vs_plain"] >= GOAL for r in merged),
                 "of": len(merged), "worst": {k: worst[k] for k in ("arch", "dtype", "batch", "speed_vs_plain")},
                 "aa_control_range": [min(aa), max(aa)]},
    }
    config = {"archs": archs, "batches": batches, "repeats": repeats, "warmup": args.warmup, "min_time_s": min_time,
              "mixed_tasks": args.mixed_tasks, "img_size": backbones.IMG_SIZE, "dtypes": run.dtypes,
              "adapter": {"hidden": 8, "groups": 2, "scale": 1.0}}
    return run.finish(config, results, render, plot)


def render(payload: dict[str, Any]) -> str:
    """Markdown: goal verdict, one table per dtype (images/s with speed relative to plain), checks."""
    res = payload["results"]
    goal = res["goal"]
    w = goal["worst"]
    lo, hi = goal["aa_control_range"]
    parts = [
        f"Goal: merged >= {goal['merged_vs_plain_min']} x plain. Met in **{goal['met']}/{goal['of']}** "
        f"configurations; worst merged/plain = **{w['speed_vs_plain']:.3f}** ({w['arch']}, {w['dtype']}, "
        f"batch {w['batch']}). Noise floor (A/A control, plain vs plain): {lo:.3f} .. {hi:.3f}"
        + (": every merged/plain ratio below the goal lies inside it (merged and plain run the same modules "
           "on the same shapes: what separates them is timing noise)." if w["speed_vs_plain"] >= lo else "."),
        "",
        "Images/s (median), and in brackets the speed relative to plain (median of per-round ratios). "
        "Latency = median time of one batch.",
    ]
    for dt in dict.fromkeys(r["dtype"] for r in res["rows"]):
        parts += ["", f"**{dt}**", ""]
        table = []
        keys = dict.fromkeys((r["arch"], r["batch"]) for r in res["rows"] if r["dtype"] == dt)
        for arch, b in keys:
            by = {r["variant"]: r for r in res["rows"] if (r["arch"], r["batch"], r["dtype"]) == (arch, b, dt)}
            cells = [f"{by['plain']['images_per_s']:.1f}"]
            cells += [f"{by[v]['images_per_s']:.1f} (x{by[v]['speed_vs_plain']:.3f})"
                      for v in ("merged", "unmerged", "mixed")]
            cells += [f"x{by['plain_again']['speed_vs_plain']:.3f}", markdown.fmt_s(by["plain"]["median_s"]),
                      markdown.fmt_s(by["merged"]["median_s"])]
            table.append([arch, b, *cells])
        parts.append(markdown.md_table(["backbone", "batch", "plain", "merged", "unmerged",
                                      "mixed", "A/A", "latency plain", "latency merged"], table))
    errs = ", ".join(f"{c['arch']} {c['dtype']}: {c['merged_vs_unmerged']:.1e}/{c['mixed_vs_merged_row0']:.1e}"
                     for c in res["checks"])
    parts += ["", f"Same-task check, max relative error merged vs unmerged / mixed vs merged: {errs}."]
    return "\n".join(parts)


def plot(payload: dict[str, Any], path: Path) -> None:
    """Top: images/s vs batch per backbone; bottom: speed relative to plain, with the 0.99 goal line."""
    rows = payload["results"]["rows"]
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plots.subplots(len(archs), 2)
    styles = {"fp32": "-", "bf16": "--", "fp16": ":"}
    colors = dict(zip(VARIANTS, ("black", "tab:blue", "tab:orange", "tab:green", "silver"),
                      strict=True))
    for col, arch in enumerate(archs):
        top, bottom = axes[0][col], axes[1][col]
        for v in VARIANTS:
            for dt in dict.fromkeys(r["dtype"] for r in rows):
                pts = [r for r in rows if (r["arch"], r["variant"], r["dtype"]) == (arch, v, dt)]
                if not pts:
                    continue
                label = f"{v} {dt}"
                bs = [r["batch"] for r in pts]
                style = {"ls": styles.get(dt, "-"), "marker": "o", "color": colors[v], "label": label}
                top.plot(bs, [r["images_per_s"] for r in pts], **style)
                if v != "plain":
                    bottom.plot(bs, [r["speed_vs_plain"] for r in pts], **style)
        batches = sorted({r["batch"] for r in rows if r["arch"] == arch})
        top.set(title=arch, xlabel="batch", ylabel="images/s")
        bottom.axhline(GOAL, color="grey", lw=0.8)
        bottom.set(xlabel="batch", ylabel="speed / plain (goal line 0.99)")
        plots.log_axes(top, x=True, xticks=batches)
        plots.log_axes(bottom, x=True, y=False, xticks=batches)
        top.legend(fontsize=6)
        bottom.legend(fontsize=6)
    plots.save_figure(fig, path)


if __name__ == "__main__":
    main()
