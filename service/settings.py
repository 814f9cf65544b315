"""Service configuration: environment variables with one prefix (``REPSERVE_``), overridable by CLI flags.

Every field is typed, defaulted and described; the README's configuration table is generated from this
class (:func:`settings_table`) and a unit test keeps the two in sync.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ByteSize, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import torch

ENV_PREFIX = "REPSERVE_"
MIN_TOKEN_CHARS = 16
PLACEHOLDER_WORDS = ("change-me", "changeme", "change_me", "replace-me", "placeholder", "example", "xxxxxxxx",
                     "password")


class Settings(BaseSettings):
    """All knobs of one RepServe process (one backbone, one store)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="Interface to bind (`0.0.0.0` in containers).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    store: str = Field("adapters_store", description="Task store: a directory (created if missing) or "
                       "`s3://bucket/prefix` (S3-compatible; credentials from the standard `AWS_*` environment).")
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store (MinIO, Ceph), e.g. `http://minio:9000`; unset: AWS "
        "(or boto3's `AWS_ENDPOINT_URL`).")
    store_gc_grace_s: float = Field(
        3600.0, ge=0, description="After start-up, remove what crashed writers left in the store: every temp "
        "directory of a directory store (its writers hold its lock), and on S3 unreferenced tensors and deleted "
        "tasks once older than this many seconds (a write in flight is younger); 0: never.")
    backbone: str = Field("embedded", description="`embedded` (ImageNet MobileNetV2) or a timm architecture name.")
    checkpoint: Path | None = Field(None, description="Local backbone weights (safetensors or torch file); "
                                    "without one a non-embedded backbone is randomly initialised from `seed`.")
    backbone_options: dict[str, Any] = Field(
        default_factory=dict, description='Extra timm `create_model` arguments as JSON, e.g. `{"img_size": 64}`.')
    seed: int = Field(0, description="Seed of a backbone without checkpoint (its fingerprint depends on it).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` picks CUDA when available.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Backbone and head dtype (softmax is always float32).")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for POST/DELETE /tasks (also accepted where the classify token is); "
        "unset: open.")
    classify_token: SecretStr | None = Field(
        None, description="Bearer token for /classify and GET /tasks (the admin token also works); unset: open.")
    policy: Literal["auto", "merged", "mixed"] = Field(
        "auto", description="`merged`: switch weights per batch; `mixed`: unmerged per-row adapters; "
        "`auto`: chosen per batch from the queue mix and measured costs.")
    max_batch: int = Field(16, ge=1, le=4096, description="Most images in one forward pass.")
    max_delay_ms: float = Field(5.0, ge=0, description="Longest a request waits for its batch to fill.")
    starvation_ms: float = Field(
        200.0, gt=0, description="A queue whose oldest request waited this long is served next, oldest first.")
    max_queue_images: int = Field(
        1024, ge=1, description="Images waiting in all queues before new requests get 503 `queue_full`.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="A classification not answered this many seconds after it arrived gets 503 `timeout`: "
        "reading the body, waiting to decode, decoding (stopped between images and decoding steps), loading the task "
        "and inference all count.")
    max_images_per_request: int = Field(64, ge=1, description="Most images in one /classify request.")
    max_image_bytes: int = Field(20 << 20, ge=1, description="Largest encoded image, in bytes (413 above).")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest image, width x height, checked on its header before decoding (413 "
        "above; decompression bombs); also the most pixels its resize to the task's input may make.")
    max_image_aspect: float = Field(
        100.0, ge=1, description="Largest ratio of an image's long side to its short side, checked on its header "
        "(413 above): preprocessing resizes the short side to the input size and the long side by as much, so a "
        "300-byte 200000x1 PNG would become 51200000x256 px (39 GB).")
    decode_concurrency: int = Field(
        4, ge=1, le=256, description="Requests decoding images at once; others wait (within `request_timeout_s`). "
        "Peak decoding memory is this many times one image's: about 9 bytes per pixel at worst (340 MB for a 40 Mpx "
        "RGBA PNG, 160 MB for RGB).")
    max_bundle_bytes: int = Field(512 << 20, ge=1, description="Largest task upload to POST /tasks, in bytes.")
    host_cache_bytes: ByteSize = Field(
        "1GiB", description="Host tier: verified task bundles kept in memory, least recently used evicted first "
        "(bytes, or e.g. `512MiB`); a task not held here is read from the store on its next request.")
    device_cache_bytes: ByteSize = Field(
        "256MiB", description="Device tier: tasks ready on the serving device (adapters, row folds, head, and the "
        "merged fold once merged), LRU, bytes; a task not held here is moved from the host tier on its next request.")
    live_cache_bytes: ByteSize = Field(
        "64MiB", description="Live tier: merged weights of recently merged tasks, so switching back to one is a "
        "memory copy; each costs one copy of the adapted layers (6.6 MiB on the embedded MobileNetV2, 189 MiB on a "
        "float32 ViT-B); LRU, bytes; 0: every switch recomputes (rank-r addmm).")
    loader_threads: int = Field(2, ge=1, le=64, description="Threads that load tasks from the store onto the device "
                                "(never the inference worker's).")
    store_poll_s: float = Field(
        10.0, ge=0, description="Store re-scan interval in seconds (0: only at start and on SIGHUP).")
    builtin_task: str = Field(
        "imagenet", description="Serve the backbone's own classifier as this task when it has one (empty: off).")
    torch_threads: int = Field(
        0, ge=0, description="CPU threads torch uses in this process (0: torch's default, from OMP_NUM_THREADS or "
        "the cores); match the CPU limit, or 1 on a small shared machine.")
    warmup: bool = Field(True, description="Warm up every input size and measure the costs `auto` needs before "
                         "reporting ready (without it `auto` starts on merged and learns the mixed cost by exploring).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Logging level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="`text` (key=value) or `json` (one object per line, tracebacks on the same line); every "
        "line of a request carries its `request_id` (the client's `X-Request-ID`, or a generated one, echoed).")
    body_timeout_s: float = Field(
        30.0, ge=0, description="A request body must arrive within this many seconds of its first byte, or 408 "
        "(slow clients cannot hold connections); 0: no limit.")

    @field_validator("store", mode="before")
    @classmethod
    def _path_is_text(cls, v: object) -> object:
        return str(v) if isinstance(v, PathLike) else v

    @field_validator("admin_token", "classify_token", mode="after")
    @classmethod
    def _strong_token_or_unset(cls, v: SecretStr | None) -> SecretStr | None:
        """An empty token would make "Authorization: Bearer " valid: it means not configured. A short or
        example token is refused: a deployment copied from the docs must not run with a known secret."""
        if v is None or not v.get_secret_value():
            return None
        token = v.get_secret_value()
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"token too short ({len(token)} characters, at least {MIN_TOKEN_CHARS}); make one "
                             "with `openssl rand -hex 32`")
        if any(word in token.lower() for word in PLACEHOLDER_WORDS):
            raise ValueError("token looks like a placeholder from an example (e.g. `change-me`); make one with "
                             "`openssl rand -hex 32`")
        return v

    # torch is imported on use only: `python -m service --help` and the docs table stay instant.
    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda`` (``auto``: CUDA when available)."""
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


CLIENT_URL_ENV = ENV_PREFIX + "URL"
CLIENT_TOKEN_ENV = ENV_PREFIX + "TOKEN"
"""Read by the ``repserve`` client commands, not the server: known, so a shell that exports them for the
client does not make the server warn."""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``REPSERVE_*`` names in ``environ`` that are no setting (a typo such as ``REPSERVE_MAX_BATH`` would
    otherwise leave the default in force without a word)."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {CLIENT_URL_ENV, CLIENT_TOKEN_ENV}
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def default_text(name: str) -> str:
    """A field's default as written in docs and ``--help`` (``unset`` for ``None``)."""
    value = Settings.model_fields[name].get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, dict | bool):
        return json.dumps(value)
    return str(value)


def settings_table() -> str:
    """The README's configuration table (markdown), one row per :class:`Settings` field."""
    rows = ["| variable | default | description |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = default_text(name)
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {'unset' if default == 'unset' else f'`{default}`'} "
                    f"| {field.description} |")
    return "\n".join(rows) + "\n"
