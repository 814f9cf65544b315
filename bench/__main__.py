"""Run every benchmark, each in its own process, then rebuild BENCHMARKS.md.

    python -m bench [--quick] [--only inference,switch] [--out DIR] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import BENCHMARKS, RESULTS, ROOT, cli, report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smallest sizes (CI smoke), not a measurement")
    p.add_argument("--only", type=cli.csv(), default=list(BENCHMARKS), help="benchmarks to run")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="passed to every benchmark")
    p.add_argument("--threads", type=int, help="passed to every benchmark")
    p.add_argument("--report", type=Path, default=ROOT / "BENCHMARKS.md", help="report to rebuild")
    args = p.parse_args(argv)
    unknown = set(args.only) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmarks {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    shared = ["--out", str(args.out)] + ["--quick"] * args.quick
    shared += ["--device", args.device] if args.device else []
    shared += ["--threads", str(args.threads)] if args.threads else []
    for name in BENCHMARKS:
        if name in args.only:
            cli.run_module(name, shared)
    return report.main(["--results", str(args.out), "--output", str(args.report)])


if __name__ == "__main__":
    sys.exit(main())
