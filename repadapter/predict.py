"""From a head's logits to what a caller is answered: the top-k ``(label, score)`` of each image.

One function for every server of a task (the service's engine, the benchmarks' baseline), so their answers
agree to the bit: scores are a float32 softmax over the head's classes, whatever the serving dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

Prediction = tuple[str, float]


def top_k(logits: Tensor, labels: Sequence[str], k: int) -> list[list[Prediction]]:
    """Per row of ``logits [n, C]``: the ``min(k, C)`` most likely ``(labels[c], probability)``, best first.
    The softmax runs in float32 (half-precision logits would round probabilities to 3 digits)."""
    scores, index = logits.float().softmax(dim=-1).topk(min(k, len(labels)), dim=-1)
    return [[(labels[i], s) for i, s in zip(row_i, row_s, strict=True)]
            for row_i, row_s in zip(index.tolist(), scores.tolist(), strict=True)]
