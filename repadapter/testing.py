"""Random, non-trivial adapters for tests, benchmarks and warm-up (never for serving real tasks).

All four tensors are random, so the constant-term fold and the grouped up-projection are really exercised
(a freshly initialised adapter is the identity and would hide mistakes there).
"""

from __future__ import annotations

import torch

from .adapter import AdapterWeights
from .inject import Site


def random_adapters(sites: list[Site], seed: int, *, hidden: int = 8, groups: int = 2, scale: float = 1.0,
                    std: float = 0.1) -> dict[str, AdapterWeights]:
    """float32 CPU adapters for every site, seeded: ``N(0, std)`` entries in A, a, B, b."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    return {s.name: AdapterWeights(rnd(hidden, s.dim), rnd(hidden), rnd(s.dim, hidden // groups), rnd(s.dim),
                                   groups, scale) for s in sites}
