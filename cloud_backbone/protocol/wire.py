"""The protocol's dataclasses to and from their protobuf form (split.proto).

With bundle.py, the only module besides the transports (the servicer, the device's gRPC
link) that imports the generated protobuf code: training, generation, the cloud session and
the platform see the dataclasses of protocol.messages, and tools that speak the session
stream raw (benchmarks, a hostile neighbour) its frames as bytes.

Everything read here comes from the other party and is checked before use: tensors are rebuilt
from raw bytes with typed dtype and shape (never unpickled), and any malformed field raises
`ValidationError` quoting what was received and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from google.protobuf.message import DecodeError

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol.messages import (
    AdapterReply,
    AdapterRequest,
    BackboneIdentity,
    BackwardRequest,
    BackwardResult,
    CacheMode,
    ForwardRequest,
    ForwardResult,
    HostedBackbone,
    OpenSession,
    Phase,
    SessionOpened,
    StepError,
)
from plora.cloud_backbone.protocol import split_pb2 as pb
from plora.storage.errors import ConfigError, ValidationError, quoted
from plora.storage.registry import JobReport

DEVICE_HEADER = "x-plora-device"  # call metadata naming the device; its token goes in "authorization: Bearer"
SERVICE = pb.DESCRIPTOR.services_by_name["SplitBackbone"].full_name
SESSION_METHOD = f"/{SERVICE}/Session"  # the session stream's gRPC method path
MAX_DIMS = 4  # every tensor of the protocol is at most (B, T, d) or a (B, T) mask
MAX_ERROR_CHARS = 1000  # of an error one side tells the other, which ends in logs and before users
MAX_KIND_CHARS = 64  # an error kind names an exception class
PIECE_BYTES = 64 * 1024  # of an adapter exchange on the wire (`pieces`): 5 ms at 100 Mbit/s
_DTYPES = {pb.FLOAT32: torch.float32, pb.FLOAT16: torch.float16, pb.BFLOAT16: torch.bfloat16, pb.INT64: torch.int64}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_CACHE = {CacheMode.NONE: pb.CACHE_NONE, CacheMode.START: pb.CACHE_START, CacheMode.EXTEND: pb.CACHE_EXTEND}
_PHASE = {Phase.FORWARD: pb.PHASE_FORWARD, Phase.BACKWARD: pb.PHASE_BACKWARD}
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- the dtype activations cross in ------------------------------------------------------------

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WireDtypes:
    """What a device's activations cross the network in; device and cloud compute in float32.
    `exchanges`: u, u·M and their gradients, once each way per adapted layer, so nearly every
    byte of a pass; `cut`: the hidden state at the cut and its gradient, once each way a pass.
    The default halves the exchanges' bytes: as float16 they moved a personalized model's token
    log-probabilities by at most 0.0011 nats, the cut by up to 0.012 (README, "What the wire costs")."""

    exchanges: torch.dtype = torch.float16
    cut: torch.dtype = torch.float32

    @classmethod
    def named(cls, exchanges: str, cut: str) -> WireDtypes:
        """From WIRE_DTYPES' names."""
        return cls(WIRE_DTYPES[exchanges], WIRE_DTYPES[cut])

    def request(self, message):
        """A float32 ForwardRequest or BackwardRequest as it is sent: its tensors in `cut`,
        naming `exchanges` where it differs."""
        message = to_wire_dtype(message, self.cut)
        return dataclasses.replace(message, exchange_dtype=self.exchanges) if self.exchanges != self.cut else message


EXACT_WIRE = WireDtypes(torch.float32)
"""Every activation in float32: the split gives exactly the in-process result."""


def step_dtypes(request) -> WireDtypes:
    """What a device speaks for a step: the cut in the dtype of the hidden state (or its
    gradient) it sent, when it is one of WIRE_DTYPES; the exchanges in the dtype it named, or
    the cut's. The cloud computes in float32 whatever they are, and speaks them back."""
    tensor = request.hidden if isinstance(request, ForwardRequest) else getattr(request, "grad_hidden", None)
    dtype = getattr(tensor, "dtype", None)
    cut = dtype if dtype in WIRE_DTYPES.values() else torch.float32
    return WireDtypes(getattr(request, "exchange_dtype", None) or cut, cut)


def to_wire_dtype(message, dtype: torch.dtype):
    """`message` with its float32 tensors as `dtype`, to send (masks stay int64)."""
    if dtype == torch.float32:
        return message
    cast = {k: v.to(dtype) for k, v in vars(message).items() if isinstance(v, torch.Tensor) and v.dtype == torch.float32}
    return dataclasses.replace(message, **cast) if cast else message


