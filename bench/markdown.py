"""Markdown for the report: tables and numbers in readable units (``-`` where a figure was not measured)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


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
