"""The gRPC face of the backbone service: parse, check credentials, delegate, map errors.

Each device session is one bidirectional stream. Inside a step the cloud's compute asks the
device for u·M layer by layer, so the compute runs on a worker thread of its own while the
stream's generator passes its outgoing messages on; a reader thread turns incoming frames
into protocol messages. Every wait on the device is bounded by the reply timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc

from plora.cloud_backbone.metrics import Metrics
from plora.cloud_backbone.protocol import (
    AdapterReply,
    AdapterRequest,
    BackwardRequest,
    ForwardRequest,
    OpenSession,
    SessionOpened,
    StepError,
    split_pb2 as pb,
    split_pb2_grpc as pb_grpc,
    wire,
)
from plora.cloud_backbone.service import BackboneService, HostedVersion
from plora.storage.errors import (
    AuthenticationError,
    CapacityError,
    ConfigError,
    PloraError,
    RegistryError,
    SessionError,
    TransportError,
    ValidationError,
    VersionMismatchError,
)

log = logging.getLogger(__name__)

STATUS = {
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    VersionMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ValidationError: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    SessionError: grpc.StatusCode.FAILED_PRECONDITION,
    RegistryError: grpc.StatusCode.NOT_FOUND,
    TransportError: grpc.StatusCode.UNAVAILABLE,
}
BUNDLE_CHUNK = 1 << 20


def status_for(err: PloraError) -> grpc.StatusCode:
    for kind in type(err).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return grpc.StatusCode.INTERNAL


def _hosted_proto(version: HostedVersion, is_default: bool) -> pb.HostedBackbone:
    return pb.HostedBackbone(
        identity=wire.identity_to_proto(version.identity),
        bundle=pb.BundleInfo(sha256=version.bundle_sha256, size=version.bundle_size),
        is_default=is_default,
    )


class _Ended(Exception):
    """The device closed its stream or went away."""


_END = object()


class SessionStream:
    """One device's session stream: a worker thread runs the steps, a reader thread parses."""

    def __init__(self, service: BackboneService, metrics: Metrics, device_id: str, requests, context):
        self.service, self.metrics, self.device_id = service, metrics, device_id
        self._requests = requests
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        context.add_callback(lambda: self._inbox.put(_END))  # cancelled or disconnected
        threading.Thread(target=self._read, name="plora-read", daemon=True).start()
        threading.Thread(target=self._run, name="plora-step", daemon=True).start()

    def responses(self) -> Iterator[pb.CloudMessage]:
        while (item := self._outbox.get()) is not _END:
            self.metrics.wire_bytes.labels("out").inc(item.ByteSize())
            yield item

    def _read(self) -> None:
        try:
            for frame in self._requests:
                self.metrics.wire_bytes.labels("in").inc(frame.ByteSize())
                try:
                    self._inbox.put(wire.parse_device_message(frame, self.service.limits.max_tensor_elements))
                except ValidationError as err:
                    self._inbox.put(err)  # the worker reports it; the stream goes on
        except grpc.RpcError:
            pass  # the device went away; the END below tells the worker
        finally:
            self._inbox.put(_END)

    def _next(self, timeout: float, waiting_for: str):
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TransportError(f"no {waiting_for} from the device within {timeout:g} s; session closed") from None
        if item is _END:
            raise _Ended
        if isinstance(item, Exception):
            raise item
        return item

    def _send(self, step: int, message) -> None:
        self._outbox.put(wire.cloud_message(step, message))

    def _run(self) -> None:
        session = None
        try:
            step, opening = self._next(self.service.limits.reply_timeout_s, "OpenSession")
            if not isinstance(opening, OpenSession):
                raise SessionError(f"a session starts with OpenSession, got {type(opening).__name__}")
            session = self.service.open_session(self.device_id, opening)
            self.metrics.active_sessions.inc()
            self._send(step, SessionOpened(session.session_id, session.version.identity, session.cloud.max_tokens))
            while True:
                try:
                    step, message = self._next(self.service.limits.idle_timeout_s, "step")
                    self._serve_step(session, step, message)
                except (ValidationError, SessionError, CapacityError) as err:
                    # The step failed; the session, and every other session, goes on.
                    self.metrics.step_errors.labels(type(err).__name__).inc()
                    self._send(step, StepError(type(err).__name__, str(err)))
        except _Ended:
            pass
        except PloraError as err:
            self.metrics.step_errors.labels(type(err).__name__).inc()
            self._send(0, StepError(type(err).__name__, str(err), fatal=True))
        except Exception as err:  # a bug: fail this session only, and keep the trace in the log
            log.exception("session of device %s failed", self.device_id)
            self.metrics.step_errors.labels("InternalError").inc()
            self._send(0, StepError("InternalError", f"{type(err).__name__} in the service", fatal=True))
        finally:
            if session is not None:
                self.service.close_session(session)
                self.metrics.active_sessions.dec()
            self._outbox.put(_END)

    def _serve_step(self, session, step: int, message) -> None:
        ask = self._asker(step)
        if isinstance(message, ForwardRequest):
            result = session.cloud.forward(message, ask)
            self.metrics.tokens.labels("train" if message.train else "forward").inc(message.hidden.shape[0] * message.hidden.shape[1])
        elif isinstance(message, BackwardRequest):
            result = session.cloud.backward(message, ask)
        else:
            raise SessionError(f"expected ForwardRequest or BackwardRequest, got {type(message).__name__}")
        self._send(step, result)

    def _asker(self, step: int):
        def ask(request: AdapterRequest) -> AdapterReply:
            started = time.perf_counter()
            self._send(step, request)
            got_step, reply = self._next(self.service.limits.reply_timeout_s, f"reply for layer {request.layer}")
            if got_step != step:
                raise ValidationError(f"reply belongs to step {got_step}, expected step {step}")
            self.metrics.round_trip.labels(str(request.layer)).observe(time.perf_counter() - started)
            return reply

        return ask


class SplitBackboneServicer(pb_grpc.SplitBackboneServicer):
    def __init__(self, service: BackboneService, metrics: Metrics):
        self.service = service
        self.metrics = metrics

    def _authenticate(self, context) -> str:
        metadata = dict(context.invocation_metadata())
        device_id = metadata.get(wire.DEVICE_HEADER, "")
        token = metadata.get("authorization", "").removeprefix("Bearer ")
        self.service.authenticate(device_id, token)
        return device_id

    @staticmethod
    def _abort(context, err: PloraError):
        context.abort(status_for(err), f"{type(err).__name__}: {err}")

    def Register(self, request, context):
        try:
            device_id, token, version = self.service.register_device(request.backbone, request.label)
        except PloraError as err:
            self._abort(context, err)
        return pb.RegisterReply(device_id=device_id, token=token, backbone=self._describe(version))

    def Describe(self, request, context):
        return pb.DescribeReply(backbones=[self._describe(v) for v in self.service.versions.values()])

    def _describe(self, version: HostedVersion) -> pb.HostedBackbone:
        try:
            default = self.service.hosted()
        except PloraError:
            default = None  # every hosted version is deprecated or retired
        return _hosted_proto(version, version is default)

    def DownloadBundle(self, request, context):
        try:
            self._authenticate(context)
            version = self.service.hosted(request.backbone)
        except PloraError as err:
            self._abort(context, err)
        yield from wire.chunked_bundle(version.bundle, BUNDLE_CHUNK)

    def Session(self, request_iterator, context):
        try:
            device_id = self._authenticate(context)
        except PloraError as err:
            self._abort(context, err)
        return SessionStream(self.service, self.metrics, device_id, request_iterator, context).responses()
