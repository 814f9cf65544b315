"""RepServe benchmarks: every figure a ratio measured side by side in one run, written to BENCHMARKS.md.

Each benchmark is a module with ``main(argv)`` (``python -m bench.<name>``), a ``render(result)`` that
turns its JSON result into markdown, and a ``plot(result, path)``; ``python -m bench`` runs them all and
``python -m bench.report`` assembles BENCHMARKS.md from ``bench/results/*.json``. ``--quick`` is the
smallest size (what CI runs so the scripts cannot rot); timings are never asserted in tests.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository's root (the benchmarks' working directory, and what their child processes import)."""
RESULTS = ROOT / "bench" / "results"
"""Where results are written and the report reads them by default."""

BENCHMARKS: tuple[str, ...] = ("inference", "switch", "memory", "serving", "scale", "replicas", "training")
"""Benchmarks in report order."""
