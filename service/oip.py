"""The Open Inference Protocol (KServe v2, Triton's HTTP API) wire format: request bodies in, response bodies out.

No HTTP and no engine here (routes/v2.py does both): a request body becomes one :class:`ParsedRequest` (the
images, already checked, and which outputs to send how), a task's answer becomes a response body.

A task is a model with two alternative inputs (send exactly one) and two outputs:

- ``image``: FP32 ``[N, 3, H, W]``, images already preprocessed at the task's input size (``GET /tasks/{name}``
  says how), row-major; ``image_bytes``: BYTES ``[N]`` (or ``[N, 1]``), encoded images (JPEG, PNG...), each
  element base64 in a JSON body, raw in the binary section.
- ``probabilities``: FP32 ``[N, C]``, the softmax over the task's labels, in the task's label order;
  ``labels``: BYTES ``[N, k]``, the ``top_k`` (request parameter, default 5, capped at ``C``) best labels.

Tensor data travels as JSON (``data``: flat or nested row-major) or, with Triton's binary tensor data extension
(what ``tritonclient`` sends by default), after a JSON header of ``Inference-Header-Content-Length`` bytes:
an input's ``parameters.binary_data_size`` bytes each, in input order, FP32 little-endian, BYTES as a 4-byte
little-endian length before each element. Outputs go binary the same way when asked (``binary_data`` on an
output, or ``binary_data_output`` on the request). Every malformed request is :class:`InvalidInput` (400).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from repadapter.errors import ImageError, PayloadTooLarge, describe_validation_error

from .errors import InvalidInput
from .registry import TaskRef
from .uploads import Upload

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "repserve_repadapter"
IMAGE, IMAGE_BYTES = "image", "image_bytes"
PROBABILITIES, LABELS = "probabilities", "labels"
DEFAULT_TOP_K = 5
MAX_ABS_VALUE = 1e4  # a preprocessed image holds normalized pixels, a few units; far beyond is not an image
_JSON_FLOAT_CHARS = 26  # the longest float a client's JSON encoder writes, with its separator
_HEADER_BYTES = 1 << 20  # what a body holds besides its tensors
_HEADER_VALUES = 4096  # JSON values a request holds besides its tensor's numbers

Count = Annotated[int, Field(ge=0)]


# ---- the protocol's JSON objects (pydantic: validation of requests, the schema /docs shows) -------------------


class _Open(BaseModel):
    """A protocol object: strict JSON types; fields the protocol allows but this server ignores are kept."""

    model_config = ConfigDict(strict=True, extra="allow")


class InputParameters(_Open):
    binary_data_size: Count | None = Field(None, description="Bytes of this input in the binary section.")


class RequestInput(_Open):
    name: str = Field(description=f"`{IMAGE}` (FP32) or `{IMAGE_BYTES}` (BYTES).")
    shape: list[Count]
    datatype: str
    parameters: InputParameters = InputParameters()
    data: Any = Field(None, description="Row-major, flat or nested; absent when the tensor is in the binary section.")


class OutputParameters(_Open):
    binary_data: bool | None = Field(None, description="Send this output in the binary section.")


class RequestOutput(_Open):
    name: str = Field(description=f"`{PROBABILITIES}` or `{LABELS}`.")
    parameters: OutputParameters = OutputParameters()


class RequestParameters(_Open):
    top_k: Annotated[int, Field(ge=1)] = Field(DEFAULT_TOP_K, description=f"Labels per image in `{LABELS}`.")
    binary_data_output: bool = Field(False, description="Send every output in the binary section.")


class InferenceRequest(_Open):
    id: str | None = None
    parameters: RequestParameters = RequestParameters()
    inputs: list[RequestInput] = Field(min_length=1, max_length=1, description="One input: the images.")
    outputs: list[RequestOutput] | None = Field(None, description="What to send (default: every output).")


class TensorMetadata(BaseModel):
    name: str
    datatype: Literal["FP32", "BYTES"]
    shape: list[int] = Field(description="-1: any size.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata] = Field(description="Alternatives: a request sends exactly one.")
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32", "BYTES"]
    parameters: dict[str, int] | None = Field(None, description="`binary_data_size` of a binary output.")
    data: list[float] | list[str] | None = Field(None, description="Row-major, flat (JSON outputs).")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class ProtocolError(BaseModel):
    """The protocol's error body (every error under /v2)."""

    error: str = Field(description="What is wrong, for a human.")


def request_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`InferenceRequest` with its definitions inlined: an OpenAPI request body written
    by hand (the route reads the raw body, binary or JSON) cannot add them to the document's components."""
    schema = InferenceRequest.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
        return {k: inline(v) for k, v in node.items()}

    return inline(schema)


