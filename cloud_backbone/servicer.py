"""The gRPC face of the backbone service: parse, check credentials, delegate, map errors.

The service runs on gRPC's asyncio API. Each device session is one bidirectional stream,
served by a coroutine on the event loop that reads and writes the stream itself. A step's
compute runs on a worker thread; inside it the cloud asks the device for u·M layer by layer,
and each ask is one coroutine on the loop: write the request, read the reply. A round trip
thus costs two hand-offs between the worker and the loop, which matters because a decode
step makes one per adapted layer. Every wait on the device is bounded by the reply timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor

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
from plora.cloud_backbone.service import BackboneService, HostedVersion, ServiceSession
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


class _Ended(TransportError):
    """The device closed its stream or went away. A TransportError, so that in a batch it
    fails that device's row only."""


class DeviceAsker:
    """The device handler a session's compute calls from its worker thread.

    Calling it blocks until the reply; `submit` returns at once with a future, so a batch
    of sessions can have all its requests in flight together (see batching.py)."""

    def __init__(self, stream: SessionStream, step: int):
        self._stream, self._step = stream, step

    def submit(self, request: AdapterRequest) -> Future:
        return asyncio.run_coroutine_threadsafe(self._stream.exchange(self._step, request), self._stream.loop)

    def __call__(self, request: AdapterRequest) -> AdapterReply:
        return self.submit(request).result()


