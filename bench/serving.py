"""Serving under load: end-to-end HTTP on loopback, RepServe's policies against one model copy per task.

A temporary store gets ``--tasks`` tasks for the backbone (random non-trivial adapters, 10-class heads).
Servers run as real processes on free loopback ports, all started once and kept up for the whole run:
``python -m service --policy P`` for each policy (``merged``, ``mixed``, ``auto``) and the baseline
(:mod:`bench.serving_baseline`: the same tasks as separate merged model copies, same decode/preprocess
code, one inference thread, greedy per-task batching up to the same ``--max-batch``).

The load generator is a closed loop: ``--concurrency`` asyncio clients (one ``httpx.AsyncClient``) send
``--requests`` requests of one small real JPEG each (scikit-image photos), bounded in count and by
``--time-cap`` seconds; the task of each request follows a seeded mix:
- ``single``: every request for one task;
- ``uniform``: uniform over all tasks;
- ``zipf``: Zipf(s=``--zipf-s``) over the tasks (task k with probability ~ 1/k^s).
Within a round every server gets the same request sequence per mix; the (server, mix) loads run
interleaved in the round, the first one rotating, each after untimed warm-up requests. Figures: requests/s
and images/s of answered requests (any non-200 is an error and is counted), client-side p50/p95/p99
latency, the servers' own timings and batch sizes, weight switches and CPU time per request; medians over
rounds, ratios as medians of per-round ratios (same round, same sequence). Also recorded: each server's
RSS and command line, and ``auto``'s cost-model estimates at ready and at the end. Servers get
``--threads`` torch threads, by default one fewer than the usable CPUs: client and servers share the
machine, and oversubscribed OpenMP threads stall forwards for seconds. Goal: ``auto`` under Zipf >=
0.8 x ``auto`` single-task throughput.

    python -m bench.serving [--quick] [--repeats 5] [--requests 400] [--concurrency 16] [--arch embedded]
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import backbones, cli, markdown, plots, taskgen
from .loadgen import MIXES, Loads, interleaved, median, photos, throughput_vs
from .markdown import fmt_ms, fmt_num, fmt_x
from .servers import ServerProcess, sigterm_exits, stopping

TITLE = "Serving under load"
NAME = "serving"
log = logging.getLogger(f"bench.{NAME}")
POLICIES = ("merged", "mixed", "auto")
BASELINE = "baseline"
GOAL = 0.8
FULL = {"tasks": 20, "requests": 400, "concurrency": 16, "repeats": 5, "policies": list(POLICIES),
        "time_cap": 120.0}
QUICK = {"tasks": 2, "requests": 20, "concurrency": 4, "repeats": 1, "policies": ["auto"], "time_cap": 20.0}


def start_servers(policies: Sequence[str], baseline: bool, store: Path, arch: str, args: Any, run: cli.Run,
                  logs: Path, stack: contextlib.ExitStack) -> dict[str, ServerProcess]:
    """Every server of one backbone, started together (start-up overlaps), each stopped by ``stack``. The
    baseline holds every task's model from the start (``--preload``, no cache bound)."""
    shared = ["--store", str(store), "--backbone", backbones.arch_name(arch), "--seed", str(args.seed),
              "--device", run.device.type, "--dtype", backbones.dtype_name(run.dtypes[0])]
    servers: dict[str, ServerProcess] = {}
    for policy in policies:
        flags = [*shared, "--policy", policy, "--torch-threads", str(args.threads), "--max-batch",
                 str(args.max_batch), "--store-poll-s", "0", "--builtin-task", "", "--log-level", "warning",
                 *args.service_args]
        servers[policy] = stack.enter_context(stopping(ServerProcess(policy, "service", flags,
                                                                     logs / f"{policy}.log")))
    if baseline:
        taskgen.export_models(store, logs / "models", arch, seed=args.seed)
        flags = [*shared, "--models", str(logs / "models"), "--preload", "--threads", str(args.threads),
                 "--max-batch", str(args.baseline_max_batch or args.max_batch)]
        servers[BASELINE] = stack.enter_context(stopping(ServerProcess(BASELINE, "bench.serving_baseline", flags,
                                                                       logs / f"{BASELINE}.log")))
    for name, server in servers.items():
        run.log.info("%s ready after %.1f s (%s)", name, server.wait_ready(args.start_timeout), server.url)
    return servers