def model_metadata(task: TaskRef) -> ModelMetadata:
    """A task as the protocol's model: its inputs at the task's input size, its outputs over its labels."""
    _, h, w = task.shape
    return ModelMetadata(
        name=task.name, versions=[str(task.version)], platform=PLATFORM,
        inputs=[TensorMetadata(name=IMAGE, datatype="FP32", shape=[-1, 3, h, w]),
                TensorMetadata(name=IMAGE_BYTES, datatype="BYTES", shape=[-1])],
        outputs=[TensorMetadata(name=PROBABILITIES, datatype="FP32", shape=[-1, len(task.labels)]),
                 TensorMetadata(name=LABELS, datatype="BYTES", shape=[-1, -1])],
    )


# ---- requests --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedRequest:
    """A checked request: the images (a preprocessed batch or encoded files) and what to answer."""

    id: str | None
    images: torch.Tensor | list[Upload]
    outputs: dict[str, bool]  # output name -> sent binary
    top_k: int


@dataclass(frozen=True)
class BodyLimits:
    """What an inference request for one task can legitimately hold, checked before anything is parsed.

    ``body``: the most bytes of any encoding (a JSON FP32 tensor at ``_JSON_FLOAT_CHARS`` a number, base64 files,
    or either in the binary section), refused (413) from ``Content-Length`` or while streaming. ``values``: the
    most JSON values the header may hold; a JSON tensor of more numbers than the task's most images is refused
    (413) before it becomes Python floats (about 32 bytes each however short its text)."""

    body: int
    values: int

    @classmethod
    def of(cls, shape: tuple[int, int, int], max_images: int, max_image_bytes: int) -> BodyLimits:
        c, h, _ = shape
        pixels = math.prod(shape)
        json_tensor = max_images * pixels * _JSON_FLOAT_CHARS
        base64_files = max_images * ((max_image_bytes + 2) // 3 * 4 + 8)
        binary = max_images * max(pixels * 4, max_image_bytes + 4)
        nesting = c * h + c + 1  # the arrays of one nested image
        return cls(_HEADER_BYTES + max(json_tensor, base64_files, binary),
                   max_images * (pixels + nesting) + _HEADER_VALUES)

    def check(self, body: bytes, json_size: int) -> None:
        """Refuse (413) a body that cannot be a request this task takes: a JSON header of more values than the
        task's most images hold, or a header longer than ``_HEADER_BYTES`` before a binary section. Counts
        bytes only (C speed, no parsing): every JSON value but one follows a ``,`` or opens with ``[``/``{``."""
        if len(body) > self.body:
            raise PayloadTooLarge(f"the request body is {len(body)} bytes, the limit is {self.body}")
        if json_size < len(body) and json_size > _HEADER_BYTES:
            raise PayloadTooLarge(f"the JSON header is {json_size} bytes before binary data; at most {_HEADER_BYTES}")
        values = sum(body.count(c, 0, json_size) for c in (b",", b"[", b"{"))
        if values > self.values:
            raise PayloadTooLarge(f"the request holds more than {self.values} JSON values, more than this task's "
                                  "most images can")


def header_length(value: str | None, body_size: int) -> int:
    """The JSON header's length (the whole body without the binary extension's header)."""
    if value is None:
        return body_size
    if not (value.isascii() and value.isdigit()) or int(value) > body_size:
        raise InvalidInput(f"{HEADER_LENGTH} must be a byte count within the body's {body_size} bytes; got {value!r}")
    return int(value)


def _no_check() -> None:
    pass


def parse_request(body: bytes, json_size: int, shape: tuple[int, int, int],
                  check: Callable[[], None] = _no_check) -> ParsedRequest:
    """Check a request body (``json_size`` bytes of JSON header, then the binary section) for a task of input
    ``shape``. Blocking (the largest JSON tensor takes seconds): call it off the event loop, after
    :meth:`BodyLimits.check`. ``check`` is called between steps (and before each image): it raises to stop the
    work (the request's deadline passed, its client left)."""
    check()
    view = memoryview(body)  # slices of it share the body's bytes
    try:  # pydantic reads bytes only: the whole body, or a header of at most _HEADER_BYTES before binary data
        request = InferenceRequest.model_validate_json(body if json_size == len(body) else bytes(view[:json_size]))
    except ValidationError as e:
        raise InvalidInput(f"invalid inference request: {describe_validation_error(e, empty='body')}") from None
    check()
    tensor = request.inputs[0]
    images = _images(tensor, _binary_section(tensor, view[json_size:]), shape, check)
    return ParsedRequest(request.id, images, _outputs(request), request.parameters.top_k)


def _binary_section(tensor: RequestInput, binary: memoryview) -> memoryview | None:
    """The input's bytes in the binary section, or ``None`` when its data is in the JSON header."""
    size = tensor.parameters.binary_data_size
    if size is None:
        if tensor.data is None:
            raise InvalidInput(f"input {tensor.name!r}: send its `data`, or binary_data_size bytes after the header")
        if binary:
            raise InvalidInput(f"{len(binary)} bytes follow the JSON header but no input has a binary_data_size")
        return None
    if tensor.data is not None:
        raise InvalidInput(f"input {tensor.name!r}: send its `data` or a binary_data_size, not both")
    if size != len(binary):
        raise InvalidInput(f"input {tensor.name!r}: binary_data_size is {size} but {len(binary)} bytes follow "
                           "the JSON header")
    return binary


def _images(tensor: RequestInput, binary: memoryview | None, shape: tuple[int, int, int],
            check: Callable[[], None]) -> torch.Tensor | list[Upload]:
    expected = {IMAGE: "FP32", IMAGE_BYTES: "BYTES"}.get(tensor.name)
    if expected is None:
        raise InvalidInput(f"unknown input {tensor.name!r}; send {IMAGE!r} (FP32 [N, {', '.join(map(str, shape))}]) "
                           f"or {IMAGE_BYTES!r} (BYTES [N]: encoded images)")
    if tensor.datatype != expected:
        raise InvalidInput(f"input {tensor.name!r} is {expected}, not {tensor.datatype}")
    if not tensor.shape or tensor.shape[0] < 1:
        raise InvalidInput(f"input {tensor.name!r}: shape {tensor.shape} holds no image")
    if tensor.name == IMAGE:
        return _pixels(tensor, binary, shape)
    return _files(tensor, binary, check)


def _pixels(tensor: RequestInput, binary: memoryview | None, shape: tuple[int, int, int]) -> torch.Tensor:
    n = tensor.shape[0]
    if tensor.shape != [n, *shape]:
        raise InvalidInput(f"input {IMAGE!r}: shape {tensor.shape}; this task takes [N, {', '.join(map(str, shape))}]")
    count = math.prod(tensor.shape)
    if binary is not None:
        if len(binary) != count * 4:
            raise InvalidInput(f"input {IMAGE!r}: {len(binary)} bytes; shape {tensor.shape} is {count * 4} (FP32)")
        x = torch.from_numpy(np.frombuffer(binary, dtype="<f4").astype(np.float32))
    else:
        x = _float_data(tensor.data)
        if x.numel() != count:
            raise InvalidInput(f"input {IMAGE!r}: {x.numel()} values; shape {tensor.shape} holds {count}")
    if not bool(x.abs().le(MAX_ABS_VALUE).all()):  # NaN fails too
        raise InvalidInput(f"input {IMAGE!r}: values must be finite and within ±{MAX_ABS_VALUE:g} "
                           "(normalized pixels)")
    return x.reshape(tensor.shape)


def _float_data(data: Any) -> torch.Tensor:
    if not isinstance(data, list) or any(isinstance(v, bool) for v in _leaves(data)):
        raise InvalidInput(f"input {IMAGE!r}: data must be an array of numbers")
    try:
        return torch.tensor(data, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise InvalidInput(f"input {IMAGE!r}: data must be a (flat or evenly nested) array of numbers") from None


def _leaves(data: list) -> list:
    """The values of a nested list, row-major (a flat list is its own)."""
    while data and isinstance(data[0], list) and all(isinstance(v, list) for v in data):
        data = list(itertools.chain.from_iterable(data))
    return data


def _files(tensor: RequestInput, binary: memoryview | None, check: Callable[[], None]) -> list[Upload]:
    n = tensor.shape[0]
    if tensor.shape not in ([n], [n, 1]):
        raise InvalidInput(f"input {IMAGE_BYTES!r}: shape {tensor.shape}; send [N] (or [N, 1]) images")
    if binary is not None:
        elements = _split_bytes(binary)
    else:
        values = _leaves(tensor.data) if isinstance(tensor.data, list) else None
        if values is None or not all(isinstance(v, str) for v in values):
            raise InvalidInput(f"input {IMAGE_BYTES!r}: data must be an array of base64 strings (encoded images)")
        if len(values) != n:
            raise InvalidInput(f"input {IMAGE_BYTES!r}: {len(values)} elements; shape {tensor.shape} holds {n}")
        elements = []
        for i, v in enumerate(values):
            check()
            elements.append(_base64(i, v))
    if len(elements) != n:
        raise InvalidInput(f"input {IMAGE_BYTES!r}: {len(elements)} elements; shape {tensor.shape} holds {n}")
    # binary elements stay views of the body (decoding takes any bytes-like object)
    return [Upload(data) for data in elements]  # type: ignore[arg-type]


def _base64(index: int, value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"input {IMAGE_BYTES!r}: element {index} is not base64 (encoded image bytes)") from None


def _split_bytes(binary: memoryview) -> list[memoryview]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    out, offset = [], 0
    while offset < len(binary):
        if offset + 4 > len(binary):
            raise InvalidInput(f"input {IMAGE_BYTES!r}: the binary data ends inside an element's length")
        (size,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if offset + size > len(binary):
            raise InvalidInput(f"input {IMAGE_BYTES!r}: element {len(out)} is {size} bytes; "
                               f"{len(binary) - offset} remain")
        out.append(binary[offset:offset + size])
        offset += size
    return out


def _outputs(request: InferenceRequest) -> dict[str, bool]:
    binary = request.parameters.binary_data_output
    if request.outputs is None:
        return {PROBABILITIES: binary, LABELS: binary}
    out: dict[str, bool] = {}
    for output in request.outputs:
        if output.name not in (PROBABILITIES, LABELS):
            raise InvalidInput(f"unknown output {output.name!r}; this model has {PROBABILITIES!r} and {LABELS!r}")
        wanted = output.parameters.binary_data
        out[output.name] = binary if wanted is None else wanted
    return out


def image_error(error: ImageError) -> InvalidInput:
    """An encoded image that does not decode is bad input of this protocol (400), not an unsupported media type."""
    return InvalidInput(f"input {IMAGE_BYTES!r}: {error}")


# ---- responses -------------------------------------------------------------------------------------------------


def predictions_needed(request: ParsedRequest, task: TaskRef) -> int:
    """How many ``(label, score)`` per image the engine must answer: every class for ``probabilities``."""
    return len(task.labels) if PROBABILITIES in request.outputs else min(request.top_k, len(task.labels))


def encode_response(task: TaskRef, request: ParsedRequest,
                    predictions: list[list[tuple[str, float]]]) -> tuple[bytes, int | None]:
    """The response body (outputs in the order asked for), and the JSON header's length when binary outputs follow
    it (else ``None``)."""
    outputs, blobs = [], []
    for name, binary in request.outputs.items():
        shape, datatype, values = _output(name, task, request.top_k, predictions)
        if binary:
            blobs.append(_binary(values))
            outputs.append(ResponseOutput(name=name, shape=shape, datatype=datatype,
                                          parameters={"binary_data_size": len(blobs[-1])}))
        else:
            data = values.tolist() if isinstance(values, np.ndarray) else values
            outputs.append(ResponseOutput(name=name, shape=shape, datatype=datatype, data=data))
    header = InferenceResponse(model_name=task.name, model_version=str(task.version), id=request.id,
                               outputs=outputs).model_dump_json(exclude_none=True).encode()
    return header + b"".join(blobs), len(header) if blobs else None


def _output(name: str, task: TaskRef, top_k: int, predictions: list[list[tuple[str, float]]],
            ) -> tuple[list[int], Literal["FP32", "BYTES"], np.ndarray | list[str]]:
    """An output's shape, datatype and values (row-major, flat)."""
    n, classes = len(predictions), len(task.labels)
    if name == PROBABILITIES:
        return [n, classes], "FP32", _probabilities(task, predictions)
    k = min(top_k, classes)
    return [n, k], "BYTES", [label for row in predictions for label, _ in row[:k]]


def _probabilities(task: TaskRef, predictions: list[list[tuple[str, float]]]) -> np.ndarray:
    """``[N * C]`` float32 in the task's label order, from every class's ``(label, score)`` best first."""
    column = {label: c for c, label in enumerate(task.labels)}
    out = np.zeros((len(predictions), len(task.labels)), dtype=np.float32)
    for row, scores in zip(out, predictions, strict=True):
        row[[column[label] for label, _ in scores]] = [score for _, score in scores]
    if not np.isfinite(out).all():
        raise InvalidInput(f"input {IMAGE!r}: the model's output is not finite for these values; "
                           "send images preprocessed as the task says")
    return out.reshape(-1)


def _binary(values: np.ndarray | list[str]) -> bytes:
    if isinstance(values, np.ndarray):
        return values.astype("<f4").tobytes()
    return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in values))
