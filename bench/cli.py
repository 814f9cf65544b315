"""The command line every benchmark shares, and one run's record: its flags, its device, dtypes and threads,
the machine it ran on, and its ``<out>/<name>.json`` + ``.png``; also how one benchmark starts another in a
fresh process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import RESULTS, ROOT
from .backbones import ARCHS, DTYPES
from .machine import loadavg, machine_info, usable_cpus


def csv(kind: type = str) -> Callable[[str], list]:
    """argparse type for comma-separated lists: ``--batches 1,8,32``."""
    return lambda text: [kind(x) for x in text.split(",") if x]


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """Flags every benchmark has; a benchmark adds its own (``--batches``, ``--tasks``...)."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="smallest size, seconds long (what CI runs)")
    p.add_argument("--archs", type=csv(), help=f"backbones, comma-separated: {', '.join(ARCHS)} or a timm arch")
    p.add_argument("--repeats", type=int, help="timed rounds per comparison (medians are over these)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case before timing")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    p.add_argument("--dtypes", type=csv(), help="fp32, bf16, fp16 (default: fp32 on CPU, fp32,bf16 on CUDA)")
    p.add_argument("--threads", type=int, default=usable_cpus(), help="torch.set_num_threads (default: all usable)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for <name>.json and <name>.png")
    p.add_argument("--seed", type=int, default=0)
    return p


def pick(explicit: Any, quick: Any, full: Any, is_quick: bool) -> Any:
    """A flag's value: what the user passed, else the quick or the full default."""
    if explicit is not None:
        return explicit
    return quick if is_quick else full


class Run:
    """One benchmark invocation: fixes threads, resolves device and dtypes, records the command, the
    machine and the load average (a noise flag), and writes ``<out>/<name>.json`` + ``.png``."""

    def __init__(self, name: str, args: argparse.Namespace, argv: Sequence[str]) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.name, self.args = name, args
        self.command = f"python -m bench.{name} {shlex.join(argv)}".strip()
        torch.set_num_threads(args.threads)
        want = args.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(want)
        default = ["fp32", "bf16"] if self.device.type == "cuda" else ["fp32"]
        self.dtypes: list[str] = args.dtypes or default
        unknown = set(self.dtypes) - set(DTYPES)
        if unknown:
            raise SystemExit(f"unknown dtypes {sorted(unknown)}; choose from {list(DTYPES)}")
        self.notes: list[str] = []
        if self.device.type == "cpu" and not args.dtypes:
            self.notes.append("CPU: fp32 only by default (bf16 matmuls are emulated, ~10x slower, on CPUs without "
                              "AVX512-BF16/AMX); pass --dtypes fp32,bf16 to include it.")
        self.log = logging.getLogger(f"bench.{name}")
        self._start = time.time()
        self._load_start = loadavg()

    def note(self, text: str) -> None:
        """A caveat that belongs beside the figures (caps, extrapolations, what was measured)."""
        self.notes.append(text)
        self.log.info("note: %s", text)

    def finish(self, config: dict[str, Any], results: dict[str, Any],
               render: Callable[[dict[str, Any]], str], plot: Callable[[dict[str, Any], Path], None]) -> dict:
        payload = {
            "benchmark": self.name,
            "command": self.command,
            "quick": bool(self.args.quick),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self._start)),
            "duration_s": round(time.time() - self._start, 1),
            "loadavg_1m": {"start": self._load_start, "end": loadavg()},
            "machine": machine_info(self.device),
            "config": config,
            "results": results,
            "notes": self.notes,
        }
        out: Path = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.name}.json").write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        plot(payload, out / f"{self.name}.png")
        print(render(payload))
        return payload


def child_env() -> dict[str, str]:
    """Environment for a ``python -m bench...`` subprocess: the repo root importable from anywhere."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_module(name: str, argv: Sequence[str], *, timeout: float | None = None) -> None:
    """Run ``python -m bench.<name> argv`` in a fresh process (isolated threads, memory, torch state)."""
    subprocess.run([sys.executable, "-m", f"bench.{name}", *argv], cwd=ROOT, env=child_env(), check=True,
                   timeout=timeout)
