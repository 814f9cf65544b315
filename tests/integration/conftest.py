"""A real RepServe process (``python -m service``) on a free loopback port, killed in every case."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.servers import ServerProcess

START_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def start_server(tmp_path_factory) -> Iterator:
    """Factory: ``start_server(store, *flags)`` -> a ready :class:`ServerProcess`; all are stopped at the end."""
    servers: list[ServerProcess] = []

    def start(store: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess("service", "service", ["--store", str(store), *flags], log, env=env)
        servers.append(server)
        try:
            server.wait_ready(START_TIMEOUT_S)
        except RuntimeError as e:
            raise AssertionError(str(e)) from None
        return server

    yield start
    for server in servers:
        server.stop()
