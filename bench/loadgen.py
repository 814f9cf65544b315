"""The load generator of the serving benchmarks: seeded request plans, a closed loop of HTTP clients, and
the figures of one load.

A closed loop: ``concurrency`` asyncio clients (one ``httpx.AsyncClient``) each send their next request
when the last one is answered, until the plan is used up or a time cap passed. The task of each request
follows a seeded mix (``single``: one task; ``uniform``; ``zipf``: task k with probability ~ 1/k^s), so
every server of a round gets the same sequence.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np

from . import timing

T = TypeVar("T")
MIXES = ("single", "uniform", "zipf")
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def add_load_arguments(p: argparse.ArgumentParser, *, requests: str, concurrency: str, server: str) -> None:
    """The flags every closed-loop serving benchmark over a generated store takes (defaults in the help)."""
    p.add_argument("--distinct", type=int, default=16, help="real bundles per store; the rest are renamed copies")
    p.add_argument("--requests", type=int, help=f"requests per measured load ({requests})")
    p.add_argument("--warmup-requests", type=int, help="untimed requests of the same mix before each load")
    p.add_argument("--concurrency", type=int, help=f"closed-loop clients ({concurrency})")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent of the zipf mix")
    p.add_argument("--max-batch", type=int, default=16, help="most images per forward")
    p.add_argument("--image-size", type=int, help="tasks' input size in px (default 96 for the embedded backbone)")
    p.add_argument("--photo-px", type=int, default=128, help="width of the JPEGs sent")
    p.add_argument("--time-cap", type=float, help="seconds after which a load sends no new request")
    p.add_argument("--request-timeout", type=float, default=60.0, help="client timeout per request, seconds")
    p.add_argument("--start-timeout", type=float, default=300.0, help=f"seconds a {server} may take to be ready")


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


@dataclass(frozen=True)
class Loads:
    """The closed-loop loads of one benchmark configuration: in round ``r`` every server gets the same seeded
    request sequence per mix (an untimed warm-up one, then the measured one), so their figures compare."""

    names: Sequence[str]  # the store's tasks; a plan's index k is names[k]
    images: Sequence[bytes]
    requests: int
    warmup_requests: int
    seed: int
    zipf_s: float
    concurrency: int
    time_cap_s: float
    timeout_s: float
    per_request: int = 1
    mixes: Sequence[str] = MIXES  # the benchmark's mixes: a mix's index here seeds its sequences

    def warm(self, url: str, mix: str, r: int) -> None:
        """Round ``r``'s untimed requests of ``mix`` (seeded apart from the measured ones)."""
        plan = request_plan(mix, len(self.names), self.warmup_requests, (self.seed, 1000 + r, self.mixes.index(mix)),
                            self.zipf_s)
        if plan:
            self._run(url, plan)

    def measure(self, url: str, mix: str, r: int) -> dict[str, Any]:
        """Round ``r``'s measured load of ``mix``: its figures (:func:`load_stats`)."""
        plan = request_plan(mix, len(self.names), self.requests, (self.seed, r, self.mixes.index(mix)), self.zipf_s)
        return load_stats(self._run(url, plan), planned=self.requests, per_request=self.per_request)

    def _run(self, url: str, plan: Sequence[int]) -> Load:
        return run_load(url, plan, self.names, self.images, per_request=self.per_request,
                        concurrency=self.concurrency, time_cap_s=self.time_cap_s, timeout_s=self.timeout_s)


def interleaved(configs: Sequence[T], repeats: int) -> Iterator[tuple[int, T]]:
    """``(round, config)`` in the order the loads run: every configuration once per round, the first one
    rotating, so none always runs first (or right after the same neighbour)."""
    for r in range(repeats):
        k = r % len(configs)
        for config in [*configs[k:], *configs[:k]]:
            yield r, config


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, linear interpolation); ``None`` if there are no values."""
    return float(np.percentile(values, q)) if len(values) else None


def load_stats(load: Load, *, planned: int, per_request: int) -> dict[str, Any]:
    """One load's figures: throughput of answered requests, latency percentiles (ms), errors by code,
    and the servers' own view (mean batch size, share of requests served by a mixed batch, timings)."""
    ok = [s for s in load.samples if s.status == 200]
    lat = [s.latency_s * 1e3 for s in ok]
    errors = Counter(str(s.status) for s in load.samples if s.status != 200)
    if load.sent > len(load.samples):
        errors["unanswered"] += load.sent - len(load.samples)
    timings = {k: mean([s.timings.get(k) for s in ok])
               for k in ("decode_ms", "load_ms", "queue_ms", "inference_ms", "total_ms")}
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


def summarize_rounds(rounds: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """One table row's figures over the rounds of a configuration: median throughput, the median of each of
    ``keys``, errors and answers summed."""
    return {"rounds": len(rounds), "req_per_s": statistics.median(x["req_per_s"] for x in rounds),
            **{k: median([x[k] for x in rounds]) for k in keys},
            "errors": sum(x["errors"] for x in rounds), "ok": sum(x["ok"] for x in rounds)}


def throughput_vs(rounds: dict[Any, list[dict[str, Any]]], config: Any, other: Any) -> float | None:
    """``config``'s throughput relative to ``other``'s: the median of per-round ratios (same round, same
    request sequence); ``None`` where ``other`` was not measured."""
    if other not in rounds:
        return None
    return paired([x["req_per_s"] for x in rounds[config]], [x["req_per_s"] for x in rounds[other]])


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def paired(num: Sequence[float], den: Sequence[float]) -> float | None:
    """:func:`timing.paired_ratio` over the rounds where the denominator is positive."""
    pairs = [(a, b) for a, b in zip(num, den, strict=True) if b > 0]
    return timing.paired_ratio(*zip(*pairs, strict=True)) if pairs else None

