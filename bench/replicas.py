"""Many replicas: task-affine routing (nginx ``hash $arg_task consistent``) against round-robin.

A store of N tasks (:mod:`bench.taskgen`), ``--replicas`` RepServe processes on it, each with the same
task memory (tiers as in :mod:`bench.scale`), and a real nginx in front of them (Debian's package; the
upstream block is the one of ``deploy/nginx.conf``), in two configurations started side by side:
``hash`` (``hash $arg_task consistent``: each task's requests go to one replica, which holds only its
share of the tasks) and ``round-robin`` (nginx's default: every replica sees every task). Closed-loop loads
(Zipf and uniform task mixes, the same seeded request sequence for both routings, interleaved round by
round) measure throughput, latency, and the replicas' own counters: tasks read from the store
(host-tier loads) and moved to the device (device-tier loads) per request, and how evenly the requests
spread over the replicas.

    python -m bench.replicas [--quick] [--tasks 2000] [--replicas 2] [--budget-mib 64] [--repeats 3]
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import backbones, cli, markdown, plots, taskgen
from .loadgen import (
    Loads,
    add_load_arguments,
    interleaved,
    median,
    photos,
    summarize_rounds,
    throughput_vs,
)
from .markdown import fmt_bytes, fmt_ms, fmt_num, fmt_x
from .scale import start, tier_bytes
from .servers import ServerProcess, free_port, sigterm_exits, wait_until_serving

TITLE = "Many replicas: task-affine routing"
NAME = "replicas"
log = logging.getLogger(f"bench.{NAME}")
HASH, ROUND_ROBIN = "hash", "round-robin"
ROUTINGS = {HASH: "hash $arg_task consistent;", ROUND_ROBIN: ""}
MIXES = ("zipf", "uniform")
FULL = {"tasks": 2000, "replicas": 2, "requests": 600, "concurrency": 16, "repeats": 3, "warmup_requests": 600,
        "time_cap": 120.0, "budget_mib": 64}
QUICK = {"tasks": 40, "replicas": 2, "requests": 24, "concurrency": 4, "repeats": 1, "warmup_requests": 8,
         "time_cap": 20.0, "budget_mib": 16}

NGINX_CONF = """worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    client_max_body_size 64m;
    upstream repserve {{
        {balance}
{servers}
        keepalive 64;
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://repserve;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(routing: str, backends: Sequence[ServerProcess], root: Path) -> Iterator[str]:
    """A real nginx on a free loopback port balancing over ``backends`` by ``routing``; yields its URL."""
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if binary is None:
        raise SystemExit("bench.replicas needs nginx (Debian: apt-get install nginx)")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{b.port} max_fails=0;" for b in backends)
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, balance=ROUTINGS[routing], servers=servers, port=port))
    with open(root / "nginx.log", "wb") as out:
        proc = subprocess.Popen([binary, "-p", str(root), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/readyz", proc, 20, name="nginx", interval_s=0.1,
                           why=lambda: (root / "error.log").read_text(errors="replace"))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def counters(replicas: Sequence[ServerProcess]) -> list[dict[str, Any]]:
    """Per replica: requests answered (in all and by task) and tasks loaded into the host and device tiers."""
    out = []
    for r in replicas:
        samples = r.metrics() or {}
        by_task: Counter[str] = Counter()
        for (name, labels), v in samples.items():
            if name == "repserve_requests_total":
                by_task[dict(labels)["task"]] += v
        out.append({"requests": sum(by_task.values()), "by_task": by_task,
                    "host_loads": samples.get(("repserve_task_loads_total", (("tier", "host"),)), 0.0),
                    "device_loads": samples.get(("repserve_task_loads_total", (("tier", "device"),)), 0.0)})
    return out


def delta(after: list[dict[str, Any]], before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, help="tasks N in the store (default 2000; quick: 40)")
    p.add_argument("--replicas", type=int, help="RepServe processes behind nginx (default 2)")
    p.add_argument("--budget-mib", type=int, help="task memory per replica, split over its tiers (default 64)")
    add_load_arguments(p, requests="default 600; quick: 24", concurrency="default 16; quick: 4", server="replica")
    threads = next(a for a in p._actions if a.dest == "threads")
    threads.default = 1
    threads.help = "torch threads of each replica (default 1: the replicas share the machine)"
    args = p.parse_args(argv)
    run = cli.Run(NAME, args, argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    pick = {key: cli.pick(getattr(args, key, None), QUICK[key], FULL[key], args.quick) for key in FULL}
    arch = args.archs[0] if args.archs else "embedded"
    n, budget = pick["tasks"], pick["budget_mib"] << 20
    names = [taskgen.task_name(i) for i in range(n)]
    images = photos(args.photo_px)
    run.note("Replicas, nginx and the load generator share the machine: absolute throughput is the machine's, "
             "the ratios compare the two routings under the same load.")
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with sigterm_exits(), tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, \
            contextlib.ExitStack() as stack:
        root = Path(tmp)
        facts = taskgen.build_store(root / "store", arch, tasks=n, distinct=args.distinct,
                                    image_size=args.image_size or taskgen.default_image_size(arch), seed=args.seed)
        flags = ["--store", str(root / "store"), "--backbone", backbones.arch_name(arch), "--seed", str(args.seed),
                 "--device", run.device.type, "--dtype", backbones.dtype_name(run.dtypes[0]), "--policy", "auto",
                 "--torch-threads", str(args.threads), "--max-batch", str(args.max_batch), "--store-poll-s", "0",
                 "--builtin-task", "", "--log-level", "warning",
                 *(f"--{tier}-cache-bytes={b}" for tier, b in tier_bytes(budget).items())]
        # one set of replicas per routing, so neither inherits the other's warm caches
        fleets = {routing: [start(f"{routing}-{i}", "service", flags, root, args.start_timeout, stack)[0]
                            for i in range(pick["replicas"])] for routing in ROUTINGS}
        urls = {routing: stack.enter_context(nginx(routing, fleet, root / f"nginx-{routing}"))
                for routing, fleet in fleets.items()}
        loads = Loads(names, images, requests=pick["requests"], warmup_requests=pick["warmup_requests"],
                      seed=args.seed, zipf_s=args.zipf_s, concurrency=pick["concurrency"], time_cap_s=pick["time_cap"],
                      timeout_s=args.request_timeout, mixes=MIXES)
        for r, (routing, mix) in interleaved([(routing, mix) for mix in MIXES for routing in ROUTINGS],
                                             pick["repeats"]):
            loads.warm(urls[routing], mix, r)
            before = counters(fleets[routing])
            stats = loads.measure(urls[routing], mix, r)
            after = counters(fleets[routing])
            change = delta(after, before)
            ok = max(stats["ok"], 1)
            served = [d["requests"] for d in change]
            replicas_of = Counter(task for d in change for task, v in d["by_task"].items() if v > 0)
            stats.update({
                "host_loads_per_request": sum(d["host_loads"] for d in change) / ok,
                "device_loads_per_request": sum(d["device_loads"] for d in change) / ok,
                "replica_requests": served,
                "replica_share": [s / max(sum(served), 1) for s in served],
                "tasks": len(replicas_of),
                "tasks_on_several_replicas": sum(1 for c in replicas_of.values() if c > 1),
                "rss_bytes": [s.memory().get("rss_bytes", 0) for s in fleets[routing]],
            })
            rounds.setdefault((routing, mix), []).append(stats)
            run.log.info("round %d %-11s %-7s %6.1f req/s p99 %.0f ms host loads/req %.3f device loads/req "
                         "%.3f shares %s errors %d", r + 1, routing, mix, stats["req_per_s"],
                         stats["p99_ms"] or 0, stats["host_loads_per_request"],
                         stats["device_loads_per_request"],
                         "/".join(f"{s:.2f}" for s in stats["replica_share"]), stats["errors"])
    rows = []
    for mix in MIXES:
        for routing in ROUTINGS:
            rs = rounds[routing, mix]
            rows.append({
                "routing": routing, "mix": mix,
                **summarize_rounds(rs, ("p50_ms", "p99_ms", "batch_mean", "host_loads_per_request",
                                        "device_loads_per_request")),
                "max_share": max(max(x["replica_share"]) for x in rs),
                "split_tasks": median([x["tasks_on_several_replicas"] / max(x["tasks"], 1) for x in rs]),
                "vs_round_robin": throughput_vs(rounds, (routing, mix), (ROUND_ROBIN, mix)) if routing == HASH
                else None,
                "per_round": rs,
            })
    results = {"rows": rows, "errors": sum(r["errors"] for r in rows), "store": facts,
               "tiers": tier_bytes(budget)}
    config = {"arch": arch, **pick, "distinct": args.distinct, "zipf_s": args.zipf_s, "max_batch": args.max_batch,
              "replica_threads": args.threads, "dtype": run.dtypes[0]}
    return run.finish(config, results, render, plot)




def render(payload: dict[str, Any]) -> str:
    res, cfg = payload["results"], payload["config"]
    tiers = res["tiers"]
    by = {(r["routing"], r["mix"]): r for r in res["rows"]}

    def share(key: str, mix: str) -> str:
        h, rr = by[HASH, mix][key], by[ROUND_ROBIN, mix][key]
        return "-" if h is None or not rr else f"x{h / rr:.2f}"

    verdict = "; ".join(
        f"{mix}: hashing reads {share('host_loads_per_request', mix)} the store loads and "
        f"{share('device_loads_per_request', mix)} the device loads of round-robin per request, at "
        f"{fmt_x(by[HASH, mix]['vs_round_robin'])} its throughput, the busiest replica taking "
        f"{by[HASH, mix]['max_share']:.0%} of the requests" for mix in MIXES)
    return "\n".join([
        f"{verdict}. Every task's requests reach one replica under hashing (*split tasks* 0), so each replica "
        "holds only its share of the tasks; the price is the balance a hot task takes away (see deploy/README.md "
        "on hot tasks). Where a load is cheap next to a forward, as here (a task loads in ~8 ms on the CPU), "
        "the two routings serve alike; the fewer loads count where loads are dear (bigger bundles, an object "
        "store, a GPU busy with other tasks).",
        "",
        f"{cfg['replicas']} replicas behind nginx over one store of {cfg['tasks']} tasks, each replica with "
        f"{cfg['budget_mib']} MiB of task memory (host {fmt_bytes(tiers['host'])}, device "
        f"{fmt_bytes(tiers['device'])}, live {fmt_bytes(tiers['live'])}) and {cfg['replica_threads']} "
        f"torch thread. `hash` = `hash $arg_task consistent` (deploy/nginx.conf, the Ingress's "
        "`upstream-hash-by`), `round-robin` = nginx's default. Closed loop: "
        f"{cfg['concurrency']} clients, {cfg['requests']} requests per load (1 JPEG each), {cfg['repeats']} rounds, "
        f"{cfg['warmup_requests']} untimed requests before each load; Zipf s={cfg['zipf_s']}. *store loads/req* = "
        "tasks read from the store per request, *device loads/req* = tasks moved onto the device per request (all "
        "replicas); *split tasks* = share of the tasks requested in a load whose requests reached more than one "
        f"replica; *max share* = the busiest replica's share of the requests. Errors: {res['errors']}.",
        "",
        markdown.md_table(
            ["mix", "routing", "req/s", "vs round-robin", "p50", "p99", "store loads/req", "device loads/req",
             "split tasks", "max share", "batch"],
            [[r["mix"], r["routing"], f"{r['req_per_s']:.1f}", fmt_x(r["vs_round_robin"]), fmt_ms(r["p50_ms"]),
              fmt_ms(r["p99_ms"]), fmt_num(r["host_loads_per_request"], ".3f"),
              fmt_num(r["device_loads_per_request"], ".3f"), f"{r['split_tasks']:.2f}", f"{r['max_share']:.2f}",
              fmt_num(r["batch_mean"])] for r in res["rows"]]),
    ])


def plot(payload: dict[str, Any], path: Path) -> None:
    """Throughput and loads per request, per mix, for the two routings."""
    rows = payload["results"]["rows"]
    fig, grid = plots.subplots(2, width=4.4)
    axes = grid[0]
    width = 0.38
    for i, (routing, color) in enumerate(((HASH, "tab:blue"), (ROUND_ROBIN, "tab:gray"))):
        sel = [next(r for r in rows if r["routing"] == routing and r["mix"] == mix) for mix in MIXES]
        xs = [j + (i - 0.5) * width for j in range(len(MIXES))]
        axes[0].bar(xs, [r["req_per_s"] for r in sel], width, color=color, label=routing)
        axes[1].bar(xs, [r["device_loads_per_request"] or 0 for r in sel], width, color=color, label=routing)
    for ax, title, ylabel in ((axes[0], "throughput", "requests/s"),
                              (axes[1], "tasks moved to a device per request", "loads / request")):
        ax.set_xticks(range(len(MIXES)), MIXES)
        ax.set(title=title, ylabel=ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