class SessionStream:
    """One device's session stream, read and written only by coroutines on the loop."""

    def __init__(self, service: BackboneService, metrics: Metrics, workers: ThreadPoolExecutor, device_id: str, context):
        self.service, self.metrics, self.workers, self.device_id = service, metrics, workers, device_id
        self.context = context
        self.loop = asyncio.get_running_loop()
        self._bytes_in, self._bytes_out = metrics.wire_bytes.labels("in"), metrics.wire_bytes.labels("out")
        self._serving: asyncio.Task | None = None  # while the session is open: the task serving it
        self._ended_for: str | None = None  # why the service ended the session, if it did

    async def _read(self, timeout: float, waiting_for: str):
        try:
            frame = await asyncio.wait_for(self.context.read(), timeout)
        except asyncio.TimeoutError:
            raise TransportError(f"no {waiting_for} from the device within {timeout:g} s; session closed") from None
        except (asyncio.CancelledError, grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as err:
            # The stream is over (cancelled, broken, or the server is stopping). Raised in an
            # exchange, this reaches the worker as an error of this session, not of the batch.
            raise _Ended(f"the device's stream ended: {type(err).__name__}") from None
        if frame is grpc.aio.EOF:
            raise _Ended("the device closed its stream")
        self._bytes_in.inc(frame.ByteSize())
        return wire.parse_device_message(frame, self.service.limits.max_tensor_elements)

    async def _write(self, step: int, message) -> None:
        frame = wire.cloud_message(step, message)
        self._bytes_out.inc(frame.ByteSize())
        await self.context.write(frame)

    async def exchange(self, step: int, request: AdapterRequest) -> AdapterReply:
        """One round trip: u down to the device, its reply back."""
        started = time.perf_counter()
        await self._write(step, request)
        got_step, reply = await self._read(self.service.limits.reply_timeout_s, f"reply for layer {request.layer}")
        if got_step != step:
            raise ValidationError(f"reply belongs to step {got_step}, expected step {step}")
        self.metrics.round_trip.labels(str(request.layer)).observe(time.perf_counter() - started)
        return reply

    async def serve(self) -> None:
        session = None
        try:
            step, opening = await self._read(self.service.limits.reply_timeout_s, "OpenSession")
            if not isinstance(opening, OpenSession):
                raise SessionError(f"a session starts with OpenSession, got {type(opening).__name__}")
            # open_session reads the registry: keep the database off the loop.
            session = await asyncio.to_thread(self.service.open_session, self.device_id, opening)
            self._serving, session.on_end = asyncio.current_task(), self.end
            self.metrics.active_sessions.inc()
            await self._write(step, SessionOpened(session.session_id, session.version.identity, session.cloud.max_tokens))
            while True:
                try:
                    step, message = await self._read(self.service.limits.idle_timeout_s, "step")
                    await self._serve_step(session, step, message)
                except (ValidationError, SessionError, CapacityError) as err:
                    # The step failed; the session, and every other session, goes on.
                    self.metrics.step_errors.labels(type(err).__name__).inc()
                    await self._write(step, StepError(type(err).__name__, str(err)))
        except _Ended:
            pass
        except PloraError as err:
            self.metrics.step_errors.labels(type(err).__name__).inc()
            await self._write(0, StepError(type(err).__name__, str(err), fatal=True))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            if self._ended_for is None:
                raise  # the device went away or the server is stopping: nobody is left to tell
        except Exception as err:  # a bug: fail this session only, and keep the trace in the log
            log.exception("session of device %s failed", self.device_id)
            self.metrics.step_errors.labels("InternalError").inc()
            await self._write(0, StepError("InternalError", f"{type(err).__name__} in the service", fatal=True))
        finally:
            self._serving = None
            if session is not None:
                self.service.close_session(session)
                self.metrics.active_sessions.dec()
        if self._ended_for is not None:
            asyncio.current_task().uncancel()  # the cancel was end()'s, and ends here
            await self.context.abort(grpc.StatusCode.UNAUTHENTICATED, f"AuthenticationError: {self._ended_for}")

    def end(self, reason: str) -> None:
        """End the session from any thread, telling the device `reason` with UNAUTHENTICATED:
        its device was revoked or forgotten. A step in flight finishes first."""
        self.loop.call_soon_threadsafe(self._end, reason)

    def _end(self, reason: str) -> None:
        if self._serving is not None and self._ended_for is None:
            self._ended_for = reason
            self._serving.cancel()

    async def _serve_step(self, session: ServiceSession, step: int, message) -> None:
        ask = DeviceAsker(self, step)
        if isinstance(message, ForwardRequest):
            compute = session.cloud.forward
        elif isinstance(message, BackwardRequest):
            compute = session.cloud.backward
        else:
            raise SessionError(f"expected ForwardRequest or BackwardRequest, got {type(message).__name__}")
        worker = self.loop.run_in_executor(self.workers, compute, message, ask)
        try:
            result = await asyncio.shield(worker)
        except asyncio.CancelledError:
            # The stream is gone: its pending read fails, so the worker's ask fails and it ends
            # soon. Wait for it, so the session is not closed under a running step.
            await asyncio.wait([worker], timeout=self.service.limits.reply_timeout_s)
            raise
        if isinstance(message, ForwardRequest):
            self.metrics.tokens.labels("train" if message.train else "forward").inc(message.hidden.shape[0] * message.hidden.shape[1])
        await self._write(step, result)


class SplitBackboneServicer(pb_grpc.SplitBackboneServicer):
    def __init__(self, service: BackboneService, metrics: Metrics):
        self.service = service
        self.metrics = metrics
        # One worker per session the service admits, so a step never waits for a free thread.
        self.workers = ThreadPoolExecutor(max_workers=service.limits.max_sessions, thread_name_prefix="plora-step")

    def close(self) -> None:
        """End the worker threads. Once the server has stopped, none has a step left to run."""
        self.workers.shutdown(cancel_futures=True)

    async def _authenticate(self, context, allow_revoked: bool = False) -> str:
        metadata = dict(context.invocation_metadata())
        device_id = metadata.get(wire.DEVICE_HEADER, "")
        token = metadata.get("authorization", "").removeprefix("Bearer ")
        await asyncio.to_thread(self.service.authenticate, device_id, token, allow_revoked)
        return device_id

    @staticmethod
    async def _abort(context, err: PloraError):
        await context.abort(status_for(err), f"{type(err).__name__}: {err}")

    async def Register(self, request, context):
        try:
            device_id, token, version = await asyncio.to_thread(
                self.service.register_device, request.backbone, request.label, request.enroll_token
            )
            described = await asyncio.to_thread(self._describe, version)
        except PloraError as err:
            await self._abort(context, err)
        return pb.RegisterReply(device_id=device_id, token=token, backbone=described)

    async def ForgetDevice(self, request, context):
        try:
            # A revoked device may still have itself forgotten.
            device_id = await self._authenticate(context, allow_revoked=True)
            removed = await asyncio.to_thread(self.service.forget_device, device_id)
        except PloraError as err:
            await self._abort(context, err)
        return pb.ForgetReply(removed=removed)

    async def Describe(self, request, context):
        described = await asyncio.to_thread(lambda: [self._describe(v) for v in self.service.versions.values()])
        return pb.DescribeReply(backbones=described)

    def _describe(self, version: HostedVersion) -> pb.HostedBackbone:
        try:
            default = self.service.hosted()
        except PloraError:
            default = None  # every hosted version is deprecated or retired
        return _hosted_proto(version, version is default)

    async def DownloadBundle(self, request, context) -> AsyncIterator[pb.BundleChunk]:
        try:
            await self._authenticate(context)
            version = await asyncio.to_thread(self.service.hosted, request.backbone)
        except PloraError as err:
            await self._abort(context, err)
        for chunk in wire.chunked_bundle(version.bundle, BUNDLE_CHUNK):
            yield chunk

    async def Session(self, request_iterator, context):
        try:
            device_id = await self._authenticate(context)
        except PloraError as err:
            await self._abort(context, err)
        await SessionStream(self.service, self.metrics, self.workers, device_id, context).serve()
