"""What every benchmark shares: the CLI, backbones, the one timing helper, machine info, result files.

Timing is built for a noisy shared machine: the variants of one comparison run interleaved in the same
rounds (A, B, A, B ... with the starting case rotated every round), after warm-up, with the thread count
fixed; a figure is the median of per-round ratios, so a slow spell hits both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repadapter import (
    AdapterConfig,
    AdapterWeights,
    Backbone,
    BackboneRef,
    Manifest,
    PackedFolds,
    TaskBundle,
    load_backbone,
)
from repadapter.testing import random_adapters  # noqa: F401 - the benchmarks' adapters

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

ARCHS: dict[str, str] = {
    "embedded": "embedded",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
"""Short benchmark names -> ``load_backbone`` arch. ViTs are random-init (speed and memory do not depend
on the values); ``embedded`` is the shipped pretrained MobileNetV2, the default backbone."""

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMG_SIZE = 224


def dtype_name(short: str) -> str:
    """The torch name of a short dtype (``bf16`` -> ``bfloat16``), as the servers' ``--dtype`` takes it."""
    return str(DTYPES[short]).removeprefix("torch.")


def arch_name(name: str) -> str:
    """The timm arch for a short name (``vit_base``) or a full one (passed through)."""
    return ARCHS.get(name, name)


