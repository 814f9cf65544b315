"""Hyper-parameters of one training run: one pydantic model, the single source of CLI flags and defaults.

Defaults are the RepAdapter paper's recipe (AdamW lr 1e-3, weight decay 1e-4, cosine schedule with linear
warmup, hidden 8, groups 2, dropout 0.1, drop-path 0.1, batch 64, seed 42) on a VTAB-1k-style protocol
(800 train / 200 val). Every field's ``description`` is its ``--help`` text (see ``cli.py``).
"""

from __future__ import annotations

import shlex
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from repadapter.bundle import check_task_name
from repadapter.inject import Placement

Method = Literal["repadapter", "linear", "full"]
Recipe = Literal["paper", "tuned"]
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "tuned": {"lr": 3e-3, "hidden": 32},
}
"""Named hyper-parameter presets over the field defaults; flags given explicitly override them. ``paper`` is the
field defaults themselves (the paper's recipe); ``tuned`` is the best found on the mini VTAB-1k
(``python -m bench.training``; training/RESULTS.md): better on every dataset and seed there, but not the
default, since it can diverge on small batches (batch 32 on 200 images, seed 42: the loss stays at ln 10)."""
Balance = Literal["none", "loss", "sampler"]
SCALE_GRID: tuple[float, ...] = (0.1, 0.5, 1.0, 5.0, 10.0)
"""The paper's search space for the adapter scale ``s``, chosen on validation accuracy."""

RESUME_KEYS = frozenset({
    "data", "backbone", "checkpoint", "method", "epochs", "max_steps", "warmup_epochs", "warmup_lr", "min_lr",
    "batch_size", "lr", "weight_decay", "hidden", "groups", "dropout", "drop_path", "placement", "image_size",
    "n_train", "n_val", "seed", "balance", "class_mix", "label_smoothing",
})
"""Fields that change the training maths: a checkpoint resumes only under the same values (plus its scale)."""


