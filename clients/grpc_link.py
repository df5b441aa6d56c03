"""The split protocol over gRPC: one bidirectional stream per device session.

Transport only: messages are converted by the protocol's wire module and handed to the
same device handler the in-process link uses, so training and generation cannot tell the
two links apart.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from plora.cloud_backbone.protocol import (
    AdapterRequest,
    BackboneIdentity,
    BackwardRequest,
    BackwardResult,
    DeviceHandler,
    ForwardRequest,
    ForwardResult,
    OpenSession,
    SessionOpened,
    SplitLink,
    StepError,
    split_pb2 as pb,
    split_pb2_grpc as pb_grpc,
    wire,
)
from plora.storage import errors
from plora.storage.errors import AuthenticationError, ConfigError, PloraError, TransportError, ValidationError, VersionMismatchError

MAX_MESSAGE_BYTES = 32 << 20
_CLOSE = object()


@dataclass(frozen=True)
class Endpoint:
    """Where the service is and how to reach it."""

    address: str  # host:port
    insecure: bool = False  # plain text: loopback and tests only
    ca_file: str | None = None  # a CA bundle to trust; None = gRPC's bundled public roots

    def channel(self) -> grpc.Channel:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if self.insecure:
            return grpc.insecure_channel(self.address, options=options)
        root = Path(self.ca_file).read_bytes() if self.ca_file else None
        return grpc.secure_channel(self.address, grpc.ssl_channel_credentials(root_certificates=root), options=options)


@dataclass(frozen=True)
class Credentials:
    device_id: str
    token: str

    def metadata(self) -> list[tuple[str, str]]:
        return [(wire.DEVICE_HEADER, self.device_id), ("authorization", f"Bearer {self.token}")]

    def save(self, path: Path) -> None:
        """Owner-only permissions: the token is the device's password."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"device_id": self.device_id, "token": self.token}, fh)

    @classmethod
    def load(cls, path: Path) -> Credentials:
        try:
            data = json.loads(path.read_text())
            return cls(data["device_id"], data["token"])
        except (OSError, KeyError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read device credentials from {path}: {err}") from err


def rpc_error(err: grpc.RpcError) -> PloraError:
    """A plora error for a failed call, keeping the service's message."""
    code, detail = err.code(), err.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(detail)
    if code == grpc.StatusCode.UNAVAILABLE:
        return TransportError(f"the backbone service is unreachable: {detail}")
    return TransportError(f"{code.name}: {detail}")


def _error_from(message: StepError) -> PloraError:
    kind = getattr(errors, message.kind, None)
    if not (isinstance(kind, type) and issubclass(kind, PloraError)):
        kind = TransportError
    return kind(message.message)


class GrpcLink(SplitLink):
    """The split protocol over one gRPC stream.

    Replies are read on the calling thread, straight from the stream: a decode step makes a
    round trip per adapted layer, and every hand-off between threads adds to each. The reply
    timeout is kept by a watchdog thread that cancels the stream when a read overstays."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials, expected: BackboneIdentity, reply_timeout_s: float = 120.0):
        super().__init__()
        self._timeout = reply_timeout_s
        self._channel = endpoint.channel()
        self._outbox: queue.Queue = queue.Queue()
        self._step = 0
        self._broken: PloraError | None = None
        self._deadline: float | None = None  # when the read in progress times out
        self._timed_out = False
        self._closed = threading.Event()
        self.wire_bytes = {"up": 0, "down": 0}  # serialized message bytes, before gRPC/HTTP2 framing
        self.wire_frames = 0
        stub = pb_grpc.SplitBackboneStub(self._channel)
        self._call = stub.Session(iter(self._outbox.get, _CLOSE), metadata=credentials.metadata())
        threading.Thread(target=self._watch, name="plora-link-watchdog", daemon=True).start()
        self._send(OpenSession(expected))
        opened = self._receive()
        if not isinstance(opened, SessionOpened):
            raise ValidationError(f"expected SessionOpened, got {type(opened).__name__}")
        self._identity = opened.identity
        self.session_id = opened.session_id

    @property
    def identity(self) -> BackboneIdentity:
        return self._identity

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self._timeout / 4)):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._timed_out = True
                self._call.cancel()

    def _send(self, message) -> None:
        frame = wire.device_message(self._step, message)
        self.wire_bytes["up"] += frame.ByteSize()
        self.wire_frames += 1
        self._outbox.put(frame)

    def _next_frame(self) -> pb.CloudMessage:
        self._deadline = time.monotonic() + self._timeout
        try:
            return next(self._call)
        except StopIteration:
            raise TransportError("the service ended the session") from None
        except grpc.RpcError as err:
            if self._timed_out:
                raise TransportError(f"no answer from the backbone service within {self._timeout:g} s") from None
            raise rpc_error(err) from None
        finally:
            self._deadline = None

    def _receive(self):
        if self._broken:
            raise self._broken
        try:
            frame = self._next_frame()
        except PloraError as err:
            self._break(err)
        self.wire_bytes["down"] += frame.ByteSize()
        self.wire_frames += 1
        _, message = wire.parse_cloud_message(frame, MAX_MESSAGE_BYTES // 2)  # elements: 2 bytes at the least
        if isinstance(message, StepError):
            err = _error_from(message)
            if message.fatal:
                self._break(err)
            raise err
        return message

    def _break(self, err: PloraError):
        self._broken = TransportError(f"the session is over: {err}")
        self.close()
        raise err

    def _step_through(self, request, handler: DeviceHandler, final: type):
        if self._broken:
            raise self._broken
        self._step += 1
        self._record("up", request)
        self._send(request)
        answer = self._recorded(handler)
        while True:
            message = self._receive()
            if isinstance(message, AdapterRequest):
                try:
                    reply = answer(message)
                except BaseException as err:
                    # The service waits mid-step for this reply; the session cannot go on.
                    self._broken = TransportError(f"the session ended in a failed step: {err}")
                    self.close()
                    raise
                self._send(reply)
            elif isinstance(message, final):
                self._record("down", message)
                return message
            else:
                raise ValidationError(f"unexpected {type(message).__name__} from the service during a step")

    def forward(self, request: ForwardRequest, handler: DeviceHandler) -> ForwardResult:
        return self._step_through(request, handler, ForwardResult)

    def backward(self, request: BackwardRequest, handler: DeviceHandler) -> BackwardResult:
        return self._step_through(request, handler, BackwardResult)

    def close(self) -> None:
        self._closed.set()
        self._outbox.put(_CLOSE)
        self._call.cancel()
        self._channel.close()


def register(endpoint: Endpoint, backbone: str = "", label: str = "") -> tuple[Credentials, pb.HostedBackbone]:
    with endpoint.channel() as channel:
        try:
            reply = pb_grpc.SplitBackboneStub(channel).Register(pb.RegisterRequest(backbone=backbone, label=label), timeout=30)
        except grpc.RpcError as err:
            raise rpc_error(err) from err
    return Credentials(reply.device_id, reply.token), reply.backbone


def describe(endpoint: Endpoint, version: str) -> pb.HostedBackbone:
    """What the service announces of a version it hosts: its identity and its bundle's hash."""
    with endpoint.channel() as channel:
        try:
            reply = pb_grpc.SplitBackboneStub(channel).Describe(pb.DescribeRequest(), timeout=30)
        except grpc.RpcError as err:
            raise rpc_error(err) from err
    hosted = {wire.identity_from_proto(b.identity).version: b for b in reply.backbones}
    if version not in hosted:
        raise VersionMismatchError(f"the service at {endpoint.address} does not host {version!r}; it hosts {sorted(hosted)}")
    return hosted[version]


def download_bundle(endpoint: Endpoint, credentials: Credentials, hosted: pb.HostedBackbone, folder: Path) -> None:
    """Fetch the device bundle and keep it only if its hash is the one the service announced."""
    identity = wire.identity_from_proto(hosted.identity)
    with endpoint.channel() as channel:
        stub = pb_grpc.SplitBackboneStub(channel)
        try:
            chunks = stub.DownloadBundle(pb.BundleRequest(backbone=identity.version), metadata=credentials.metadata(), timeout=600)
            wire.receive_bundle(chunks, folder, hosted.bundle.sha256, max_bytes=hosted.bundle.size)
        except grpc.RpcError as err:
            raise rpc_error(err) from err