def load(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Backbone:
    """The benchmark backbone at 224 px, frozen, on ``device`` in ``dtype`` (random ViT weights are by
    design here, so the loader's warning about them is silenced for this call)."""
    logger = logging.getLogger("repadapter.backbone")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return load_backbone(arch_name(name), device=str(device), dtype=dtype, seed=seed)
    finally:
        logger.setLevel(level)


def served_folds(bb: Backbone, adapters: dict[str, AdapterWeights], device: torch.device,
                 dtype: torch.dtype) -> PackedFolds:
    """``adapters`` as the service's device tier holds them for mixed batches (a task's bundle, packed)."""
    w = next(iter(adapters.values()))
    manifest = Manifest(name="bench", labels=["x"], adapter=AdapterConfig(hidden=w.hidden, groups=w.groups,
                                                                          scale=w.scale),
                        backbone=BackboneRef(arch=bb.arch, fingerprint=bb.fingerprint))
    packed = TaskBundle(manifest, adapters, torch.zeros(1, bb.num_features), torch.zeros(1)).pack()
    return PackedFolds.of(packed, packed.buffer.to(device), dtype)


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_nbytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (what one more copy of the model costs)."""
    return nbytes([*model.parameters(), *model.buffers()])


# --------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock interval covers the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    """One timed variant: ``run`` is timed; ``setup`` (untimed) runs before every timed call, e.g. to
    put the switcher back into the state the timed call starts from."""

    run: Callable[[], object]
    setup: Callable[[], object] | None = None


def _timed(case: Case, device: torch.device) -> float:
    if case.setup is not None:
        case.setup()
    synchronize(device)
    start = time.perf_counter()
    case.run()
    synchronize(device)
    return time.perf_counter() - start


def measure(cases: dict[str, Case], *, repeats: int, device: torch.device, warmup: int = 1,
            min_time: float = 0.0, max_inner: int = 1000) -> dict[str, list[float]]:
    """Seconds per call of each case, one sample per round, cases interleaved within each round.

    Every case is warmed up first (at least once: first calls pay allocation and kernel selection). A
    sample averages ``inner`` calls, ``inner`` chosen per case from its warm-up so that a sample lasts at
    least ``min_time`` seconds (short calls would otherwise measure timer jitter); ``setup`` is never
    inside the clock. Round ``r`` starts at case ``r mod n``, so no case always runs first.
    """
    names = list(cases)
    inner: dict[str, int] = {}
    for name in names:
        last = min(_timed(cases[name], device) for _ in range(max(1, warmup)))
        inner[name] = min(max_inner, max(1, math.ceil(min_time / max(last, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(sum(_timed(cases[name], device) for _ in range(inner[name])) / inner[name])
    return samples


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """Median and quartiles (seconds) of one case's samples."""
    s = sorted(samples)
    q1, q3 = (statistics.quantiles(s, n=4)[0::2] if len(s) >= 2 else (s[0], s[0]))
    return {"median_s": statistics.median(s), "q1_s": q1, "q3_s": q3, "min_s": s[0], "n": len(s)}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``: both sides of each ratio come from the same round."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


# --------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``VmRSS``; ``ru_maxrss`` peak elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def settle_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``), so RSS counts live
    objects rather than what the allocator keeps from temporaries."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS may include freed heap
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _meminfo_kib(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def available_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo (0 if unknown)."""
    return _meminfo_kib("MemAvailable") * 1024


# --------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{rev}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a reader needs to judge a figure: hardware, software versions, threads, device."""
    import timm

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "git": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_mem_gib": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    return info


def describe_machine(m: dict[str, Any]) -> str:
    """One line for a report: ``AMD EPYC, 2 CPUs, 23 GiB, torch 2.14.1, 2 threads, cpu``."""
    dev = f"{m['gpu']} ({m['gpu_mem_gib']} GiB, CUDA {m['cuda']})" if "gpu" in m else m["device"]
    return (f"{m['cpu']}, {m['usable_cpus']}/{m['logical_cpus']} CPUs, {m['mem_total_gib']} GiB RAM; "
            f"Python {m['python']}, torch {m['torch']}, timm {m['timm']}; torch threads {m['torch_threads']}; "
            f"device {dev}; git {m['git']}")


# --------------------------------------------------------------------------------------------- CLI


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
    p.add_argument("--threads", type=int, default=_usable_cpus(), help="torch.set_num_threads (default: all usable)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for <name>.json and <name>.png")
    p.add_argument("--seed", type=int, default=0)
    return p


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
        self._load_start = _loadavg()

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
            "loadavg_1m": {"start": self._load_start, "end": _loadavg()},
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


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else -1.0


# --------------------------------------------------------------------------------------------- output


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    align = ["---"] + ["---:"] * (len(headers) - 1)  # first column text, the rest numbers
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_s(seconds: float) -> str:
    """A duration in the unit that keeps 3 significant digits readable."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_ms(v: float | None) -> str:
    """A latency for a table (``-`` when not measured)."""
    return "-" if v is None else f"{v:.1f} ms"


def fmt_x(v: float | None) -> str:
    """A ratio for a table (``-`` when not measured)."""
    return "-" if v is None else f"x{v:.2f}"


def fmt_num(v: float | None, spec: str = ".1f") -> str:
    """A number for a table (``-`` when not measured)."""
    return "-" if v is None else format(v, spec)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def load_noise_note(payload: dict[str, Any]) -> str:
    """Flag a run taken on a loaded machine: load average above the thread count means sharing."""
    load, threads = payload["loadavg_1m"], payload["machine"]["torch_threads"]
    busy = max(load["start"], load["end"]) > threads
    return (f"load average {load['start']} -> {load['end']} on {payload['machine']['usable_cpus']} CPUs"
            + (": the machine was shared, absolute figures are noisy (ratios less so)" if busy else ""))


def subplots(n: int, rows: int = 1, *, width: float = 4.2, height: float = 3.4) -> tuple[Any, Any]:
    """A ``rows x n`` grid of matplotlib axes (2-D array) on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, n, figsize=(width * n, height * rows), squeeze=False)


def log_axes(ax: Any, *, x: bool = False, y: bool = True, xticks: Sequence[float] | None = None) -> None:
    """Log scales with plain-number labels (``20``, not ``2x10^1``), optionally exactly ``xticks`` on x."""
    from matplotlib.ticker import LogFormatter, NullLocator

    for on, axis, scale in ((x, ax.xaxis, ax.set_xscale), (y, ax.yaxis, ax.set_yscale)):
        if on:
            scale("log")
            axis.set_major_formatter(LogFormatter())
            axis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # labels minors on short ranges
    if xticks is not None:
        ax.set_xticks(list(xticks), [f"{t:g}" for t in xticks])
        ax.xaxis.set_minor_locator(NullLocator())


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def child_env() -> dict[str, str]:
    """Environment for a ``python -m bench...`` subprocess: the repo root importable from anywhere."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_module(name: str, argv: Sequence[str], *, timeout: float | None = None) -> None:
    """Run ``python -m bench.<name> argv`` in a fresh process (isolated threads, memory, torch state)."""
    subprocess.run([sys.executable, "-m", f"bench.{name}", *argv], cwd=ROOT, env=child_env(), check=True,
                   timeout=timeout)