class TrainConfig(BaseModel):
    """One training run. ``data``/``task`` are required; everything else has the paper's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    recipe: Recipe = Field("paper", description="hyper-parameter preset, under the flags given: paper (the "
                                                "defaults below) or tuned (--lr 3e-3 --hidden 32, best on our "
                                                "mini VTAB-1k at batch 64, can diverge on small batches; see "
                                                "training/RESULTS.md)")
    data: str = Field(description="training data: an ImageFolder DIR (DIR/train/<class>/*, optional DIR/val, "
                                  "DIR/test) or an embedded dataset: fashion-mnist, mnist, digits")
    task: str = Field(description="task name in the store (a-z, 0-9, '_', '-'; at most 64 chars)")
    store: str = Field("adapters_store", description="store the bundle is written to: a directory or "
                                                   "s3://bucket/prefix (endpoint and credentials from AWS_* variables)")
    backbone: str = Field("embedded", description="'embedded' (the shipped ImageNet MobileNetV2) or a timm "
                                                  "architecture name (needs --checkpoint)")
    checkpoint: Path | None = Field(None, description="local backbone weights (.safetensors or a torch state dict)")
    method: Method = Field("repadapter", description="repadapter: adapters + head on the frozen backbone; linear: "
                                                     "head only (linear probe); full: everything trains (figures "
                                                     "only, no bundle)")
    epochs: int = Field(10, ge=1, description="training epochs")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (short runs, CI)")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warmup length in epochs (at most 10% of the run)")
    warmup_lr: float = Field(1e-7, ge=0, description="learning rate at the start of the warmup")
    min_lr: float = Field(1e-8, ge=0, description="learning rate at the end of the cosine schedule")
    batch_size: int = Field(64, ge=1, description="global batch size (split across processes under torchrun)")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay (not on biases and 1-D parameters)")
    hidden: int = Field(8, ge=1, description="adapter hidden size r")
    groups: int = Field(2, ge=1, description="groups of the adapter's up-projection B")
    scale: float = Field(1.0, gt=0, description="adapter scale s")
    search_scale: bool = Field(False, description="train once per scale of --scale-grid and keep the best on "
                                                  "validation accuracy (the paper's protocol)")
    scale_grid: tuple[float, ...] = Field(SCALE_GRID, min_length=1, description="comma-separated scales tried by "
                                                                                "--search-scale")
    balance: Balance = Field("none", description="imbalanced classes: 'loss' weights each class's cross-entropy "
                                                 "by n / (classes x its count); 'sampler' draws training images "
                                                 "with replacement, each class equally often (under torchrun "
                                                 "too); 'none': the data as it comes")
    class_mix: tuple[float, ...] | None = Field(None, description="comma-separated relative class frequencies "
                                                                  "of an embedded dataset's training pool, in "
                                                                  "label order (57,11,4,27 keeps classes 0-3 at "
                                                                  "57/11/4/27%; missing or 0: class dropped): "
                                                                  "an imbalanced task from a balanced source")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the training cross-entropy "
                                                                "(0: none; validation and test loss stay plain)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the adapters' hidden vector (training only)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth rate of the backbone (when timm's "
                                                          "model supports it)")
    placement: Placement = Field("block", description="adapter sites: block (every foldable site) or attn "
                                                      "(ViT attention inputs only)")
    image_size: int | None = Field(None, ge=16, description="square input size in pixels (default: the "
                                                            "backbone's own, 224 for the embedded one)")
    n_train: int | None = Field(800, ge=1, description="training images sampled (stratified) from the source")
    n_val: int = Field(200, ge=1, description="validation images (without DIR/val: carved out of DIR/train)")
    n_test: int | None = Field(2000, ge=0, description="test images evaluated at the end (0: skip the test set)")
    seed: int = Field(42, description="seed of the split, the initialisation, the data order and dropout")
    out_dir: Path | None = Field(None, description="run directory for checkpoints, report and plot "
                                                   "(default: runs/<task>)")
    resume: bool = Field(False, description="continue from the checkpoint in --out-dir after an interruption")
    overwrite: bool = Field(False, description="replace an existing task of the same name (as a new version)")
    register_url: str | None = Field(None, alias="register", description="POST the bundle to a running service "
                                                                         "at this base URL instead of writing --store")
    token: str | None = Field(None, exclude=True, repr=False,
                              description="bearer token for --register (default: $REPSERVE_TOKEN, else "
                                          "$REPSERVE_ADMIN_TOKEN)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    amp: Literal["auto", "none", "bf16", "fp16"] = Field("auto", description="mixed precision on CUDA (auto: "
                                                                             "bf16, else fp16); CPU runs fp32")
    workers: int | None = Field(None, ge=0, description="data loader worker processes (default: 0 on CPU, "
                                                        "4 on CUDA)")

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        """Fill the fields a recipe sets and the caller did not (an unknown recipe is left to the field check)."""
        if isinstance(data, dict) and isinstance(data.get("recipe"), str):
            return {**RECIPES.get(data["recipe"], {}), **data}
        return data

    @field_validator("store", mode="before")
    @classmethod
    def _path_is_text(cls, v: object) -> object:
        return str(v) if isinstance(v, PathLike) else v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return check_task_name(v)

    @field_validator("scale_grid")
    @classmethod
    def _grid(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in v) or len(set(v)) != len(v):
            raise ValueError("scales must be positive and distinct")
        return v

    @field_validator("class_mix")
    @classmethod
    def _mix(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and (any(m < 0 for m in v) or sum(m > 0 for m in v) < 2):
            raise ValueError("class frequencies must be >= 0, at least two of them positive")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.hidden % self.groups:
            raise ValueError(f"hidden={self.hidden} must be divisible by groups={self.groups}")
        if self.search_scale and self.method != "repadapter":
            raise ValueError("search_scale applies to method 'repadapter' only")
        return self

    @property
    def run_dir(self) -> Path:
        return self.out_dir if self.out_dir is not None else Path("runs") / self.task

    @property
    def scales(self) -> tuple[float, ...]:
        """The scales trained: the grid under --search-scale, else just --scale."""
        return self.scale_grid if self.search_scale else (self.scale,)

    def resume_identity(self, scale: float) -> dict[str, Any]:
        """What a checkpoint must have been trained with to be resumed by this run (JSON-able)."""
        return {**self.model_dump(mode="json", include=set(RESUME_KEYS)), "scale": scale}

    def command_line(self, **changes: Any) -> str:
        """The ``python -m training`` command of this configuration with ``changes``, without the token.

        Written in the flags of ``cli.config_flags`` (pydantic-settings' CLI source), so it parses back to the
        same configuration: the required fields and those away from what ``--recipe`` and the defaults give,
        kebab-case names (aliases win: ``--register``), ``--x``/``--no-x`` for booleans, ``null`` for None,
        comma lists for tuples, floats in their shortest exact form.
        """
        args = ["python", "-m", "training"]
        cfg = self.model_copy(update=changes)
        dumped = cfg.model_dump(mode="json", by_alias=True, exclude={"token"})
        kind = type(cfg)
        required = {name for name, field in kind.model_fields.items() if field.is_required()}
        implied = kind(**{n: getattr(cfg, n) for n in required}, recipe=cfg.recipe).model_dump(mode="json",
                                                                                               by_alias=True)
        implied["recipe"] = kind.model_fields["recipe"].default
        for name, value in dumped.items():
            if name not in required and value == implied[name]:
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
                continue
            text = ",".join(map(_flag_value, value)) if isinstance(value, list) else _flag_value(value)
            args += [f"{flag}={text}"] if text.startswith("-") else [flag, text]  # --seed=-1: not a flag
        return shlex.join(args)

    def public_dict(self) -> dict[str, Any]:
        """The configuration for reports: JSON-able, without the token."""
        return self.model_dump(mode="json")


def _flag_value(value: object) -> str:
    """One value as the CLI source reads it back: ``null`` for None, floats exact but without a trailing ``.0``."""
    if value is None:
        return "null"
    return repr(value).removesuffix(".0") if isinstance(value, float) else str(value)
