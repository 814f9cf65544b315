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

import asyncio
import contextlib
import ctypes
import io
import logging
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from repadapter import AdapterConfig, BackboneRef, LocalStore, Manifest, TaskBundle, attach_slots

from . import common

TITLE = "Serving under load"
NAME = "serving"
log = logging.getLogger(f"bench.{NAME}")
POLICIES = ("merged", "mixed", "auto")
MIXES = ("single", "uniform", "zipf")
BASELINE = "baseline"
GOAL = 0.8
HEAD_CLASSES = 10
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
FULL = {"tasks": 20, "requests": 400, "concurrency": 16, "repeats": 5, "policies": list(POLICIES),
        "time_cap": 120.0}
QUICK = {"tasks": 2, "requests": 20, "concurrency": 4, "repeats": 1, "policies": ["auto"], "time_cap": 20.0}
CONV_IMAGE_SIZE = 96
"""Input size of the embedded (convolutional) backbone's tasks: 5x fewer pixels than 224 keeps CPU loads
short; other backbones keep their own size (a ViT's position embedding is fixed)."""


# --------------------------------------------------------------------------------------------- store


def build_store(root: Path, arch: str, *, tasks: int, image_size: int | None, seed: int) -> dict[str, Any]:
    """``tasks`` bundles for ``arch`` (random non-trivial adapters on every site, seeded 10-class heads)
    written to a :class:`LocalStore` at ``root``; returns facts for the result."""
    bb = common.load(arch, torch.device("cpu"), torch.float32, seed)
    sites = attach_slots(bb.model)
    preprocess = bb.preprocess if image_size is None else bb.preprocess.with_size(image_size)
    store = LocalStore(root)
    g = torch.Generator().manual_seed(seed)
    f = bb.num_features
    for i in range(tasks):
        name = task_name(i)
        manifest = Manifest(name=name, labels=[f"{name}-c{c}" for c in range(HEAD_CLASSES)],
                            adapter=AdapterConfig(hidden=8, groups=2, scale=1.0), preprocess=preprocess,
                            backbone=BackboneRef(arch=bb.arch, fingerprint=bb.fingerprint))
        store.put(TaskBundle(manifest, common.random_adapters(sites, seed + 1 + i),
                             torch.randn(HEAD_CLASSES, f, generator=g) * (3.0 / f**0.5),
                             torch.randn(HEAD_CLASSES, generator=g) * 0.1))
    return {"backbone": bb.arch, "sites": len(sites), "input_size": list(preprocess.input_size),
            "params": sum(p.numel() for p in bb.model.parameters())}


def task_name(i: int) -> str:
    return f"task{i:02d}"


def request_plan(mix: str, tasks: int, n: int, seed: Sequence[int], zipf_s: float) -> list[int]:
    """Task index of each of ``n`` requests (seeded, so every server of a round gets the same sequence)."""
    rng = np.random.default_rng(list(seed))
    if mix == "single":
        return [0] * n
    if mix == "uniform":
        return rng.integers(0, tasks, n).tolist()
    if mix == "zipf":
        weights = 1.0 / np.arange(1, tasks + 1) ** zipf_s
        return rng.choice(tasks, n, p=weights / weights.sum()).tolist()
    raise ValueError(f"unknown mix {mix!r}; choose from {MIXES}")


def photos(px: int) -> list[bytes]:
    """Real photos (scikit-image's bundled ones) as ``px``-wide JPEGs, the request bodies."""
    from PIL import Image
    from skimage import data

    out = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        image = image.resize((px, max(1, round(px * image.height / image.width))))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------------------------- servers


