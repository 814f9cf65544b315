"""A real S3 protocol server (moto's, on a free loopback port) for the store's tests; no client mocks."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from bench.servers import free_port, wait_until_serving

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server(timeout_s: float = 60.0) -> Iterator[str]:
    """Start ``moto.server`` on loopback; yields its endpoint URL; stops it in every case."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(endpoint + "/moto-api/", proc, timeout_s, name="moto server", ready=lambda _: True,
                           interval_s=0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def new_bucket(endpoint: str) -> str:
    """A fresh bucket on the server (one per test: no state leaks between tests)."""
    name = f"repserve-{uuid.uuid4().hex[:12]}"
    client(endpoint).create_bucket(Bucket=name)
    return name


def use_credentials() -> None:
    """The fake credentials moto accepts, for boto3 clients made by the code under test."""
    for k, v in CREDENTIALS.items():
        os.environ.setdefault(k, v)
