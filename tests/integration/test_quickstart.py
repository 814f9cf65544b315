"""The README's "first minute" runs as written: start, classify the cat with the CLI and curl, train a small
task, register it, classify with it, list the tasks, stop.

The block between ``<!-- quickstart:start -->`` and ``<!-- quickstart:end -->`` is run by bash from a scratch
directory (``.venv`` linked in), with only the port changed and the server's store a copy of
``adapters_store/``, so the checkout is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from bench.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- quickstart:start -->\s*```bash\n(.*?)```\s*<!-- quickstart:end -->", re.S)
CAT_LABELS = ("tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat")
TIMEOUT_S = 420

pytestmark = pytest.mark.slow


def quickstart_script() -> str:
    match = BLOCK.search(README.read_text())
    assert match, "README.md has no quick-start block between its markers"
    return match.group(1)


def test_readme_quickstart_block_runs_as_written(tmp_path):
    port = free_port()
    script = quickstart_script()
    assert "localhost:8000" in script, "the quick start talks to the default port"
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    shutil.copytree(ROOT / "adapters_store", tmp_path / "store",
                    ignore=shutil.ignore_patterns(".catalog", ".tmp", ".lock"))
    env = {**os.environ, "REPSERVE_PORT": str(port), "REPSERVE_URL": f"http://localhost:{port}",
           "REPSERVE_STORE": str(tmp_path / "store"), "OMP_NUM_THREADS": "2"}
    for name in ("REPSERVE_ADMIN_TOKEN", "REPSERVE_CLASSIFY_TOKEN", "REPSERVE_TOKEN"):
        env.pop(name, None)
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script.replace("localhost:8000", f"localhost:{port}")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        out = "(timed out)"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server runs in the script's session: gone in every case
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, f"the quick start failed (exit {proc.returncode}):\n{out[-6000:]}"

    # the CLI's table and curl's JSON both name a cat first
    curl_json, _ = json.JSONDecoder().raw_decode(out, out.index('{"task":"imagenet"'))  # curl ends no line
    assert curl_json["results"][0]["predictions"][0]["label"] in CAT_LABELS, curl_json
    assert sum(any(cat in line for cat in CAT_LABELS) for line in out.splitlines()) >= 2, out[-4000:]
    # the trained task was registered with the running server, then answered for the digit
    digit = re.search(r"digit\.png shows a (\d)", out)
    assert digit, out[-4000:]
    assert "my-digits" in out
    assert (tmp_path / "store" / "my-digits").is_dir(), "the registered task is not in the server's store"
    assert (tmp_path / "digit.png").is_file()