def _parent_death_signal() -> Callable[[], object] | None:
    """A ``preexec_fn`` that makes a server get SIGTERM when the benchmark dies, even by SIGKILL, so no
    server outlives it (Linux ``prctl(PR_SET_PDEATHSIG)``; ``None`` elsewhere). libc is loaded here, in
    the parent: the child between fork and exec must not load libraries."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit while the benchmark runs, so ``finally`` blocks stop the servers (the
    default action would end the process on the spot). Main thread only; the old handler is restored."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server (``python -m <module> ...``) on a free loopback port; its output goes to ``log_path``.

    :meth:`stop` sends SIGTERM, then kills after a grace period; call it in a ``finally`` (``ExitStack``).
    """

    def __init__(self, name: str, module: str, args: Sequence[str], log_path: Path) -> None:
        self.name, self.port = name, free_port()
        self.command = shlex.join(["python", "-m", module, *args])  # as recorded: without the loopback port
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.cmd, cwd=common.ROOT, env=common.child_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=_parent_death_signal())

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float) -> float:
        """Seconds until ``/readyz`` answered 200; raises (with the log's tail) on exit or timeout."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return time.monotonic() - start
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")

    def memory(self) -> dict[str, int]:
        """Resident and peak resident bytes of the server process (Linux; empty elsewhere)."""
        out = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss_bytes" if key == "VmRSS" else "hwm_bytes"] = int(value.split()[0]) * 1024
        return out

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the server process used so far, all threads (Linux; ``None`` elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)

    def costs(self) -> dict[str, Any] | None:
        """RepServe's cost-model estimates (what ``auto`` decides on) from ``/readyz``; ``None`` elsewhere."""
        try:
            return httpx.get(f"{self.url}/readyz", timeout=10.0).json().get("costs")
        except (httpx.HTTPError, ValueError):
            return None

    def counter(self, metric: str) -> float | None:
        """An unlabelled counter from ``/metrics`` (RepServe only; ``None`` where there is none)."""
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=10.0).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith(metric + " "):
                return float(line.split()[1])
        return None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


# --------------------------------------------------------------------------------------------- load


@dataclass
class Sample:
    """One request as the client saw it; ``status`` is the HTTP code or the transport error's name."""

    latency_s: float
    status: int | str
    batch_sizes: list[int] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Load:
    samples: list[Sample]
    sent: int
    wall_s: float