def bench_arch(arch: str, args: Any, run: cli.Run, *, tasks: int, requests: int, concurrency: int,
               repeats: int, policies: list[str], mixes: list[str], time_cap: float) -> dict[str, Any]:
    """All configurations of one backbone: store, servers, interleaved rounds, per-configuration rows."""
    image_size = args.image_size or taskgen.default_image_size(arch)
    names = [taskgen.task_name(i) for i in range(tasks)]
    images = photos(args.photo_px)
    per_request = args.images_per_request
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        facts = taskgen.build_store(root / "store", arch, tasks=tasks, distinct=tasks, image_size=image_size,
                                    seed=args.seed)
        run.log.info("%s: %d tasks at %s px; starting %d servers", arch, tasks, facts["input_size"][1:],
                     len(policies) + (not args.no_baseline))
        servers = start_servers(policies, not args.no_baseline, root / "store", arch, args, run, root, stack)
        ready_memory = {name: s.memory() for name, s in servers.items()}
        ready_costs = {name: s.costs() for name, s in servers.items()}
        loads = Loads(names, images, requests=requests, warmup_requests=args.warmup * concurrency, seed=args.seed,
                      zipf_s=args.zipf_s, concurrency=concurrency, time_cap_s=time_cap, timeout_s=args.request_timeout,
                      per_request=per_request)
        for r, (srv, mix) in interleaved([(srv, mix) for mix in mixes for srv in servers], repeats):
            server = servers[srv]
            loads.warm(server.url, mix, r)
            switches, cpu = server.counter("repserve_task_switches_total"), server.cpu_seconds()
            stats = loads.measure(server.url, mix, r)
            switches_after, cpu_after = server.counter("repserve_task_switches_total"), server.cpu_seconds()
            ok = max(stats["ok"], 1)
            stats["switches_per_request"] = (None if switches is None or switches_after is None
                                             else (switches_after - switches) / ok)
            stats["server_cpu_ms_per_request"] = None if cpu is None or cpu_after is None else \
                (cpu_after - cpu) * 1e3 / ok
            rounds.setdefault((srv, mix), []).append(stats)
            run.log.info("round %d/%d %-8s %-7s %6.1f req/s  p50 %s  p99 %s  errors %d", r + 1, repeats, srv,
                         mix, stats["req_per_s"], fmt_ms(stats["p50_ms"]), fmt_ms(stats["p99_ms"]), stats["errors"])
        memory = {name: {**{f"ready_{k}": v for k, v in ready_memory[name].items()}, **s.memory()}
                  for name, s in servers.items()}
        commands = {name: s.command.replace(str(root), "<tmp>") for name, s in servers.items()}
        costs = {name: {"ready": ready_costs[name], "end": s.costs()} for name, s in servers.items()
                 if ready_costs[name] is not None}
    rows = _rows(rounds, list(servers), mixes, per_request)
    goal = throughput_vs(rounds, ("auto", "zipf"), ("auto", "single")) if ("auto", "zipf") in rounds else None
    return {"arch": arch, **facts, "tasks": tasks, "rows": rows, "memory": memory, "cost_model": costs,
            "server_commands": commands,
            "auto_zipf_vs_single": goal}