def from_wire_dtype(message, dtype: torch.dtype):
    """A received `message` with its `dtype` tensors as float32, to compute with; a float
    tensor in another dtype than the step's is refused."""
    if dtype == torch.float32:
        return message
    cast = {}
    for name, value in vars(message).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if value.dtype != dtype:
                raise ValidationError(f"{type(message).__name__}.{name} is {value.dtype}, but this step's tensors cross as {dtype}")
            cast[name] = value.float()
    return dataclasses.replace(message, **cast) if cast else message


# --- tensors -------------------------------------------------------------------------------


def _swap_to_little(raw: torch.Tensor, itemsize: int) -> torch.Tensor:
    # The wire is little-endian; only a big-endian host has to reverse each element's bytes.
    if sys.byteorder == "little" or itemsize == 1:
        return raw
    return raw.view(-1, itemsize).flip(1).reshape(-1)


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    """A tensor as dtype, shape and its contiguous little-endian bytes."""
    code = _CODES.get(t.dtype)
    if code is None:
        raise ValidationError(f"cannot send a {t.dtype} tensor; expected one of {sorted(map(str, _CODES))}")
    if t.dim() > MAX_DIMS:
        raise ValidationError(f"cannot send a tensor of shape {list(t.shape)}; at most {MAX_DIMS} dims expected")
    flat = t.detach().cpu().contiguous().reshape(-1)
    raw = _swap_to_little(flat.view(torch.uint8), t.element_size())
    return pb.Tensor(dtype=code, shape=list(t.shape), data=raw.numpy().tobytes())


