"""Response bodies (pydantic): what /docs shows is exactly what the routes return."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from repadapter.bundle import AdapterConfig, BackboneRef
from repadapter.preprocess import PreprocessConfig

from .registry import TaskRef

FIRST_LABELS = 5  # labels every view of a task shows (the listing has no full list)


class ErrorBody(BaseModel):
    """Every error response: a machine-readable code and a message that says what is wrong."""

    error: str = Field(description="Error code, e.g. `task_not_found`, `payload_too_large`.")
    detail: str = Field(description="What is wrong, for a human.")


class Prediction(BaseModel):
    label: str
    score: float = Field(description="Softmax probability (float32).")


class ImageResult(BaseModel):
    index: int = Field(description="Position of the image in the request.")
    filename: str | None = Field(None, description="The uploaded file's name (multipart only).")
    predictions: list[Prediction] = Field(description="Top-k, highest score first.")


class Timings(BaseModel):
    decode_ms: float = Field(description="Decoding and preprocessing all images.")
    queue_ms: float = Field(description="Longest wait of the request's chunks in the task queue.")
    load_ms: float = Field(description="Waiting for the task to be loaded onto the device (0 when resident).")
    inference_ms: float = Field(description="Summed time of the batches that served the request.")
    total_ms: float = Field(description="Time spent in the handler.")


class ClassifyResponse(BaseModel):
    task: str
    task_version: int = Field(description="The version that answered: the one current when the request "
                                          "was accepted.")
    results: list[ImageResult]
    batch_sizes: list[int] = Field(description="Images in each forward pass that served this request.")
    modes: list[Literal["merged", "mixed"]] = Field(description="How each of those batches was run.")
    timings: Timings


class TaskInfo(BaseModel):
    """A served task; ``labels`` only in the single-task view."""

    name: str
    version: int
    method: str
    num_labels: int
    labels: list[str] | None = None
    first_labels: list[str] = Field(description=f"The task's first {FIRST_LABELS} labels (all of them when fewer), "
                                    "in every view: a glimpse of what it tells apart.")
    builtin: bool = Field(description="The backbone's own classifier (not in the store; cannot be deleted).")
    adapter: AdapterConfig
    resident: Literal["device", "host", "store"] = Field(
        description="Where the task's tensors are now: `device` (ready), `host` (in memory, moved to the device "
                    "on its next request), `store` (read from the store on its next request).")
    backbone: BackboneRef
    preprocess: PreprocessConfig
    metrics: dict[str, Any]
    description: str
    created_at: str
    tensors_sha256: str

    @classmethod
    def of(cls, task: TaskRef, resident: str, *, labels: bool = False) -> TaskInfo:
        m = task.manifest
        return cls(
            name=m.name, version=m.version, method=m.method, num_labels=len(m.labels),
            labels=list(m.labels) if labels else None, first_labels=list(m.labels[:FIRST_LABELS]),
            builtin=task.builtin, adapter=m.adapter,
            resident=resident, backbone=m.backbone, preprocess=m.preprocess, metrics=m.metrics,
            description=m.description, created_at=m.created_at, tensors_sha256=m.tensors_sha256,
        )


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    tasks: int
    device: str
    dtype: str
    policy: str
    active_task: str | None
    costs: dict[str, float | None] = Field(description="The auto policy's current cost estimates (seconds).")
