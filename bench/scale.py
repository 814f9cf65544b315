"""Many tasks per replica: RepServe against an LRU of full fine-tuned models, at the same memory budget.

For each N in ``--tasks`` (default 20, 1,000 and 10,000): a store of N tasks (:mod:`bench.taskgen`:
``--distinct`` real bundles, the other tasks copies of them under new names), each task's full model file,
and two servers on loopback, started one after the other (start-up is timed alone):
- RepServe (``python -m service``, policy ``auto``) with its task tiers sized to ``--budget-mib``: host
  60%, device 25%, live 15% (``REPSERVE_*_CACHE_BYTES``);
- the baseline (:mod:`bench.serving_baseline`): an LRU of K = budget / one model's bytes full models per
  process, a task's model loaded from its file on a miss (Ray Serve multiplexing, TorchServe), in two
  forms: ``baseline`` loads into the module of an evicted model (the strongest simple form: the goals are
  measured against it) and ``baseline-new`` builds a new model per miss, as Ray Serve's documented
  multiplexing does.
Both batch up to ``--max-batch`` images per forward and run ``--threads`` torch threads.

Measured per N:
1. start-up: seconds from process start to ``/readyz`` 200 and RSS then (RepServe reads the catalog and
   manifests only; the baseline reads the manifests and loads no model);
2. cold tasks: on the idle server, one request each to ``--cold`` tasks never requested before (RepServe:
   store -> host -> device; the baseline: file -> model), then the same requests again (warm): latency
   p50/p99 and the server's own load time;
3. load: closed loop (``--concurrency`` clients, ``--requests`` requests of one JPEG each) under Zipf
   (``--zipf-s``) and uniform mixes over the N tasks, ``--repeats`` rounds, the two servers interleaved
   within a round (same request sequence), each load after ``--warmup-requests`` untimed requests of its
   mix: throughput, p50/p99, loads from the store per request (RepServe: host-tier loads; the baseline:
   model loads), RSS after.
Goal: at N >= 1,000, RepServe >= 3x the baseline's throughput and <= 1/2 its p99 (Zipf and uniform); at
N = 20 >= 1.0x.

    python -m bench.scale [--quick] [--tasks 20,1000,10000] [--budget-mib 512] [--repeats 3]
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from . import backbones, cli, markdown, plots, taskgen
from .loadgen import (
    Loads,
    add_load_arguments,
    interleaved,
    median,
    percentile,
    photos,
    summarize_rounds,
    throughput_vs,
)
from .markdown import fmt_bytes, fmt_ms, fmt_x
from .servers import ServerProcess, sigterm_exits, stopping

TITLE = "Many tasks per replica"
NAME = "scale"
log = logging.getLogger(f"bench.{NAME}")
REPSERVE, BASELINE, BASELINE_NEW = "repserve", "baseline", "baseline-new"
BASELINES = {BASELINE: [], BASELINE_NEW: ["--no-reuse-modules"]}
MIXES = ("zipf", "uniform")
TIER_SHARES = {"host": 0.60, "device": 0.25, "live": 0.15}
GOAL_MANY, GOAL_FEW, GOAL_P99 = 3.0, 1.0, 0.5
FULL = {"tasks": [20, 1000, 10000], "requests": 400, "concurrency": 16, "repeats": 3, "cold": 50,
        "warmup_requests": 400, "time_cap": 120.0, "budget_mib": 512}
QUICK = {"tasks": [30], "requests": 24, "concurrency": 4, "repeats": 1, "cold": 4, "warmup_requests": 8,
         "time_cap": 20.0, "budget_mib": 64}  # a budget below 30 models: both servers evict


def tier_bytes(budget: int) -> dict[str, int]:
    return {tier: int(budget * share) for tier, share in TIER_SHARES.items()}


def start(name: str, module: str, flags: list[str], logs: Path, timeout: float, stack: contextlib.ExitStack
          ) -> tuple[ServerProcess, float]:
    server = stack.enter_context(stopping(ServerProcess(name, module, flags, logs / f"{name}.log")))
    return server, server.wait_ready(timeout)


def cold_requests(server: ServerProcess, names: Sequence[str], image: bytes) -> dict[str, Any]:
    """One request per task, one at a time, twice (cold, then warm): client latency and server load time."""
    out: dict[str, Any] = {}
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        for phase in ("cold", "warm"):
            latency, load = [], []
            for name in names:
                start = time.perf_counter()
                r = client.post(f"/classify?task={name}", content=image, headers={"Content-Type": "image/jpeg"})
                latency.append((time.perf_counter() - start) * 1e3)
                if r.status_code != 200:
                    raise RuntimeError(f"{server.name}: {phase} request for {name} got {r.status_code}: {r.text}")
                load.append(r.json()["timings"].get("load_ms", 0.0))
            out[phase] = {"p50_ms": percentile(latency, 50), "p99_ms": percentile(latency, 99),
                          "load_p50_ms": percentile(load, 50), "load_p99_ms": percentile(load, 99), "n": len(names)}
    return out


def store_loads(server: ServerProcess) -> float | None:
    """Tasks read from the store so far: RepServe's host-tier loads, the baseline's model loads."""
    if server.name in BASELINES:
        body = server.readyz()
        return None if body is None else float(body["loads"])
    return server.counter("repserve_task_loads_total", tier="host") or 0.0


def bench_n(n: int, args: Any, run: cli.Run, *, pick: dict[str, Any], budget: int,
            baselines: dict[str, list[str]]) -> dict[str, Any]:
    """Every measurement at N tasks: store, servers one after the other, cold tasks, interleaved loads."""
    arch = args.archs[0] if args.archs else "embedded"
    names = [taskgen.task_name(i) for i in range(n)]
    images = photos(args.photo_px)
    tiers = tier_bytes(budget)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        t0 = time.perf_counter()
        facts = taskgen.build_store(root / "store", arch, tasks=n, distinct=args.distinct,
                                    image_size=args.image_size or taskgen.default_image_size(arch), seed=args.seed)
        models = taskgen.export_models(root / "store", root / "models", arch, seed=args.seed)
        facts["generate_s"] = time.perf_counter() - t0
        k = max(1, budget // models["model_bytes"])
        shared = ["--store", str(root / "store"), "--backbone", backbones.arch_name(arch), "--seed", str(args.seed),
                  "--device", run.device.type, "--dtype", backbones.dtype_name(run.dtypes[0])]
        servers: dict[str, ServerProcess] = {}
        startup: dict[str, dict[str, Any]] = {}
        rs_flags = [*shared, "--policy", "auto", "--torch-threads", str(args.threads), "--max-batch",
                    str(args.max_batch), "--store-poll-s", "0", "--builtin-task", "", "--log-level", "warning",
                    *(f"--{tier}-cache-bytes={b}" for tier, b in tiers.items())]
        bl_flags = [*shared, "--models", str(root / "models"), "--cache-models", str(k), "--threads",
                    str(args.threads), "--max-batch", str(args.max_batch)]
        starts = [(REPSERVE, "service", rs_flags)]
        starts += [(name, "bench.serving_baseline", [*bl_flags, *extra]) for name, extra in baselines.items()]
        for name, module, flags in starts:
            servers[name], seconds = start(name, module, flags, root, args.start_timeout, stack)
            startup[name] = {"ready_s": seconds, **servers[name].memory()}
            run.log.info("N=%d %s ready after %.1f s, RSS %.0f MiB", n, name, seconds,
                         startup[name].get("rss_bytes", 0) / 2**20)
        cold_names = names[::-1][:pick["cold"]]  # the least popular under Zipf: never requested before
        cold = {name: cold_requests(s, cold_names, images[0]) for name, s in servers.items()}
        rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
        loads = Loads(names, images, requests=pick["requests"], warmup_requests=pick["warmup_requests"],
                      seed=args.seed, zipf_s=args.zipf_s, concurrency=pick["concurrency"], time_cap_s=pick["time_cap"],
                      timeout_s=args.request_timeout, mixes=MIXES)
        for r, (srv, mix) in interleaved([(srv, mix) for mix in MIXES for srv in servers], pick["repeats"]):
            server = servers[srv]
            loads.warm(server.url, mix, r)
            before = store_loads(server)
            stats = loads.measure(server.url, mix, r)
            after = store_loads(server)
            stats["store_loads_per_request"] = None if before is None or after is None else \
                (after - before) / max(stats["ok"], 1)
            stats.update({f"end_{k}": v for k, v in server.memory().items()})
            rounds.setdefault((srv, mix), []).append(stats)
            run.log.info("N=%d round %d %-8s %-7s %6.1f req/s p50 %.0f ms p99 %.0f ms loads/req %.2f errors %d",
                         n, r + 1, srv, mix, stats["req_per_s"], stats["p50_ms"] or 0, stats["p99_ms"] or 0,
                         stats["store_loads_per_request"] or 0, stats["errors"])
        baseline_stats = {name: servers[name].readyz() or {} for name in baselines}
    rows = []
    servers_order = [REPSERVE, *baselines]
    for mix in MIXES:
        for srv in servers_order:
            rs = rounds[srv, mix]
            vs = srv == REPSERVE
            rows.append({
                "server": srv, "mix": mix,
                **summarize_rounds(rs, ("p50_ms", "p95_ms", "p99_ms", "batch_mean", "mixed_share",
                                        "store_loads_per_request")),
                "rss_bytes": max(x.get("end_rss_bytes", 0) for x in rs),
                "server_ms": {key: median([x["server_ms"][key] for x in rs]) for key in rs[0]["server_ms"]},
                "vs_baseline": throughput_vs(rounds, (srv, mix), (BASELINE, mix)) if vs else None,
                "vs_baseline_new": throughput_vs(rounds, (srv, mix), (BASELINE_NEW, mix)) if vs else None,
                "p99_vs_baseline": _ratio(median([x["p99_ms"] for x in rs]),
                                          median([x["p99_ms"] for x in rounds[BASELINE, mix]]))
                if vs else None,
                "per_round": rs,
            })
    return {"n": n, **facts, **models, "cache_models": k, "tiers": tiers, "startup": startup, "cold": cold,
            "rows": rows, "baseline_cache": baseline_stats}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=cli.csv(int), help="task counts N (default 20,1000,10000; quick: 30)")
    p.add_argument("--budget-mib", type=int, help="task memory per server: RepServe's tiers, the baseline's K "
                   "models (default 512; quick: 64)")
    p.add_argument("--cold", type=int, help="tasks requested once each, cold then warm (default 50; quick: 5)")
    add_load_arguments(p, requests="default 400; quick: 24", concurrency="default 16; quick: 4", server="server")
    p.add_argument("--no-baseline-new", action="store_true", help="only the strongest baseline (module reuse)")
    threads = next(a for a in p._actions if a.dest == "threads")
    threads.default = max(1, threads.default - 1)
    threads.help = "torch threads of each server (default: usable CPUs - 1: the load generator needs a core)"
    args = p.parse_args(argv)
    run = cli.Run(NAME, args, argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    pick = {key: cli.pick(getattr(args, key, None), QUICK[key], FULL[key], args.quick) for key in FULL}
    budget = pick["budget_mib"] << 20
    run.note(f"Tasks are {args.distinct} distinct bundles and renamed copies of them (hard links), and the "
             "baseline's model files likewise: both servers read them from a warm page cache. That flatters the "
             "baseline most: 10,000 real full models of the embedded backbone are 96 GiB and would be read from "
             "disk or object storage on every miss.")
    run.note("Client and servers share the machine; servers are measured one at a time (the other idles).")
    with sigterm_exits():
        baselines = {k: v for k, v in BASELINES.items() if k == BASELINE or not args.no_baseline_new}
        per_n = [bench_n(n, args, run, pick=pick, budget=budget, baselines=baselines) for n in pick["tasks"]]
    goal = {}
    for res in per_n:
        for mix in MIXES:
            row = next(r for r in res["rows"] if r["server"] == REPSERVE and r["mix"] == mix)
            want = GOAL_MANY if res["n"] >= 1000 else GOAL_FEW
            goal[f"{res['n']}/{mix}"] = {
                "throughput_vs_baseline": row["vs_baseline"], "want": want,
                "p99_vs_baseline": row["p99_vs_baseline"],
                "met": row["vs_baseline"] is not None and row["vs_baseline"] >= want and
                (res["n"] < 1000 or (row["p99_vs_baseline"] or 9) <= GOAL_P99)}
    results = {"per_n": per_n, "goal": goal, "errors": sum(r["errors"] for res in per_n for r in res["rows"])}
    config = {"arch": args.archs[0] if args.archs else "embedded", **pick,
              "tier_shares": TIER_SHARES, "distinct": args.distinct, "zipf_s": args.zipf_s,
              "max_batch": args.max_batch, "server_threads": args.threads, "dtype": run.dtypes[0]}
    return run.finish(config, results, render, plot)


# --------------------------------------------------------------------------------------------- output




def render(payload: dict[str, Any]) -> str:
    res, cfg = payload["results"], payload["config"]
    verdict = "; ".join(f"N={key}: x{g['throughput_vs_baseline']:.2f} throughput"
                        + (f", p99 x{g['p99_vs_baseline']:.2f}" if g["p99_vs_baseline"] is not None else "")
                        + f" ({'met' if g['met'] else 'not met'})" for key, g in res["goal"].items())
    first = res["per_n"][0]
    parts = [
        f"Goal: at N >= 1,000 RepServe >= {GOAL_MANY}x the baseline's throughput and <= {GOAL_P99} x its p99; at "
        f"N = 20 >= {GOAL_FEW}x. {verdict}. Errors: {res['errors']}.",
        "",
        f"Same task memory for both servers: {cfg['budget_mib']} MiB. RepServe's tiers: host "
        f"{fmt_bytes(first['tiers']['host'])}, device {fmt_bytes(first['tiers']['device'])}, live "
        f"{fmt_bytes(first['tiers']['live'])}; the baselines: an LRU of K = {first['cache_models']} full models "
        f"({fmt_bytes(first['model_bytes'])} each), loaded from their files on a miss into an evicted "
        "model's module (`baseline`) or into a new model (`baseline-new`, as Ray Serve's multiplexing). Closed loop: "
        f"{cfg['concurrency']} clients, {cfg['requests']} requests per load (1 JPEG each), {cfg['repeats']} rounds, "
        f"{cfg['warmup_requests']} untimed requests before each load; Zipf s={cfg['zipf_s']}. *loads/req* = tasks "
        "read from the store per request (RepServe: into the host tier; the baseline: model loads).",
        "",
        markdown.md_table(
            ["N", "mix", "server", "req/s", "vs baseline", "vs baseline-new", "p50", "p99", "p99 vs baseline",
             "loads/req", "batch", "RSS"],
            [[res["n"], r["mix"], r["server"], f"{r['req_per_s']:.1f}", fmt_x(r["vs_baseline"]),
              fmt_x(r.get("vs_baseline_new")), fmt_ms(r["p50_ms"]),
              fmt_ms(r["p99_ms"]), fmt_x(r["p99_vs_baseline"]),
              "-" if r["store_loads_per_request"] is None else f"{r['store_loads_per_request']:.2f}",
              "-" if r["batch_mean"] is None else f"{r['batch_mean']:.1f}", fmt_bytes(r["rss_bytes"])]
             for res in res["per_n"] for r in res["rows"]]),
        "",
        "Start-up (process start to `/readyz` 200; RepServe reads the catalog and the manifests, no tensor) and "
        f"cold tasks ({first['cold'][REPSERVE]['cold']['n']} tasks never requested before, one request each on the "
        "idle server, then the same again warm; *load* = the server's own time to load the task):",
        "",
        markdown.md_table(
            ["N", "server", "ready after", "RSS at ready", "cold p50", "cold p99", "cold load p50", "warm p50",
             "warm p99"],
            [[res["n"], srv, f"{res['startup'][srv]['ready_s']:.1f} s",
              fmt_bytes(res["startup"][srv].get("rss_bytes", 0)), fmt_ms(c["cold"]["p50_ms"]),
              fmt_ms(c["cold"]["p99_ms"]), fmt_ms(c["cold"]["load_p50_ms"]), fmt_ms(c["warm"]["p50_ms"]),
              fmt_ms(c["warm"]["p99_ms"])]
             for res in res["per_n"] for srv, c in res["cold"].items()]),
        "",
        "Where a request's time goes on the server (means, ms): *load* = waiting for the task to be loaded "
        "(RepServe: into the device tier; the baselines: the model), *queue* = waiting for a batch, "
        "*inference* = the batch that served it. The baselines' requests spend their time waiting for model "
        "loads: one model per task cannot share a forward with another task, and every miss reads a full model.",
        "",
        markdown.md_table(
            ["N", "mix", "server", "decode", "load", "queue", "inference", "total"],
            [[res["n"], r["mix"], r["server"], *(f"{r['server_ms'][k]:.1f}" if r["server_ms"][k] is not None
                                                   else "-" for k in ("decode_ms", "load_ms", "queue_ms",
                                                                      "inference_ms", "total_ms"))]
             for res in res["per_n"] for r in res["rows"]]),
        "",
        "Stores: " + "; ".join(f"N={res['n']}: generated in {res['generate_s']:.1f} s" for res in res["per_n"]) + ".",
    ]
    return "\n".join(parts)


def plot(payload: dict[str, Any], path: Path) -> None:
    """Throughput and p99 against N (log x), per server and mix; start-up against N."""
    per_n = payload["results"]["per_n"]
    ns = [res["n"] for res in per_n]
    fig, grid = plots.subplots(3, width=4.4)
    axes = grid[0]
    styles = {REPSERVE: "tab:blue", BASELINE: "tab:red", BASELINE_NEW: "tab:orange"}
    names = {REPSERVE: "RepServe", BASELINE: "LRU of full models", BASELINE_NEW: "LRU, new model per miss"}
    for srv, color in styles.items():
        if not all(any(r["server"] == srv for r in res["rows"]) for res in per_n):
            continue
        for mix, marker in zip(MIXES, ("o", "s"), strict=True):
            rows = [next(r for r in res["rows"] if r["server"] == srv and r["mix"] == mix) for res in per_n]
            label = f"{names[srv]}, {mix}"
            axes[0].plot(ns, [r["req_per_s"] for r in rows], marker=marker, color=color, label=label,
                         ls="-" if mix == "zipf" else "--")
            axes[1].plot(ns, [r["p99_ms"] or 0 for r in rows], marker=marker, color=color, label=label,
                         ls="-" if mix == "zipf" else "--")
        axes[2].plot(ns, [res["startup"][srv]["ready_s"] for res in per_n], marker="o", color=color,
                     label=names[srv])
    axes[0].set(title="throughput", ylabel="requests/s", xlabel="tasks N")
    axes[1].set(title="p99 latency", ylabel="ms", xlabel="tasks N")
    axes[2].set(title="start-up (to ready)", ylabel="s", xlabel="tasks N")
    for ax in axes:
        plots.log_axes(ax, x=True, y=False, xticks=ns)
        ax.legend(fontsize=6)
    plots.save_figure(fig, path)


if __name__ == "__main__":
    main()