async def _one(client: httpx.AsyncClient, task: str, blobs: list[bytes]) -> Sample:
    start = time.perf_counter()
    try:
        if len(blobs) == 1:
            r = await client.post(f"/classify?task={task}", content=blobs[0], headers={"Content-Type": "image/jpeg"})
        else:
            r = await client.post(f"/classify?task={task}",
                                  files=[("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)])
    except httpx.HTTPError as e:
        return Sample(time.perf_counter() - start, type(e).__name__)
    latency = time.perf_counter() - start
    if r.status_code != 200:
        return Sample(latency, r.status_code)
    body = r.json()
    if len(body.get("results", ())) != len(blobs):
        return Sample(latency, "wrong_result_count")
    return Sample(latency, 200, body.get("batch_sizes", []), body.get("modes", []), body.get("timings", {}))


async def _closed_loop(url: str, plan: Sequence[int], names: Sequence[str], images: Sequence[bytes], *,
                       per_request: int, concurrency: int, time_cap_s: float, timeout_s: float) -> Load:
    """``concurrency`` clients, each sending its next request when its last one is answered, until the
    plan is used up or ``time_cap_s`` passed (no new request after that; in-flight ones finish, bounded
    by ``timeout_s``)."""
    samples: list[Sample] = []
    sent = 0
    indices = iter(range(len(plan)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + time_cap_s

        async def client_loop() -> None:
            nonlocal sent
            for i in indices:  # shared iterator: every request is sent once
                if time.perf_counter() >= deadline:
                    return
                sent += 1
                blobs = [images[(i + j) % len(images)] for j in range(per_request)]
                samples.append(await _one(client, names[plan[i]], blobs))

        with contextlib.suppress(TimeoutError):  # hard bound: a hung server cannot hang the benchmark
            await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(concurrency))),
                                   time_cap_s + timeout_s + 5.0)
        wall = time.perf_counter() - start
    return Load(samples, sent, wall)


def run_load(url: str, plan: Sequence[int], names: Sequence[str], images: Sequence[bytes], *, per_request: int,
             concurrency: int, time_cap_s: float, timeout_s: float) -> Load:
    return asyncio.run(_closed_loop(url, plan, names, images, per_request=per_request, concurrency=concurrency,
                                    time_cap_s=time_cap_s, timeout_s=timeout_s))


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (``q`` in 0..100) of already sorted values; ``None`` if empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def load_stats(load: Load, *, planned: int, per_request: int) -> dict[str, Any]:
    """One load's figures: throughput of answered requests, latency percentiles (ms), errors by code,
    and the servers' own view (mean batch size, share of requests served by a mixed batch, timings)."""
    ok = [s for s in load.samples if s.status == 200]
    lat = sorted(s.latency_s * 1e3 for s in ok)
    errors = Counter(str(s.status) for s in load.samples if s.status != 200)
    if load.sent > len(load.samples):
        errors["unanswered"] += load.sent - len(load.samples)
    timings = {k: statistics.fmean(s.timings[k] for s in ok if k in s.timings) if ok else None
               for k in ("decode_ms", "queue_ms", "inference_ms", "total_ms")}
    return {
        "planned": planned, "sent": load.sent, "ok": len(ok), "errors": sum(errors.values()),
        "error_codes": dict(errors), "wall_s": load.wall_s,
        "req_per_s": len(ok) / load.wall_s, "images_per_s": len(ok) * per_request / load.wall_s,
        "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99),
        "mean_ms": statistics.fmean(lat) if lat else None,  # minus server_ms.total_ms: time outside the route
        "batch_mean": statistics.fmean(statistics.fmean(s.batch_sizes) for s in ok if s.batch_sizes)
        if any(s.batch_sizes for s in ok) else None,
        "mixed_share": sum("mixed" in s.modes for s in ok) / len(ok) if ok else None,
        "server_ms": timings,
    }


# --------------------------------------------------------------------------------------------- the run


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _paired(num: Sequence[float], den: Sequence[float]) -> float | None:
    """:func:`common.paired_ratio` over the rounds where the denominator is positive."""
    pairs = [(a, b) for a, b in zip(num, den, strict=True) if b > 0]
    return common.paired_ratio(*zip(*pairs, strict=True)) if pairs else None


def start_servers(policies: Sequence[str], baseline: bool, store: Path, arch: str, args: Any, run: common.Run,
                  logs: Path, stack: contextlib.ExitStack) -> dict[str, ServerProcess]:
    """Every server of one backbone, started together (start-up overlaps), each stopped by ``stack``."""
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[run.dtypes[0]]
    shared = ["--store", str(store), "--backbone", common.arch_name(arch), "--seed", str(args.seed),
              "--device", run.device.type, "--dtype", dtype]
    servers: dict[str, ServerProcess] = {}
    for policy in policies:
        flags = [*shared, "--policy", policy, "--torch-threads", str(args.threads), "--max-batch",
                 str(args.max_batch), "--store-poll-s", "0", "--builtin-task", "", "--log-level", "warning",
                 *args.service_args]
        servers[policy] = stack.enter_context(_stopping(ServerProcess(policy, "service", flags,
                                                                      logs / f"{policy}.log")))
    if baseline:
        flags = [*shared, "--threads", str(args.threads), "--max-batch", str(args.baseline_max_batch or args.max_batch)]
        servers[BASELINE] = stack.enter_context(_stopping(ServerProcess(BASELINE, "bench.serving_baseline", flags,
                                                                        logs / f"{BASELINE}.log")))
    for name, server in servers.items():
        run.log.info("%s ready after %.1f s (%s)", name, server.wait_ready(args.start_timeout), server.url)
    return servers


@contextlib.contextmanager
def _stopping(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        yield server
    finally:
        code = server.stop()
        log.debug("%s stopped with %s", server.name, code)


def bench_arch(arch: str, args: Any, run: common.Run, *, tasks: int, requests: int, concurrency: int,
               repeats: int, policies: list[str], mixes: list[str], time_cap: float) -> dict[str, Any]:
    """All configurations of one backbone: store, servers, interleaved rounds, per-configuration rows."""
    image_size = args.image_size or (CONV_IMAGE_SIZE if arch == "embedded" else None)
    names = [task_name(i) for i in range(tasks)]
    images = photos(args.photo_px)
    per_request = args.images_per_request
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        facts = build_store(root / "store", arch, tasks=tasks, image_size=image_size, seed=args.seed)
        run.log.info("%s: %d tasks at %s px; starting %d servers", arch, tasks, facts["input_size"][1:],
                     len(policies) + (not args.no_baseline))
        servers = start_servers(policies, not args.no_baseline, root / "store", arch, args, run, root, stack)
        ready_memory = {name: s.memory() for name, s in servers.items()}
        ready_costs = {name: s.costs() for name, s in servers.items()}
        configs = [(srv, mix) for mix in mixes for srv in servers]
        for r in range(repeats):
            k = r % len(configs)
            for srv, mix in configs[k:] + configs[:k]:
                server = servers[srv]
                m = MIXES.index(mix)
                common_load = {"per_request": per_request, "concurrency": concurrency, "time_cap_s": time_cap,
                               "timeout_s": args.request_timeout}
                warm = request_plan(mix, tasks, args.warmup * concurrency, (args.seed, 1000 + r, m), args.zipf_s)
                if warm:
                    run_load(server.url, warm, names, images, **common_load)
                plan = request_plan(mix, tasks, requests, (args.seed, r, m), args.zipf_s)
                switches, cpu = server.counter("repserve_task_switches_total"), server.cpu_seconds()
                stats = load_stats(run_load(server.url, plan, names, images, **common_load), planned=requests,
                                   per_request=per_request)
                switches_after, cpu_after = server.counter("repserve_task_switches_total"), server.cpu_seconds()
                ok = max(stats["ok"], 1)
                stats["switches_per_request"] = (None if switches is None or switches_after is None
                                                 else (switches_after - switches) / ok)
                stats["server_cpu_ms_per_request"] = None if cpu is None or cpu_after is None else \
                    (cpu_after - cpu) * 1e3 / ok
                rounds.setdefault((srv, mix), []).append(stats)
                run.log.info("round %d/%d %-8s %-7s %6.1f req/s  p50 %s  p99 %s  errors %d", r + 1, repeats, srv,
                             mix, stats["req_per_s"], _ms(stats["p50_ms"]), _ms(stats["p99_ms"]), stats["errors"])
        memory = {name: {**{f"ready_{k}": v for k, v in ready_memory[name].items()}, **s.memory()}
                  for name, s in servers.items()}
        commands = {name: s.command.replace(str(root), "<tmp>") for name, s in servers.items()}
        costs = {name: {"ready": ready_costs[name], "end": s.costs()} for name, s in servers.items()
                 if ready_costs[name] is not None}
    rows = _rows(rounds, list(servers), mixes, per_request)
    goal = None
    if ("auto", "zipf") in rounds and ("auto", "single") in rounds:
        goal = _paired([x["req_per_s"] for x in rounds["auto", "zipf"]],
                       [x["req_per_s"] for x in rounds["auto", "single"]])
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
                **{p: _median([x[p] for x in rs]) for p in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "batch_mean",
                                                            "mixed_share", "switches_per_request",
                                                            "server_cpu_ms_per_request")},
                "server_ms": {k: _median([x["server_ms"][k] for x in rs]) for k in rs[0]["server_ms"]},
                "planned": sum(x["planned"] for x in rs), "sent": sum(x["sent"] for x in rs),
                "ok": sum(x["ok"] for x in rs), "errors": sum(codes.values()), "error_codes": dict(codes),
                "capped_rounds": sum(x["sent"] < x["planned"] for x in rs),
                "vs_single": _paired(thr, [x["req_per_s"] for x in rounds[srv, "single"]])
                if (srv, "single") in rounds else None,
                "vs_baseline": _paired(thr, [x["req_per_s"] for x in rounds[BASELINE, mix]])
                if srv != BASELINE and (BASELINE, mix) in rounds else None,
                "per_round": rs,
            }
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = common.parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--policies", type=common.csv(), help="RepServe policies (default merged,mixed,auto; quick: auto)")
    p.add_argument("--mixes", type=common.csv(), default=list(MIXES), help="task mixes: single,uniform,zipf")
    p.add_argument("--tasks", type=int, help="tasks in the store (default 20; quick: 2)")
    p.add_argument("--requests", type=int, help="requests per measured load (default 400; quick: 20)")
    p.add_argument("--concurrency", type=int, help="closed-loop clients (default 16; quick: 4)")
    p.add_argument("--images-per-request", type=int, default=1, help="images per request (>1: multipart)")
    p.add_argument("--image-size", type=int, help=f"tasks' input size in px (default {CONV_IMAGE_SIZE} for the "
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
    run = common.Run(NAME, args, argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    pick = {k: common.pick(getattr(args, k, None), QUICK[k], FULL[k], args.quick) for k in FULL}
    archs = args.archs or ["embedded"]
    unknown = (set(pick["policies"]) - set(POLICIES)) | (set(args.mixes) - set(MIXES))
    if unknown:
        raise SystemExit(f"unknown policies/mixes {sorted(unknown)}; choose from {POLICIES} and {MIXES}")
    if len(run.dtypes) > 1:
        run.note(f"servers run in {run.dtypes[0]} only")
    run.note("Client and servers share the machine: the load generator's own CPU time is part of every figure, "
             "alike for all servers. Latency is client-side (send to answer), throughput counts answered requests.")
    with _sigterm_exits():
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
              "server_threads": args.threads, "service_args": args.service_args, "head_classes": HEAD_CLASSES,
              "adapter": {"hidden": 8, "groups": 2, "scale": 1.0}, "dtype": run.dtypes[0]}
    return run.finish(config, results, render, plot)


# --------------------------------------------------------------------------------------------- output


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def _x(v: float | None) -> str:
    return "-" if v is None else f"x{v:.2f}"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


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
                table.append([mix, r["server"], _num(r["req_per_s"]), _num(r["images_per_s"]), _ms(r["p50_ms"]),
                              _ms(r["p95_ms"]), _ms(r["p99_ms"]), r["errors"], _x(r["vs_single"]),
                              _x(r["vs_baseline"]), _num(r["batch_mean"]), _num(r["mixed_share"], ".2f"),
                              _num(r["switches_per_request"], ".2f"), _ms(r.get("server_cpu_ms_per_request"))])
        mem = ", ".join(f"{name} {m['rss_bytes'] / 2**20:.0f} MiB" for name, m in a["memory"].items()
                        if "rss_bytes" in m)
        cmds = "; ".join(f"`{c}`" for name, c in a["server_commands"].items()
                         if name in (BASELINE, next(iter(a["server_commands"]))))
        parts += ["", f"**{a['arch']}** ({a['backbone']}, input {a['input_size'][1]} px, {a['tasks']} tasks)", "",
                  common.md_table(["mix", "server", "req/s", "images/s", "p50", "p95", "p99", "errors", "vs single",
                                   "vs copies", "batch", "mixed", "switches", "server CPU / req"], table),
                  "", f"Server RSS after the run (torch's libraries included): {mem}. Servers: {cmds}."]
    return "\n".join(parts)


def plot(payload: dict[str, Any], path: Path) -> None:
    """Per backbone: throughput bars per mix and server (whiskers: quartiles over rounds), and latency
    (bar p50, markers p95 and p99)."""
    archs = payload["results"]["archs"]
    mixes = payload["config"]["mixes"]
    fig, axes = common.subplots(2, len(archs), width=5.5)
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
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