def _rows(rounds: dict[tuple[str, str], list[dict[str, Any]]], servers: list[str], mixes: list[str],
          per_request: int) -> list[dict[str, Any]]:
    """Medians over rounds per (server, mix), plus the paired ratios to the same server's single-task
    throughput and to the baseline under the same mix."""
    rows = []
    for srv in servers:
        for mix in mixes:
            rs = rounds[srv, mix]
            thr = [x["req_per_s"] for x in rs]
            codes: Counter[str] = Counter()
            for x in rs:
                codes.update(x["error_codes"])
            q = statistics.quantiles(thr, n=4) if len(thr) >= 2 else [thr[0], thr[0], thr[0]]
            row: dict[str, Any] = {
                "server": srv, "kind": "baseline" if srv == BASELINE else "repserve", "mix": mix,
                "rounds": len(rs), "req_per_s": statistics.median(thr), "req_per_s_q1": q[0], "req_per_s_q3": q[2],
                "images_per_s": statistics.median(x["images_per_s"] for x in rs),
                **{p: median([x[p] for x in rs]) for p in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "batch_mean",
                                                            "mixed_share", "switches_per_request",
                                                            "server_cpu_ms_per_request")},
                "server_ms": {k: median([x["server_ms"][k] for x in rs]) for k in rs[0]["server_ms"]},
                "planned": sum(x["planned"] for x in rs), "sent": sum(x["sent"] for x in rs),
                "ok": sum(x["ok"] for x in rs), "errors": sum(codes.values()), "error_codes": dict(codes),
                "capped_rounds": sum(x["sent"] < x["planned"] for x in rs),
                "vs_single": throughput_vs(rounds, (srv, mix), (srv, "single")),
                "vs_baseline": throughput_vs(rounds, (srv, mix), (BASELINE, mix)) if srv != BASELINE else None,
                "per_round": rs,
            }
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--policies", type=cli.csv(), help="RepServe policies (default merged,mixed,auto; quick: auto)")
    p.add_argument("--mixes", type=cli.csv(), default=list(MIXES), help="task mixes: single,uniform,zipf")
    p.add_argument("--tasks", type=int, help="tasks in the store (default 20; quick: 2)")
    p.add_argument("--requests", type=int, help="requests per measured load (default 400; quick: 20)")
    p.add_argument("--concurrency", type=int, help="closed-loop clients (default 16; quick: 4)")
    p.add_argument("--images-per-request", type=int, default=1, help="images per request (>1: multipart)")
    p.add_argument("--image-size", type=int, help=f"tasks' input size in px (default {taskgen.CONV_IMAGE_SIZE} for the "
                   "embedded backbone, the backbone's own otherwise)")
    p.add_argument("--photo-px", type=int, default=128, help="width of the JPEGs sent")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent of the zipf mix")
    p.add_argument("--max-batch", type=int, default=16, help="most images per forward, every server")
    p.add_argument("--baseline-max-batch", type=int, help="the baseline's batch cap (default --max-batch; 1: none)")
    p.add_argument("--no-baseline", action="store_true", help="RepServe policies only")
    p.add_argument("--service-args", type=shlex.split, default=[],
                   help='extra flags for every RepServe server, e.g. "--max-delay-ms 2"')
    p.add_argument("--time-cap", type=float, help="seconds after which a load sends no new request (default 120; "
                   "quick: 20); loads cut short are counted in the result")
    p.add_argument("--request-timeout", type=float, default=60.0, help="client timeout per request, seconds")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to be ready")
    threads = next(a for a in p._actions if a.dest == "threads")
    threads.default = max(1, threads.default - 1)
    next(a for a in p._actions if a.dest == "warmup").help = "untimed waves of --concurrency requests before each load"
    threads.help = ("torch threads of every server (default: usable CPUs - 1, at least 1: the load generator "
                    "and the servers' HTTP threads need a core; oversubscribed OpenMP threads stall)")
    args = p.parse_args(argv)
    run = cli.Run(NAME, args, argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    pick = {k: cli.pick(getattr(args, k, None), QUICK[k], FULL[k], args.quick) for k in FULL}
    archs = args.archs or ["embedded"]
    unknown = (set(pick["policies"]) - set(POLICIES)) | (set(args.mixes) - set(MIXES))
    if unknown:
        raise SystemExit(f"unknown policies/mixes {sorted(unknown)}; choose from {POLICIES} and {MIXES}")
    if len(run.dtypes) > 1:
        run.note(f"servers run in {run.dtypes[0]} only")
    run.note("Client and servers share the machine: the load generator's own CPU time is part of every figure, "
             "alike for all servers. Latency is client-side (send to answer), throughput counts answered requests.")
    with sigterm_exits():
        per_arch = [bench_arch(a, args, run, tasks=pick["tasks"], requests=pick["requests"],
                               concurrency=pick["concurrency"], repeats=pick["repeats"], policies=pick["policies"],
                               mixes=args.mixes, time_cap=pick["time_cap"]) for a in archs]
    capped = sum(r["capped_rounds"] for a in per_arch for r in a["rows"])
    if capped:
        run.note(f"{capped} loads hit the {pick['time_cap']} s time cap before sending all requests")
    ratios = {a["arch"]: a["auto_zipf_vs_single"] for a in per_arch if a["auto_zipf_vs_single"] is not None}
    results = {"archs": per_arch,
               "goal": {"auto_zipf_vs_single_min": GOAL, "auto_zipf_vs_single": ratios,
                        "met": all(v >= GOAL for v in ratios.values()) if ratios else None},
               "errors": sum(r["errors"] for a in per_arch for r in a["rows"])}
    config = {"archs": archs, **pick, "mixes": args.mixes, "zipf_s": args.zipf_s, "warmup_waves": args.warmup,
              "images_per_request": args.images_per_request, "photo_px": args.photo_px,
              "max_batch": args.max_batch, "baseline_max_batch": args.baseline_max_batch or args.max_batch,
              "server_threads": args.threads, "service_args": args.service_args, "head_classes": taskgen.HEAD_CLASSES,
              "adapter": {"hidden": 8, "groups": 2, "scale": 1.0}, "dtype": run.dtypes[0]}
    return run.finish(config, results, render, plot)


# --------------------------------------------------------------------------------------------- output





def render(payload: dict[str, Any]) -> str:
    """Markdown: goal verdict, then per backbone one row per (mix, server) and the servers' memory."""
    res, cfg = payload["results"], payload["config"]
    goal = res["goal"]
    verdict = ", ".join(f"{a} **x{v:.2f}**" for a, v in goal["auto_zipf_vs_single"].items()) or "not measured"
    parts = [
        f"Goal: `auto` under Zipf >= {goal['auto_zipf_vs_single_min']} x `auto` single-task throughput: {verdict}"
        + ("" if goal["met"] is None else f" ({'met' if goal['met'] else 'not met'})") + f". Errors: {res['errors']}.",
        "",
        f"Closed loop: {cfg['concurrency']} clients, {cfg['requests']} requests per load ({cfg['images_per_request']} "
        f"JPEG of {cfg['photo_px']} px each), {cfg['repeats']} interleaved rounds; mixes over {cfg['tasks']} tasks "
        f"(Zipf s={cfg['zipf_s']}). Every server batches at most {cfg['max_batch']} images; the baseline holds one "
        f"merged model copy per task and batches only requests of one task (up to {cfg['baseline_max_batch']}). "
        "Throughput and latency are medians over rounds; *vs single* = the same server's single-task throughput, "
        "*vs copies* = the baseline's under the same mix (medians of per-round ratios). *batch* = mean batch size "
        "a request was served in, *mixed* = share of requests served by a mixed batch, *switches* = weight "
        "switches per request, *server CPU / req* = CPU time of the server process (all threads) per request.",
    ]
    for a in res["archs"]:
        table = []
        for mix in cfg["mixes"]:
            for r in (r for r in a["rows"] if r["mix"] == mix):
                table.append([mix, r["server"], fmt_num(r["req_per_s"]), fmt_num(r["images_per_s"]),
                              fmt_ms(r["p50_ms"]), fmt_ms(r["p95_ms"]), fmt_ms(r["p99_ms"]), r["errors"],
                              fmt_x(r["vs_single"]), fmt_x(r["vs_baseline"]), fmt_num(r["batch_mean"]),
                              fmt_num(r["mixed_share"], ".2f"), fmt_num(r["switches_per_request"], ".2f"),
                              fmt_ms(r.get("server_cpu_ms_per_request"))])
        mem = ", ".join(f"{name} {m['rss_bytes'] / 2**20:.0f} MiB" for name, m in a["memory"].items()
                        if "rss_bytes" in m)
        cmds = "; ".join(f"`{c}`" for name, c in a["server_commands"].items()
                         if name in (BASELINE, next(iter(a["server_commands"]))))
        parts += ["", f"**{a['arch']}** ({a['backbone']}, input {a['input_size'][1]} px, {a['tasks']} tasks)", "",
                  markdown.md_table(["mix", "server", "req/s", "images/s", "p50", "p95", "p99", "errors", "vs single",
                                   "vs copies", "batch", "mixed", "switches", "server CPU / req"], table),
                  "", f"Server RSS after the run (torch's libraries included): {mem}. Servers: {cmds}."]
    return "\n".join(parts)


def plot(payload: dict[str, Any], path: Path) -> None:
    """Per backbone: throughput bars per mix and server (whiskers: quartiles over rounds), and latency
    (bar p50, markers p95 and p99)."""
    archs = payload["results"]["archs"]
    mixes = payload["config"]["mixes"]
    fig, axes = plots.subplots(2, len(archs), width=5.5)
    colors = {"merged": "tab:blue", "mixed": "tab:green", "auto": "tab:orange", BASELINE: "tab:red"}
    for row_axes, a in zip(axes, archs, strict=True):
        servers = list(dict.fromkeys(r["server"] for r in a["rows"]))
        width = 0.8 / len(servers)
        by = {(r["server"], r["mix"]): r for r in a["rows"]}
        thr_ax, lat_ax = row_axes
        for j, srv in enumerate(servers):
            xs = [i + (j - (len(servers) - 1) / 2) * width for i in range(len(mixes))]
            rows = [by[srv, m] for m in mixes]
            label = "one copy per task" if srv == BASELINE else f"RepServe {srv}"
            thr = [r["req_per_s"] for r in rows]
            err = [[t - r["req_per_s_q1"] for t, r in zip(thr, rows, strict=True)],
                   [r["req_per_s_q3"] - t for t, r in zip(thr, rows, strict=True)]]
            thr_ax.bar(xs, thr, width, yerr=err, capsize=2, color=colors.get(srv), label=label)
            lat_ax.bar(xs, [r["p50_ms"] or 0 for r in rows], width, color=colors.get(srv), label=label, alpha=0.8)
            lat_ax.plot(xs, [r["p95_ms"] or 0 for r in rows], "^", color="black", ms=4,
                        label="p95" if j == 0 else None)
            lat_ax.plot(xs, [r["p99_ms"] or 0 for r in rows], "_", color="black", ms=8, mew=2,
                        label="p99" if j == 0 else None)
        for ax in row_axes:
            ax.set_xticks(range(len(mixes)), mixes)
            ax.legend(fontsize=6)
        thr_ax.set(title=f"{a['arch']}: throughput", ylabel="requests/s")
        lat_ax.set(title=f"{a['arch']}: latency (bar p50)", ylabel="ms")
    plots.save_figure(fig, path)


if __name__ == "__main__":
    main()
