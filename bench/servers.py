"""Server processes for the serving benchmarks and the integration tests: each on a free loopback port,
stopped in every case.

A server's output goes to a log file; it gets SIGTERM when the benchmark dies (even by SIGKILL, Linux
``PR_SET_PDEATHSIG``), so none outlives a run. Also read here: a server's RSS and CPU time from
``/proc``, and RepServe's own figures from ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from . import ROOT, cli
from .memstat import process_memory

log = logging.getLogger("bench.servers")


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
def sigterm_exits() -> Iterator[None]:
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


def wait_until_serving(url: str, proc: subprocess.Popen, timeout_s: float, *, name: str,
                       ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
                       interval_s: float = 0.25, why: Callable[[], str] = lambda: "") -> float:
    """Poll ``url`` until its answer is ``ready`` (default: a 200); the seconds that took. A server that
    exits, or is not serving within ``timeout_s``, raises RuntimeError with ``why()`` (e.g. its log's tail).
    For every server a benchmark or a test starts as a process (RepServe, the baseline, nginx, moto)."""
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{why()}")
        with contextlib.suppress(httpx.TransportError):
            if ready(httpx.get(url, timeout=2.0)):
                return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"{name} not serving {url} after {timeout_s} s:\n{why()}")
        time.sleep(interval_s)


class ServerProcess:
    """One server (``python -m <module> ...``) on a free loopback port; its output goes to ``log_path``.

    :meth:`stop` sends SIGTERM, then kills after a grace period; call it in a ``finally`` (``ExitStack``).
    """

    def __init__(self, name: str, module: str, args: Sequence[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.port = name, free_port()
        self.command = shlex.join(["python", "-m", module, *args])  # as recorded: without the loopback port
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env={**cli.child_env(), **(env or {})},
                                     stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_parent_death_signal())

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until ``/readyz`` answered 200; raises (with the log's tail) on exit or timeout."""
        return wait_until_serving(f"{self.url}/readyz", self.proc, timeout, name=self.name, why=self.log_tail)

    def memory(self) -> dict[str, int]:
        """Resident and peak resident bytes of the server process (Linux; empty elsewhere)."""
        names = {"VmRSS": "rss_bytes", "VmHWM": "hwm_bytes"}
        return {names[key]: kib * 1024 for key, kib in process_memory(self.proc.pid).items()}

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the server process used so far, all threads (Linux; ``None`` elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)

    def costs(self) -> dict[str, Any] | None:
        """RepServe's cost-model estimates (what ``auto`` decides on) from ``/readyz``; ``None`` elsewhere."""
        body = self.readyz()
        return None if body is None else body.get("costs")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        """Every sample of ``/metrics`` by ``(name, sorted labels)`` (RepServe only; ``None`` elsewhere)."""
        try:
            response = httpx.get(f"{self.url}/metrics", timeout=10.0)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(response.text) for s in family.samples}

    def counter(self, metric: str, **labels: str) -> float | None:
        """One sample of ``/metrics`` (RepServe only; ``None`` where there is none)."""
        samples = self.metrics()
        return None if samples is None else samples.get((metric, tuple(sorted(labels.items()))))

    def readyz(self) -> dict[str, Any] | None:
        """The ``/readyz`` body (both servers report their own figures there), ``None`` if not ready."""
        try:
            response = httpx.get(f"{self.url}/readyz", timeout=10.0)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

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




@contextlib.contextmanager
def stopping(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        yield server
    finally:
        code = server.stop()
        log.debug("%s stopped with %s", server.name, code)

