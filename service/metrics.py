"""Prometheus metrics (prefix ``repserve_``, base units in names, bounded labels), one registry per app.

Counters and histograms are updated where things happen (the request middleware, the engine's worker,
the registry's store scans); gauges that describe current state (queue depths, loaded tasks, the
active task, memory) are computed at scrape time by :class:`StateCollector`, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .lru import CacheStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SWITCH_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Every metric the service exports, registered in its own :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `*_created` series: they double the exposition for little use
        r = self.registry = CollectorRegistry(auto_describe=True)
        # the standard process_* (CPU, RSS, open fds), python_info and python_gc_* series, in this registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Info("repserve_build", "Version and configuration of this replica.", registry=r)
        self.http_requests = Counter(
            "repserve_http_requests_total", "HTTP requests by route template, method and status code.",
            ["handler", "method", "code"], registry=r)
        self.http_duration = Histogram(
            "repserve_http_request_duration_seconds", "HTTP request latency by route template.",
            ["handler"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter(
            "repserve_requests_total", "Classification requests by task and HTTP status code "
            "(task is `unknown` for names that are not served).", ["task", "code"], registry=r)
        # Per-task series are counters only: a histogram per task is ~17 series each, which thousands of
        # tasks per replica would turn into hundreds of thousands (the latency histograms are per replica).
        self.request_duration = Histogram(
            "repserve_request_duration_seconds", "Classification latency, end to end.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("repserve_images_total", "Images classified, by task.", ["task"], registry=r)
        self.queue_duration = Histogram(
            "repserve_queue_duration_seconds", "Time a request chunk waited in its task queue.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "repserve_inference_duration_seconds", "Time of one batch: weight switch, forward and heads.",
            ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "repserve_batch_size", "Images per forward pass.", ["mode"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_tasks = Histogram(
            "repserve_batch_tasks", "Distinct tasks per forward pass.", ["mode"], buckets=BATCH_BUCKETS, registry=r)
        self.switches = Counter(
            "repserve_task_switches_total", "Weight switches (merging a task or restoring the base).", registry=r)
        self.switch_duration = Histogram(
            "repserve_task_switch_duration_seconds", "Duration of one weight switch.",
            buckets=SWITCH_BUCKETS, registry=r)
        self.store_errors = Counter(
            "repserve_store_errors_total", "Store scans that failed or stored tasks that were rejected, by reason.",
            ["reason"], registry=r)
        self.store_last_scan = Gauge(
            "repserve_store_last_scan_timestamp_seconds", "Unix time of the last completed store scan.", registry=r)
        self.task_loads = Counter(
            "repserve_task_loads_total", "Task loads into a residency tier (`host`: read and verified from the "
            "store; `device`: moved to the serving device).", ["tier"], registry=r)
        self.task_load_duration = Histogram(
            "repserve_task_load_duration_seconds", "Duration of one task load into a tier (the cold-task cost).",
            ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.engine_errors = Counter(
            "repserve_engine_errors_total", "Batches that failed inside the engine (answered with 500).", registry=r)

    def add_state(self, state: StateSource) -> None:
        self.registry.register(StateCollector(state))


@dataclass
class StateSource:
    """Callables the scrape-time gauges read (wired by :mod:`service.lifecycle`)."""

    queue_depths: Callable[[], dict[str, int]]
    task_count: Callable[[], int]
    active_task: Callable[[], str | None]
    memory: Callable[[], dict[str, int]]
    caches: Callable[[], dict[str, CacheStats]]
    ready: Callable[[], bool]


class StateCollector(Collector):
    """Gauges computed at scrape time from the live engine and registry."""

    def __init__(self, state: StateSource) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return []  # computed on collect: no fixed description needed

    def collect(self) -> Iterator[Metric]:
        s = self.state
        depth = GaugeMetricFamily("repserve_queue_depth", "Images waiting, by task.", labels=["task"])
        for task, n in sorted(s.queue_depths().items()):
            depth.add_metric([task], n)
        yield depth
        yield GaugeMetricFamily("repserve_tasks_loaded", "Tasks served by this replica (listed; their tensors "
                                "load on first use).", value=s.task_count())
        active = GaugeMetricFamily(
            "repserve_active_task", "1 for the task whose weights are merged into the backbone now (`base`: "
            "none); one series, so thousands of tasks do not mean thousands of series.", labels=["task"])
        active.add_metric([s.active_task() or "base"], 1.0)
        yield active
        memory = GaugeMetricFamily(
            "repserve_device_memory_bytes", "Memory on the serving device by kind (backbone, pristine copies, "
            "pinned tasks, the device and live tiers; allocated/reserved from the CUDA allocator).", labels=["kind"])
        for kind, n in sorted(s.memory().items()):
            memory.add_metric([kind], n)
        yield memory
        caches = s.caches()
        for name, what, field, family in (
            ("repserve_task_cache_hits", "Lookups that found the task in the tier", "hits", CounterMetricFamily),
            ("repserve_task_cache_misses", "Lookups that did not", "misses", CounterMetricFamily),
            ("repserve_task_cache_evictions", "Tasks evicted to stay within the tier's bytes", "evictions",
             CounterMetricFamily),
            ("repserve_task_cache_bytes", "Bytes held by the tier", "nbytes", GaugeMetricFamily),
            ("repserve_task_cache_capacity_bytes", "The tier's bound in bytes (its setting)", "capacity",
             GaugeMetricFamily),
            ("repserve_task_cache_entries", "Tasks held by the tier", "entries", GaugeMetricFamily),
        ):
            metric = family(name, f"{what}, by residency tier (host, device, live).", labels=["tier"])
            for tier, stats in caches.items():
                metric.add_metric([tier], getattr(stats, field))
            yield metric
        yield GaugeMetricFamily("repserve_ready", "1 once tasks are loaded and warm-up is done.",
                                value=1.0 if s.ready() else 0.0)