def tensor_from_proto(msg: pb.Tensor, max_elements: int) -> torch.Tensor:
    """The tensor `msg` describes, after checking dtype, shape and payload size against each other."""
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        name = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else f"unknown value {msg.dtype}"
        raise ValidationError(f"tensor dtype is {name}; expected one of {[pb.DType.Name(c) for c in _DTYPES]}")
    shape = tuple(msg.shape)
    if len(shape) > MAX_DIMS:
        raise ValidationError(f"tensor shape {list(shape)} has {len(shape)} dims; at most {MAX_DIMS} expected")
    if any(d < 0 for d in shape):
        raise ValidationError(f"tensor shape {list(shape)} has a negative dimension")
    numel = math.prod(shape)
    if numel > max_elements:
        raise ValidationError(f"tensor shape {list(shape)} has {numel} elements; at most {max_elements} accepted")
    itemsize = dtype.itemsize
    if len(msg.data) != numel * itemsize:
        raise ValidationError(
            f"tensor payload is {len(msg.data)} bytes; shape {list(shape)} of {pb.DType.Name(msg.dtype)} "
            f"needs exactly {numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)  # frombuffer refuses an empty buffer
    # A bytearray copy: the result is writable and keeps no reference to the protobuf message.
    raw = _swap_to_little(torch.frombuffer(bytearray(msg.data), dtype=torch.uint8), itemsize)
    return raw.view(dtype).reshape(shape)


def _field(msg, field: str, max_elements: int, required: bool = True) -> torch.Tensor | None:
    # An absent submessage reads as an empty default; HasField tells "absent" from "empty".
    if msg.HasField(field):
        return tensor_from_proto(getattr(msg, field), max_elements)
    if required:
        raise ValidationError(f"{type(msg).__name__}.{field} is missing; a tensor is required")
    return None


def _maybe(t: torch.Tensor | None) -> pb.Tensor | None:
    return None if t is None else tensor_to_proto(t)  # None leaves the field absent


def _enum(table: dict, value: int, what: str):
    found = [member for member, code in table.items() if code == value]
    if not found:  # proto3 enums are open: an unknown number parses without complaint
        raise ValidationError(f"{what} is {value}; expected one of {sorted(table.values())}")
    return found[0]


@contextmanager
def _encoding(what: object):
    # protobuf raises ValueError/TypeError for out-of-range integers and wrong types, and a field
    # of the wrong type fails in the lookups above; either way the message cannot be sent as is.
    try:
        yield
    except ValidationError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValidationError(f"cannot encode {type(what).__name__}: {err}") from err


# --- identity ------------------------------------------------------------------------------


def identity_to_proto(identity: BackboneIdentity) -> pb.BackboneIdentity:
    with _encoding(identity):  # AdapterConfig mirrors PrivateLoRAConfig field for field
        return pb.BackboneIdentity(
            name=identity.name, content_hash=identity.content_hash, num_layers=identity.num_layers,
            hidden_size=identity.hidden_size, adapter=pb.AdapterConfig(**identity.adapter.to_dict()),
        )


def identity_from_proto(msg: pb.BackboneIdentity) -> BackboneIdentity:
    if not msg.HasField("adapter"):
        raise ValidationError("BackboneIdentity.adapter is missing; an adapter config is required")
    a = msg.adapter
    try:
        adapter = PrivateLoRAConfig(
            rank=a.rank, targets=tuple(a.targets), shared_a=a.shared_a, scale=a.scale, seed=a.seed,
            device_layers=a.device_layers, device_last_layers=a.device_last_layers, adapt_layers=tuple(a.adapt_layers),
            projections=a.projections or "random",
        )
    except (ConfigError, TypeError) as err:
        raise ValidationError(f"invalid adapter config in BackboneIdentity: {err}") from err
    return BackboneIdentity(msg.name, msg.content_hash, msg.num_layers, msg.hidden_size, adapter)


def _identity(msg, field: str) -> BackboneIdentity:
    if not msg.HasField(field):
        raise ValidationError(f"{type(msg).__name__}.{field} is missing; a backbone identity is required")
    return identity_from_proto(getattr(msg, field))


def hosted_to_proto(hosted: HostedBackbone) -> pb.HostedBackbone:
    with _encoding(hosted):
        return pb.HostedBackbone(
            identity=identity_to_proto(hosted.identity),
            bundle=pb.BundleInfo(sha256=hosted.bundle_sha256, size=hosted.bundle_size),
            is_default=hosted.is_default,
        )


def hosted_from_proto(msg: pb.HostedBackbone) -> HostedBackbone:
    if not msg.HasField("bundle"):
        raise ValidationError("HostedBackbone.bundle is missing; a bundle's digest and size are required")
    sha256, size = msg.bundle.sha256, msg.bundle.size
    if not _SHA256.fullmatch(sha256):
        raise ValidationError(f"the bundle's digest is {sha256[:80]!r}; expected 64 lowercase hex digits (a SHA-256)")
    if size == 0:
        raise ValidationError("the bundle's size is 0 bytes; a device bundle holds at least its model files")
    return HostedBackbone(_identity(msg, "identity"), sha256, size, msg.is_default)


# --- jobs reported by devices ----------------------------------------------------------------

MAX_JOB_REPORTS = 100  # in one ReportJobs call
MAX_REPORT_JSON_CHARS = 8192  # of one JSON field of a report: a flat object of short scalars


def job_report_to_proto(report: JobReport) -> pb.JobReport:
    return pb.JobReport(
        uuid=report.uuid, kind=report.kind, status=report.status, version=report.version, target=report.target or "",
        params_json=json.dumps(report.params), metrics_before_json=_json_or_empty(report.metrics_before),
        metrics_after_json=_json_or_empty(report.metrics_after), tokens_processed=report.tokens_processed,
        steps_done=report.steps_done, reason=report.reason or "", created_at=report.created_at.timestamp(),
        started_at=_seconds_or_zero(report.started_at), ended_at=_seconds_or_zero(report.ended_at),
    )


def job_report_from_proto(msg: pb.JobReport) -> JobReport:
    """The report, with its JSON parsed and its times made datetimes; what the fields may hold
    is the registry's to check (Registry.record_job_report)."""
    return JobReport(
        msg.uuid, msg.kind, msg.status, msg.version, msg.target or None, _json_object("params", msg.params_json),
        _json_object("metrics_before", msg.metrics_before_json, optional=True),
        _json_object("metrics_after", msg.metrics_after_json, optional=True), msg.tokens_processed, msg.steps_done,
        msg.reason or None, _moment("created_at", msg.created_at), _moment("started_at", msg.started_at, optional=True),
        _moment("ended_at", msg.ended_at, optional=True),
    )


def _json_or_empty(value: dict | None) -> str:
    return "" if value is None else json.dumps(value)


def _seconds_or_zero(moment: datetime | None) -> float:
    return 0.0 if moment is None else moment.timestamp()


def _json_object(what: str, text: str, optional: bool = False) -> dict | None:
    if not text and optional:
        return None
    if len(text) > MAX_REPORT_JSON_CHARS:
        raise ValidationError(f"a job report's {what} has {len(text)} characters, more than {MAX_REPORT_JSON_CHARS}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ValidationError(f"a job report's {what} is not JSON") from None
    if not isinstance(value, dict):
        raise ValidationError(f"a job report's {what} is not a JSON object")
    return value


def _moment(what: str, seconds: float, optional: bool = False) -> datetime | None:
    if seconds == 0 and optional:
        return None
    if not (math.isfinite(seconds) and 0 < seconds < 1e11):  # 1e11 s: the year 5138
        raise ValidationError(f"a job report's {what} is not a time: {seconds!r}")
    return datetime.fromtimestamp(seconds, timezone.utc)


# --- the session stream ----------------------------------------------------------------------


def _adapter_to_proto(cls, m: AdapterRequest | AdapterReply):
    return cls(layer=m.layer, group=m.group, phase=_PHASE[m.phase], tensor=tensor_to_proto(m.tensor), start=m.start)


def _exchange_code(dtype: torch.dtype | None) -> int:
    if dtype is None:
        return pb.DTYPE_UNSPECIFIED
    if dtype not in WIRE_DTYPES.values():
        raise ValidationError(f"exchanges cannot cross as {dtype}; expected one of {sorted(WIRE_DTYPES)}")
    return _CODES[dtype]


def _exchange_dtype(body) -> torch.dtype | None:
    code = body.exchange_dtype
    if code == pb.DTYPE_UNSPECIFIED:
        return None
    dtype = _DTYPES.get(code)
    if dtype not in WIRE_DTYPES.values():
        name = pb.DType.Name(code) if code in pb.DType.values() else f"unknown value {code}"
        raise ValidationError(f"{type(body).__name__}.exchange_dtype is {name}; expected one of {sorted(WIRE_DTYPES)}")
    return dtype


def _adapter_from_proto(cls, msg, max_elements: int):
    phase = _enum(_PHASE, msg.phase, f"{type(msg).__name__}.phase")
    return cls(msg.layer, msg.group, phase, _field(msg, "tensor", max_elements), msg.start)


def pieces(request: AdapterRequest, dtype: torch.dtype) -> list[AdapterRequest]:
    """`request` cut along its tokens into pieces of at most PIECE_BYTES as `dtype` (at least one
    token each), or left whole when it fits. The device answers each piece as it arrives, so over
    a real link the replies travel while the later pieces are still on their way, where a whole
    request is answered only once its last byte came in: a training step's large exchanges then
    cost each direction's bytes about once, not twice."""
    batch, tokens, width = request.tensor.shape
    step = max(1, PIECE_BYTES // (batch * width * dtype.itemsize))
    if tokens <= step:
        return [request]
    return [dataclasses.replace(request, tensor=request.tensor[:, start : start + step], start=request.start + start)
            for start in range(0, tokens, step)]


def joined(sent: list[AdapterRequest], replies: list) -> AdapterReply:
    """The device's replies to the pieces `sent`, one each in order, checked against their pieces
    and joined into the reply to the whole request. Whether that reply fits the request (its
    width, its dtype) is the compute's check."""
    for piece, reply in zip(sent, replies, strict=True):
        if not isinstance(reply, AdapterReply):
            raise ValidationError(f"expected an AdapterReply, got {type(reply).__name__}")
        if (reply.layer, reply.group, reply.phase, reply.start) != (piece.layer, piece.group, piece.phase, piece.start):
            raise ValidationError(
                f"reply for layer {reply.layer} {quoted(reply.group)} {reply.phase.value} from token {reply.start}, "
                f"expected layer {piece.layer} {piece.group} {piece.phase.value} from token {piece.start}"
            )
        first = replies[0].tensor
        tensor = reply.tensor
        if tensor.dim() != 3 or tensor.shape[:2] != piece.tensor.shape[:2] or (tensor.shape[2], tensor.dtype) != (first.shape[2], first.dtype):
            raise ValidationError(
                f"reply for layer {piece.layer} {piece.group} from token {piece.start}: {tensor.dtype} of shape "
                f"{tuple(tensor.shape)}, expected {first.dtype} of shape {(*piece.tensor.shape[:2], first.shape[-1])}"
            )
    if len(replies) == 1:
        return replies[0]
    whole = torch.cat([reply.tensor for reply in replies], dim=1)
    return AdapterReply(sent[0].layer, sent[0].group, sent[0].phase, whole, sent[0].start)


def device_message(step: int, message) -> pb.DeviceMessage:
    """One device-to-cloud message of the session stream."""
    with _encoding(message):
        match message:
            case OpenSession():
                body = {"open": pb.OpenSession(expected=identity_to_proto(message.expected), max_tokens=message.max_tokens)}
            case ForwardRequest():
                body = {"forward": pb.ForwardRequest(
                    hidden=tensor_to_proto(message.hidden), cache=_CACHE[message.cache], train=message.train,
                    attention_mask=_maybe(message.attention_mask), keep_cached=message.keep_cached,
                    exchange_dtype=_exchange_code(message.exchange_dtype),
                )}
            case BackwardRequest():
                body = {"backward": pb.BackwardRequest(
                    grad_hidden=tensor_to_proto(message.grad_hidden), want_input_grad=message.want_input_grad,
                    exchange_dtype=_exchange_code(message.exchange_dtype),
                )}
            case AdapterReply():
                body = {"reply": _adapter_to_proto(pb.AdapterReply, message)}
            case _:
                raise ValidationError(
                    f"{type(message).__name__} does not go from device to cloud; "
                    "expected OpenSession, ForwardRequest, BackwardRequest or AdapterReply"
                )
        return pb.DeviceMessage(step=step, **body)


def parse_device_message(msg: pb.DeviceMessage, max_elements: int) -> tuple[int, object]:
    """(step, message) from a device-to-cloud message; every tensor holds at most max_elements."""
    kind = msg.WhichOneof("body")
    body = getattr(msg, kind) if kind else None
    if kind == "open":
        return msg.step, OpenSession(_identity(body, "expected"), body.max_tokens)
    if kind == "forward":
        return msg.step, ForwardRequest(
            _field(body, "hidden", max_elements), _enum(_CACHE, body.cache, "ForwardRequest.cache"),
            body.train, _field(body, "attention_mask", max_elements, False),
            body.keep_cached if body.HasField("keep_cached") else None, _exchange_dtype(body),
        )
    if kind == "backward":
        return msg.step, BackwardRequest(_field(body, "grad_hidden", max_elements), body.want_input_grad, _exchange_dtype(body))
    if kind == "reply":
        return msg.step, _adapter_from_proto(AdapterReply, body, max_elements)
    raise ValidationError("empty message: a DeviceMessage must carry open, forward, backward or reply")


def cloud_message(step: int, message) -> pb.CloudMessage:
    """One cloud-to-device message of the session stream."""
    with _encoding(message):
        match message:
            case SessionOpened():
                body = {"opened": pb.SessionOpened(
                    session_id=message.session_id, identity=identity_to_proto(message.identity),
                    max_tokens=message.max_tokens,
                )}
            case AdapterRequest():
                body = {"request": _adapter_to_proto(pb.AdapterRequest, message)}
            case ForwardResult():
                body = {"forward": pb.ForwardResult(hidden=tensor_to_proto(message.hidden))}
            case BackwardResult():
                body = {"backward": pb.BackwardResult(grad_input=_maybe(message.grad_input))}
            case StepError():
                body = {"error": pb.StepError(kind=message.kind, message=message.message, fatal=message.fatal)}
            case _:
                raise ValidationError(
                    f"{type(message).__name__} does not go from cloud to device; expected SessionOpened, "
                    "AdapterRequest, ForwardResult, BackwardResult or StepError"
                )
        return pb.CloudMessage(step=step, **body)


def device_frame(step: int, message) -> bytes:
    """A device-to-cloud message as the bytes of one frame of the session stream."""
    return device_message(step, message).SerializeToString()


def cloud_frame(step: int, message) -> bytes:
    """A cloud-to-device message as the bytes of one frame of the session stream."""
    return cloud_message(step, message).SerializeToString()


def parse_cloud_frame(data: bytes, max_elements: int) -> tuple[int, object]:
    """(step, message) from one frame of the session stream as the cloud sent it."""
    try:
        msg = pb.CloudMessage.FromString(data)
    except DecodeError as err:
        raise ValidationError(f"a {len(data)}-byte frame is not a CloudMessage: {err}") from err
    return parse_cloud_message(msg, max_elements)


def parse_cloud_message(msg: pb.CloudMessage, max_elements: int) -> tuple[int, object]:
    """(step, message) from a cloud-to-device message; every tensor holds at most max_elements."""
    kind = msg.WhichOneof("body")
    body = getattr(msg, kind) if kind else None
    if kind == "opened":
        return msg.step, SessionOpened(body.session_id, _identity(body, "identity"), body.max_tokens)
    if kind == "request":
        return msg.step, _adapter_from_proto(AdapterRequest, body, max_elements)
    if kind == "forward":
        return msg.step, ForwardResult(_field(body, "hidden", max_elements))
    if kind == "backward":
        return msg.step, BackwardResult(_field(body, "grad_input", max_elements, False))
    if kind == "error":
        return msg.step, StepError(body.kind[:MAX_KIND_CHARS], body.message[:MAX_ERROR_CHARS], body.fatal)
    raise ValidationError("empty message: a CloudMessage must carry opened, request, forward, backward or error")
