"""The gRPC face of the backbone service: parse, check credentials, delegate, map errors.

The service runs on gRPC's asyncio API. Each device session is one bidirectional stream,
served by a coroutine on the event loop that reads and writes the stream itself. A step's
compute runs on a worker thread; inside it the cloud asks the device for u·M layer by layer,
and each ask is one coroutine on the loop: write the request, read the reply. A round trip
thus costs two hand-offs between the worker and the loop, which matters because a decode
step makes one per adapted layer.

Every device is hostile until its bytes are checked, and whatever one does ends at its own
session: an undecodable frame is a ValidationError of that step, a broken stream ends that
session only, every wait on a device (its first frame, each reply, each write) has a deadline,
and each kind of call has its own concurrency budget, so that a flood of one kind (streams
that never open, registrations, downloads) cannot starve the others.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import torch
from google.protobuf import message_factory

from plora.cloud_backbone.metrics import Metrics
from plora.cloud_backbone.protocol import bundle, split_pb2 as pb, split_pb2_grpc as pb_grpc, wire
from plora.cloud_backbone.protocol.messages import (
    AdapterReply,
    AdapterRequest,
    BackwardRequest,
    ForwardRequest,
    HostedBackbone,
    OpenSession,
    SessionOpened,
    StepError,
)
from plora.cloud_backbone.recording import SessionCapture
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
    quoted,
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


@dataclass(frozen=True)
class Undecodable:
    """A request protobuf could not parse. The servicer's lenient deserializers return it
    instead of raising, so that the handler answers INVALID_ARGUMENT (or a step error) where
    gRPC would answer UNKNOWN and log a traceback."""

    expected: str


def _lenient(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception:  # DecodeError, or anything else a hostile frame provokes
            return Undecodable(message_class.__name__)

    return parse


def add_to_server(servicer: SplitBackboneServicer, server) -> None:
    """Register every method of split.proto's service with lenient deserializers."""
    service = pb.DESCRIPTOR.services_by_name["SplitBackbone"]
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        reply = message_factory.GetMessageClass(method.output_type)
        make = kinds[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=_lenient(request),
                                     response_serializer=reply.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def kind_of(err: PloraError) -> str:
    """The plora exception class a device is told of: the service's private refinements of
    one (a stream that ended, a deadline) go by the public class they refine."""
    return next(k.__name__ for k in type(err).__mro__ if k.__module__ == PloraError.__module__)


def status_for(err: PloraError) -> grpc.StatusCode:
    for kind in type(err).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return grpc.StatusCode.INTERNAL


def _hosted_proto(version: HostedVersion, is_default: bool) -> pb.HostedBackbone:
    return wire.hosted_to_proto(HostedBackbone(version.identity, version.bundle_sha256, version.bundle_size, is_default))


class _Ended(TransportError):
    """The device closed its stream or went away. A TransportError, so that in a batch it
    fails that device's row only."""


class _Deadline(TransportError):
    """The device sent nothing in time. The session is over (a frame may still come, out of
    step), and the device is told why, if it still listens."""


class DeviceAsker:
    """The device handler a session's compute calls from its worker thread.

    Calling it blocks until the reply; `submit` returns at once with a future, so a batch
    of sessions can have all its requests in flight together (see batching.py)."""

    def __init__(self, stream: SessionStream, step: int, exchange_dtype: torch.dtype):
        self._stream, self._step, self._dtype = stream, step, exchange_dtype
        self.sent: list[Future] = []

    def submit(self, request: AdapterRequest) -> Future:
        future = asyncio.run_coroutine_threadsafe(self._stream.exchange(self._step, request, self._dtype), self._stream.loop)
        self.sent.append(future)
        return future

    def __call__(self, request: AdapterRequest) -> AdapterReply:
        return self.submit(request).result()


class SessionStream:
    """One device's session stream, read and written only by coroutines on the loop."""

    def __init__(self, service: BackboneService, metrics: Metrics, workers: ThreadPoolExecutor, failed_steps: FailedSteps,
                 device_id: str, context):
        self.service, self.metrics, self.workers, self.device_id = service, metrics, workers, device_id
        self.failed_steps = failed_steps
        self.limits = service.limits
        self.context = context
        self.loop = asyncio.get_running_loop()
        self._bytes_in, self._bytes_out = metrics.wire_bytes.labels("in"), metrics.wire_bytes.labels("out")
        self._serving: asyncio.Task | None = None  # while the session is open: the task serving it
        self._ended_for: str | None = None  # why the service ended the session, if it did
        self._warned = False  # one log line per session for malformed input, never a flood
        self._capture: SessionCapture | None = None  # set while the service records this session
        # Adapter requests written and replies read: the reply to request n is the n-th read.
        self._asked = self._answered = 0
        self._writing, self._replies = asyncio.Lock(), asyncio.Condition()

    async def _read(self, timeout: float, waiting_for: str):
        try:
            async with asyncio.timeout(timeout):
                frame = await self.context.read()
        except TimeoutError:
            raise _Deadline(f"no {waiting_for} from the device within {timeout:g} s; session closed") from None
        except (asyncio.CancelledError, Exception) as err:
            # The stream is over (cancelled, broken, or the server is stopping). Raised in an
            # exchange, this reaches the worker as an error of this session, not of the batch.
            raise _Ended(f"the device's stream ended: {type(err).__name__}") from None
        if frame is grpc.aio.EOF:
            raise _Ended("the device closed its stream")
        if isinstance(frame, Undecodable):
            raise ValidationError(f"a frame that is not a DeviceMessage (while waiting for {waiting_for})")
        self._bytes_in.inc(frame.ByteSize())
        try:
            step, message = wire.parse_device_message(frame, self.limits.max_tensor_elements)
        except PloraError:
            raise
        except Exception as err:  # the parser must not let a foreign error out, whatever the frame
            raise ValidationError(f"malformed DeviceMessage: {type(err).__name__}") from None
        if self._capture is not None:
            self._capture("up", message)
        return step, message

    async def _write(self, step: int, message) -> None:
        frame = wire.cloud_message(step, message)
        self._bytes_out.inc(frame.ByteSize())
        if self._capture is not None:
            self._capture("down", message)
        try:
            async with asyncio.timeout(self.limits.write_timeout_s):
                await self.context.write(frame)
        except TimeoutError:
            raise _Ended(f"the device read nothing for {self.limits.write_timeout_s:g} s; session closed") from None
        except (asyncio.CancelledError, Exception) as err:
            raise _Ended(f"cannot write to the device: {type(err).__name__}") from None

    async def exchange(self, step: int, request: AdapterRequest, dtype: torch.dtype) -> AdapterReply:
        """One round trip: u down to the device, its reply back, both in the step's wire dtype,
        a large one in pieces (wire.pieces). Fails only with a PloraError. A step may have
        several in flight (a pipelined prefill): the device answers in the order it was asked,
        so each frame written takes the reply of its turn."""
        started = time.perf_counter()
        sent = wire.pieces(request, dtype)
        async with self._writing:
            first = self._asked
            for piece in sent:
                await self._write(step, wire.to_wire_dtype(piece, dtype))
                self._asked += 1
        replies = await self._replies_to(step, range(first, first + len(sent)), request.layer, dtype)
        self.metrics.round_trip.labels(str(request.layer)).observe(time.perf_counter() - started)
        return wire.joined(sent, replies)

    async def _replies_to(self, step: int, turns: range, layer: int, dtype: torch.dtype) -> list:
        """The replies of `turns`, in order. A malformed reply spends its turn like any other, so
        that the stream stays in step, and the first one's error is raised once all are read."""
        replies, error = [], None
        async with self._replies:
            try:
                for turn in turns:
                    await self._replies.wait_for(lambda: self._answered == turn)
                    try:
                        got_step, reply = await self._read(self.limits.reply_timeout_s, f"reply for layer {layer}")
                        if got_step != step:
                            raise ValidationError(f"reply belongs to step {got_step}, expected step {step}")
                        replies.append(wire.from_wire_dtype(reply, dtype))
                    except ValidationError as err:
                        error = error or err
                    finally:
                        self._answered += 1
                        self._replies.notify_all()
            finally:
                # A stream that broke mid-way: the exchanges after this one take their turns,
                # and fail reading it as this one did.
                self._answered = max(self._answered, turns.stop)
                self._replies.notify_all()
        if error is not None:
            raise error
        return replies

    def _note(self, err: PloraError) -> None:
        self.metrics.step_errors.labels(kind_of(err)).inc()
        if not self._warned and isinstance(err, ValidationError):
            self._warned = True
            log.warning("device %s sent malformed input (further cases of this session are not logged): %s",
                        quoted(self.device_id), quoted(str(err), 300))

    async def serve(self) -> None:
        session = None
        try:
            step, opening = await self._read(self.limits.first_frame_timeout_s, "OpenSession")
            if not isinstance(opening, OpenSession):
                raise SessionError(f"a session starts with OpenSession, got {type(opening).__name__}")
            # open_session reads the registry: keep the database off the loop.
            session = await asyncio.to_thread(self.service.open_session, self.device_id, opening)
            self._serving, session.on_end = asyncio.current_task(), self.end
            if self.service.recording is not None:
                self._capture = await asyncio.to_thread(
                    self.service.recording.session, self.device_id, session.session_id, session.version.identity.version
                )
            self.metrics.active_sessions.inc()
            await self._write(step, SessionOpened(session.session_id, session.version.identity, session.cloud.max_tokens))
            while True:
                try:
                    try:
                        step, message = await self._read(self.limits.idle_timeout_s, "step")
                    except _Deadline:
                        return  # idle: the session ends quietly, and the device opens a new one on its next step
                    await self.failed_steps.refuse_spent(self.device_id)
                    await self._serve_step(session, step, message)
                except (_Ended, _Deadline):
                    raise
                except (ValidationError, SessionError, CapacityError, TransportError) as err:
                    # The step failed and the session's state is as before it; the session, and
                    # every other session, goes on.
                    if isinstance(err, (ValidationError, SessionError)):
                        self.failed_steps.failed(self.device_id)
                    self._note(err)
                    await self._write(step, StepError(kind_of(err), str(err)[:wire.MAX_ERROR_CHARS]))
        except _Ended:
            pass
        except PloraError as err:
            self._note(err)
            try:
                await self._write(0, StepError(kind_of(err), str(err)[:wire.MAX_ERROR_CHARS], fatal=True))
            except _Ended:
                pass
        except (asyncio.CancelledError, grpc.aio.AbortError):
            if self._ended_for is None:
                raise  # the device went away or the server is stopping: nobody is left to tell
        except Exception as err:  # a bug: fail this session only, and keep the trace in the log
            log.exception("session of device %s failed", quoted(self.device_id))
            self.metrics.step_errors.labels("InternalError").inc()
            try:
                await self._write(0, StepError("InternalError", f"{type(err).__name__} in the service", fatal=True))
            except _Ended:
                pass
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
        dtypes = wire.step_dtypes(message)
        message = wire.from_wire_dtype(message, dtypes.cut)
        ask = DeviceAsker(self, step, dtypes.exchanges)
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
            await asyncio.wait([worker], timeout=self.limits.reply_timeout_s)
            if worker.done() and not worker.cancelled():
                worker.exception()  # retrieved: nobody is left to tell
            raise
        finally:
            await self._settle(ask)
        if isinstance(message, ForwardRequest):
            self.metrics.tokens.labels("train" if message.train else "forward").inc(message.hidden.shape[0] * message.hidden.shape[1])
        await self._write(step, wire.to_wire_dtype(result, dtypes.cut))

    async def _settle(self, ask: DeviceAsker) -> None:
        """Wait for the exchanges a step left behind (a row taken out of its batch while its
        reply was still on the way), so that the next read of the stream is the next step's."""
        left = [asyncio.wrap_future(f) for f in ask.sent if not f.done()]
        for future in left:  # retrieved whenever they end, even after this wait gave up on them
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        if left:
            await asyncio.wait(left, timeout=self.limits.reply_timeout_s)
            for future in left:
                if not future.done():
                    raise _Deadline("a reply the session owed never came")
                future.exception()  # retrieved: its error was the step's, already reported


class _Slots:
    """At most `limit` calls of one kind at once; one more is refused at once, never queued.
    Used on the event loop only, so it needs no lock."""

    def __init__(self, kind: str, limit: int):
        self.kind, self.limit, self.used = kind, limit, 0

    @contextmanager
    def taken(self):
        if self.used >= self.limit:
            raise CapacityError(f"the service already runs its limit of {self.limit} {self.kind}; retry later")
        self.used += 1
        try:
            yield
        finally:
            self.used -= 1


class FailedSteps:
    """What a device's own faults cost it: an allowance of failed steps per device, refilled
    evenly over a minute. A step fails by the device's fault when it sends malformed input or a
    message out of protocol, which an honest device never does. Once its allowance is spent,
    its steps are refused before they reach the compute or a batch, so that a hostile device
    cannot keep intruding on the passes of others (steps already under way when it runs out,
    one per session at most, still end as they end); and each refusal is held until the
    allowance has refilled by a step, so that its session reads no frame meanwhile and a device
    cannot make the service answer refusals as fast as it sends (HTTP/2 flow control holds its
    further frames unread). Used on the event loop only."""

    def __init__(self, per_minute: int, clock=time.monotonic, sleep=asyncio.sleep):
        self.per_minute, self.clock, self.sleep = per_minute, clock, sleep
        self._left: dict[str, tuple[float, float]] = {}  # device id -> (allowance left, when), while not full

    def _allowance(self, device_id: str) -> float:
        left, when = self._left.get(device_id, (self.per_minute, 0.0))
        return min(self.per_minute, left + (self.clock() - when) * self.per_minute / 60)

    async def refuse_spent(self, device_id: str) -> None:
        """Raises CapacityError, once the allowance holds a step again, if the device had none left."""
        if not self.per_minute or device_id not in self._left:
            return
        left = self._allowance(device_id)
        if left >= self.per_minute:
            del self._left[device_id]  # full again: nothing to remember
        elif left < 1:
            held = (1 - left) * 60 / self.per_minute
            await self.sleep(held)
            raise CapacityError(
                f"this device's steps failed {self.per_minute} times within a minute (malformed input or steps out of "
                f"protocol); this step was refused unrun, after {held:.1f} s"
            )

    def failed(self, device_id: str) -> None:
        if self.per_minute:
            self._left[device_id] = (max(0.0, self._allowance(device_id) - 1), self.clock())

    def forget(self, device_id: str) -> None:
        self._left.pop(device_id, None)


class SplitBackboneServicer(pb_grpc.SplitBackboneServicer):
    def __init__(self, service: BackboneService, metrics: Metrics):
        self.service = service
        self.metrics = metrics
        limits = service.limits
        # One worker per session the service admits, so a step never waits for a free thread.
        self.workers = ThreadPoolExecutor(max_workers=limits.max_sessions, thread_name_prefix="plora-step")
        self.sessions = _Slots("sessions (open or opening)", limits.max_sessions)
        self.downloads = _Slots("bundle downloads", limits.max_bundle_downloads)
        self.registrations = _Slots("registrations", limits.max_unary_calls)
        self.descriptions = _Slots("Describe calls", limits.max_unary_calls)
        self.authentications = _Slots("authentications", limits.max_unary_calls)
        self.forgets = _Slots("ForgetDevice calls", limits.max_unary_calls)
        self.job_reports = _Slots("ReportJobs calls", limits.max_unary_calls)
        self._streams_of: collections.Counter[str] = collections.Counter()  # device id -> streams, open or opening
        self.failed_steps = FailedSteps(limits.failed_steps_per_minute)

    def close(self) -> None:
        """End the worker threads. Once the server has stopped, none has a step left to run."""
        self.workers.shutdown(cancel_futures=True)

    async def _authenticate(self, context, allow_revoked: bool = False) -> str:
        metadata = dict(context.invocation_metadata())
        device_id = metadata.get(wire.DEVICE_HEADER, "")
        token = metadata.get("authorization", "").removeprefix("Bearer ")
        with self.authentications.taken():
            await asyncio.to_thread(self.service.authenticate, device_id, token, allow_revoked)
        return device_id

    @staticmethod
    async def _abort(context, err: PloraError):
        await context.abort(status_for(err), f"{kind_of(err)}: {str(err)[:wire.MAX_ERROR_CHARS]}")

    @staticmethod
    def _parsed(request):
        if isinstance(request, Undecodable):
            raise ValidationError(f"the request is not a {request.expected}")
        return request

    async def Register(self, request, context):
        try:
            request = self._parsed(request)
            with self.registrations.taken():
                device_id, token, version = await asyncio.to_thread(
                    self.service.register_device, request.backbone, request.label, request.enroll_token
                )
                described = await asyncio.to_thread(self._describe, version)
        except PloraError as err:
            await self._abort(context, err)
        return pb.RegisterReply(device_id=device_id, token=token, backbone=described)

    async def ForgetDevice(self, request, context):
        try:
            self._parsed(request)
            with self.forgets.taken():
                # A revoked device may still have itself forgotten.
                device_id = await self._authenticate(context, allow_revoked=True)
                removed = await asyncio.to_thread(self.service.forget_device, device_id)
                self.failed_steps.forget(device_id)
        except PloraError as err:
            await self._abort(context, err)
        return pb.ForgetReply(removed=removed)

    async def ReportJobs(self, request, context):
        try:
            request = self._parsed(request)
            if len(request.jobs) > wire.MAX_JOB_REPORTS:
                raise ValidationError(f"{len(request.jobs)} job reports in one call; at most {wire.MAX_JOB_REPORTS}")
            with self.job_reports.taken():
                device_id = await self._authenticate(context)
                reports = [wire.job_report_from_proto(job) for job in request.jobs]
                recorded = await asyncio.to_thread(self.service.record_job_reports, device_id, reports)
        except PloraError as err:
            await self._abort(context, err)
        return pb.ReportJobsReply(recorded=recorded)

    async def Describe(self, request, context):
        try:
            self._parsed(request)
            with self.descriptions.taken():
                described = await asyncio.to_thread(lambda: [self._describe(v) for v in self.service.versions.values()])
        except PloraError as err:
            await self._abort(context, err)
        return pb.DescribeReply(backbones=described)

    def _describe(self, version: HostedVersion) -> pb.HostedBackbone:
        try:
            default = self.service.hosted()
        except PloraError:
            default = None  # every hosted version is deprecated or retired
        return _hosted_proto(version, version is default)

    async def DownloadBundle(self, request, context) -> None:
        limits = self.service.limits
        try:
            request = self._parsed(request)
            with self.downloads.taken():
                await self._authenticate(context)
                version = await asyncio.to_thread(self.service.hosted, request.backbone)
                chunks = bundle.chunked_bundle(version.bundle, BUNDLE_CHUNK)
                deadline = time.monotonic() + limits.bundle_timeout_s
                # File reads go to a thread, so a slow disk never stalls the loop's sessions.
                while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                    left = deadline - time.monotonic()
                    try:
                        async with asyncio.timeout(max(0.0, min(left, limits.write_timeout_s))):
                            await context.write(chunk)
                    except TimeoutError:
                        raise TransportError(f"the bundle download did not finish within {limits.bundle_timeout_s:g} s, "
                                             f"or the device read nothing for {limits.write_timeout_s:g} s") from None
        except PloraError as err:
            await self._abort(context, err)

    async def Session(self, request_iterator, context):
        try:
            device_id = await self._authenticate(context)
            if self._streams_of[device_id] >= self.service.limits.max_sessions_per_device:
                raise CapacityError(f"device {quoted(device_id)} already holds {self._streams_of[device_id]} sessions "
                                    "(open or opening), the limit per device; close one first")
            with self.sessions.taken():
                self._streams_of[device_id] += 1
                try:
                    await SessionStream(self.service, self.metrics, self.workers, self.failed_steps, device_id, context).serve()
                finally:
                    self._streams_of[device_id] -= 1
                    if not self._streams_of[device_id]:
                        del self._streams_of[device_id]
        except PloraError as err:
            await self._abort(context, err)
