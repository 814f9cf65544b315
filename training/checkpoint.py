"""Resumable training state in one safetensors file: tensors as tensors, everything else as JSON metadata.

Holds the trained model state, the optimizer's tensors and hyper-parameters, the scheduler and grad-scaler
state, the epoch/step counters and the history, plus the configuration it was trained under. No pickle is
ever written or read. The file is replaced atomically (temp file, fsync, rename), so an interruption at
any moment leaves the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from repadapter.atomic import write_file_atomic
from repadapter.errors import CheckpointError

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = 1
_META_KEY = "repserve_training"


def save_checkpoint(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Atomically write ``tensors`` (moved to CPU) and JSON-able ``meta`` to ``path``."""
    data = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                   metadata={_META_KEY: json.dumps({"format": FORMAT, **meta})})
    write_file_atomic(path, data)


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a checkpoint written by :func:`save_checkpoint`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot read training checkpoint {path}: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, expected {FORMAT}")
    return tensors, meta


def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``optim.<param>.<key>``) and JSON-able rest."""
    tensors, scalars = {}, {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`: a dict ``optimizer.load_state_dict`` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}

