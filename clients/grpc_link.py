"""The split protocol over gRPC: one bidirectional stream per device session.

Transport only: messages are converted by the protocol's wire module and handed to the
same device handler the in-process link uses, so training and generation cannot tell the
two links apart.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from plora.clients.recovery import ConnectionLost, RetryPolicy, SequenceHistory
from plora.cloud_backbone.protocol import bundle, split_pb2 as pb, split_pb2_grpc as pb_grpc, wire
from plora.cloud_backbone.protocol.link import DeviceHandler, SplitLink
from plora.cloud_backbone.protocol.wire import WireDtypes
from plora.cloud_backbone.protocol.messages import (
    AdapterRequest,
    BackboneIdentity,
    BackwardRequest,
    BackwardResult,
    ForwardRequest,
    ForwardResult,
    HostedBackbone,
    OpenSession,
    SessionOpened,
    StepError,
)
from plora.storage import errors
from plora.storage.errors import AuthenticationError, CapacityError, ConfigError, PloraError, TransportError, ValidationError, VersionMismatchError
from plora.storage.files import write_atomically
from plora.storage.registry import JobReport

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 32 << 20
KEEPALIVE_MS = 30_000
"""How often a device pings the service during a call; a dead service is found within this and
10 s more, however long the call has sent nothing."""
REPORT_TIMEOUT_S = 10  # a job's end waits no longer for the service to hear of it
_CLOSE = object()
_ENDED = object()  # the stream is over (gRPC's done callback)
# How often a step whose stream ended checks whether the pump still runs.
_PUMP_CHECK_S = 0.01


@dataclass(frozen=True)
class Endpoint:
    """Where the service is and how to reach it.

    `address` is host:port, or the IP addresses of several replicas of the service, comma
    separated (a name that resolves to several addresses does as well). A channel uses gRPC's
    pick_first: it connects to the first replica that answers, so each session, one stream on
    a channel of its own, sticks to one replica, and a new session after a failure finds the
    next one alive. Over TLS, every replica's certificate must name the first replica's host
    (one certificate naming each replica's address does): gRPC checks them all against one name."""

    address: str  # host:port, or ip:port,ip:port,...
    insecure: bool = False  # plain text: loopback and tests only
    ca_file: str | None = None  # a CA bundle to trust; None = gRPC's bundled public roots

    @property
    def target(self) -> str:
        """The gRPC target: the address, or a list of replicas under gRPC's ipv4: or ipv6: scheme."""
        replicas = self.address.split(",")
        if len(replicas) == 1:
            return self.address
        try:
            families = {ipaddress.ip_address(replica.rpartition(":")[0].strip("[]")).version for replica in replicas}
        except ValueError:
            raise ConfigError(f"several replicas are given by IP address (ip:port,ip:port), got {self.address!r}; "
                              "for replicas under a name, give that one name, resolving to all of them") from None
        if len(families) > 1:
            raise ConfigError(f"the replicas of {self.address!r} mix IPv4 and IPv6 addresses; give one kind")
        return f"ipv{families.pop()}:{self.address}"

    def channel(self) -> grpc.Channel:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # The service accepts a ping a second. gRPC's client otherwise sends two pings without
            # data and then one a minute, which left a quiet session up to 70 s on a dead service.
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if self.insecure:
            return grpc.insecure_channel(self.target, options=options)
        if "," in self.address:  # else gRPC checks the certificates against the whole list's name
            options.append(("grpc.ssl_target_name_override", self.address.split(",")[0].rpartition(":")[0].strip("[]")))
        root = Path(self.ca_file).read_bytes() if self.ca_file else None
        return grpc.secure_channel(self.target, grpc.ssl_channel_credentials(root_certificates=root), options=options)


@dataclass(frozen=True)
class Credentials:
    device_id: str
    token: str

    def metadata(self) -> list[tuple[str, str]]:
        return [(wire.DEVICE_HEADER, self.device_id), ("authorization", f"Bearer {self.token}")]

    def save(self, path: Path) -> None:
        """Atomically, and owner-only even where the file existed with a wider mode: the token is
        the device's password. (write_atomically's new file is 0600 and replaces the old one.)"""
        write_atomically(path, json.dumps({"device_id": self.device_id, "token": self.token}).encode())

    @classmethod
    def load(cls, path: Path) -> Credentials:
        try:
            data = json.loads(path.read_text())
            return cls(data["device_id"], data["token"])
        except (OSError, KeyError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read device credentials from {path}: {err}") from err


def rpc_error(err: grpc.RpcError) -> PloraError:
    """A plora error for a failed call, keeping the service's message."""
    code, detail = err.code(), (err.details() or "")[: wire.MAX_ERROR_CHARS]
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return ConnectionLost(f"the backbone service is unreachable or went away ({code.name}: {detail})")
    # The service aborts with "<plora error class>: <message>"; anything else is a transport failure.
    name, _, message = detail.partition(": ")
    if code in _REFUSALS and _plora_class(name) is not None:
        return _plora_class(name)(message)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(message if name == AuthenticationError.__name__ else detail)
    return TransportError(f"{code.name}: {detail}")


# Status codes the service uses to refuse a call for a reason the device should act on.
_REFUSALS = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}


def _plora_class(name: str) -> type[PloraError] | None:
    kind = getattr(errors, name, None)
    return kind if isinstance(kind, type) and issubclass(kind, PloraError) else None


def _error_from(message: StepError) -> PloraError:
    return (_plora_class(message.kind) or TransportError)(message.message)


class _Session:
    """One cloud session: one gRPC stream, on a channel of its own.

    A step's exchanges run on the thread gRPC gives the stream's requests (`_pump`): it reads
    the cloud's frame, answers it with the handler and hands the answer straight back to gRPC
    to send. A decode step makes a round trip per adapted layer, and each hand-off between
    threads costs each one a wake-up: the calling thread hands over the whole step and waits for
    its outcome, so the exchanges no longer pass through it. The reply timeout is kept by a
    watchdog thread that cancels the stream when a frame overstays, unsent or unanswered.
    A step that fails in any way but a refusal the service reports leaves the session `over`:
    its stream is closed, since neither side knows how far the other got."""

    def __init__(
        self,
        endpoint: Endpoint,
        credentials: Credentials,
        expected: BackboneIdentity,
        reply_timeout_s: float,
        count: Callable[[str, int], None],
    ):
        self._timeout = reply_timeout_s
        self._count = count  # (direction, serialized bytes) of each frame
        # A channel per session: a channel that saw the service go away waits out gRPC's own
        # reconnect backoff, up to minutes, and the link's retry policy is the one to obey.
        self._channel = endpoint.channel()
        self._steps: queue.Queue = queue.Queue()  # (first message, handler) for the pump, or _CLOSE
        self._outcomes: queue.Queue = queue.Queue()  # each step's last message or error, and _ENDED
        self._pump_thread: threading.Thread | None = None  # gRPC's, once it asked for a frame
        self._step = 0
        self._deadline: float | None = None  # when the frame in flight times out
        self._timed_out = False
        self._closed = threading.Event()
        self.over = False
        stub = pb_grpc.SplitBackboneStub(self._channel)
        self._call = stub.Session(self._pump(), metadata=credentials.metadata())
        self._call.add_done_callback(lambda _: self._outcomes.put(_ENDED))
        threading.Thread(target=self._watch, name="plora-link-watchdog", daemon=True).start()
        try:
            opened = self._run(OpenSession(expected), None)
            if isinstance(opened, StepError):
                raise _error_from(opened)
            if not isinstance(opened, SessionOpened):
                raise ValidationError(f"expected SessionOpened, got {type(opened).__name__}")
        except BaseException:
            self.close()
            raise
        self.identity: BackboneIdentity = opened.identity
        self.session_id: str = opened.session_id

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self._timeout / 4)):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._timed_out = True
                self._call.cancel()

    def _pump(self):
        """The stream's requests, made on gRPC's thread as the cloud's frames come. Each step
        ends with its last message, or its error, in `_outcomes`; an error ends the stream."""
        self._pump_thread = threading.current_thread()
        while (step := self._steps.get()) is not _CLOSE:
            message, handler = step
            try:
                while True:
                    yield self._frame(message)
                    message = self._receive()
                    if handler is None or not isinstance(message, AdapterRequest):
                        break
                    message = handler(message)
            except GeneratorExit:
                raise
            except BaseException as err:  # the calling thread raises it
                message = err
            finally:
                self._deadline = None
            self._outcomes.put(message)
            if isinstance(message, BaseException):
                return

    def _frame(self, message) -> pb.DeviceMessage:
        frame = wire.device_message(self._step, message)
        self._count("up", frame.ByteSize())
        self._deadline = time.monotonic() + self._timeout  # gRPC may hold an unsendable frame for ever
        return frame

    def _receive(self):
        try:
            frame = next(self._call)
        except StopIteration:
            raise self._ended(self._call) from None
        except grpc.RpcError as err:
            raise self._ended(err) from None
        self._count("down", frame.ByteSize())
        step, message = wire.parse_cloud_message(frame, MAX_MESSAGE_BYTES // 2)  # elements: 2 bytes at the least
        # Every frame answers the step in progress, but a fatal error, which may end the session
        # before any step (the service then says step 0).
        if step != self._step and not (isinstance(message, StepError) and message.fatal):
            raise ValidationError(f"the service sent a frame of step {step} during step {self._step}")
        return message

    def _ended(self, err: grpc.RpcError) -> PloraError:
        if self._timed_out:
            return ConnectionLost(f"no answer from the backbone service within {self._timeout:g} s")
        if err.code() == grpc.StatusCode.OK:
            return ConnectionLost("the service ended the session stream")
        return rpc_error(err)

    def _run(self, message, handler: DeviceHandler | None):
        """Hand a step to the pump and wait for its outcome: the cloud's last message, its adapter
        requests answered by `handler`, or its first, where there is no handler."""
        if self.over:
            raise ConnectionLost("this session is closed")
        self._steps.put((message, handler))
        outcome = self._outcomes.get()
        if outcome is _ENDED:
            outcome = self._outcome_after_end()
            self.close()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _outcome_after_end(self):
        """The stream ended during the step. The pump may still be reading what the service sent
        before the end, or hold a frame that gRPC will never send: gRPC then lets its thread end."""
        while True:
            try:
                return self._outcomes.get(timeout=_PUMP_CHECK_S)
            except queue.Empty:
                if self._pump_thread is None or not self._pump_thread.is_alive():
                    return self._ended(self._call)

    def step(self, request, handler: DeviceHandler, final: type):
        """Send `request`, answer the cloud's adapter requests with `handler`, return its `final` reply."""
        self._step += 1
        try:
            message = self._run(request, handler)
            if isinstance(message, StepError) and message.fatal:
                raise _error_from(message)
            if not isinstance(message, (final, StepError)):
                raise ValidationError(f"unexpected {type(message).__name__} from the service during a step")
        except BaseException:
            self.close()
            raise
        if isinstance(message, StepError):
            raise _error_from(message)  # the service refused this step; the session goes on
        return message

    def close(self) -> None:
        self.over = True
        self._closed.set()
        self._steps.put(_CLOSE)
        self._call.cancel()
        self._channel.close()


class GrpcLink(SplitLink):
    """The split protocol over gRPC, on one session at a time.

    A step that loses its connection (`ConnectionLost`: the service unreachable or restarted,
    the stream broken or ended, no reply in time) is tried again on a new session, as `retry`
    allows. The new session is first brought to the state of the lost one by replaying the
    device's own requests (`SequenceHistory`): the cached sequence being decoded, and the
    training forward whose backward is to be retried. A training step reaches the optimizer
    only once its backward succeeded, so a retried step applies its update once.

    The first session is opened once, without retrying: a wrong address or credential is
    reported at once."""

    def __init__(
        self,
        endpoint: Endpoint,
        credentials: Credentials,
        expected: BackboneIdentity,
        reply_timeout_s: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
        wire_dtypes: WireDtypes = WireDtypes(),
    ):
        super().__init__()
        self.retry = retry
        self.wire_dtypes = wire_dtypes
        self._endpoint, self._credentials, self._expected, self._timeout = endpoint, credentials, expected, reply_timeout_s
        self._history = SequenceHistory()
        self._closed = False
        self.wire_bytes = {"up": 0, "down": 0}  # serialized message bytes, before gRPC/HTTP2 framing
        self.wire_frames = 0
        self._session: _Session | None = self._new_session()
        self._identity = self._session.identity

    @property
    def identity(self) -> BackboneIdentity:
        return self._identity

    def _count(self, direction: str, size: int) -> None:
        self.wire_bytes[direction] += size
        self.wire_frames += 1

    def _new_session(self) -> _Session:
        return _Session(self._endpoint, self._credentials, self._expected, self._timeout, self._count)

    def _reopen(self) -> _Session:
        try:
            session = self._new_session()
        except CapacityError as err:
            # A full service has room again once it notices that the lost sessions are gone.
            raise ConnectionLost(f"the service has no room for a new session yet: {err}") from err
        try:
            session.identity.require_match(self._identity)
            replay = self._history.replay()
            for request, handler in replay:
                self._exchange(session, request, handler, ForwardResult)
        except BaseException:
            session.close()
            raise
        log.info("new session %s: replayed %d forward steps, %d cached tokens", session.session_id, len(replay), self._history.cached_tokens)
        return session

    def _exchange(self, session: _Session, request, handler: DeviceHandler, final: type):
        # The taps see the messages as they cross, in the wire dtype.
        dtypes = self.wire_dtypes

        def answer(sent: AdapterRequest):
            return wire.to_wire_dtype(handler(wire.from_wire_dtype(sent, dtypes.exchanges)), dtypes.exchanges)

        request = dtypes.request(request)
        self._record("up", request)
        result = session.step(request, self._recorded(answer), final)
        self._record("down", result)
        return wire.from_wire_dtype(result, dtypes.cut)

    def _step(self, request, handler: DeviceHandler, final: type, what: str):
        if self._closed:
            raise TransportError("this link is closed; open the device again for a new one")

        def attempt():
            if self._session is None:
                self._session = self._reopen()
            session = self._session
            try:
                return self._exchange(session, request, handler, final)
            finally:
                if session.over:
                    self._session = None

        return self.retry.run(attempt, what)

    def forward(self, request: ForwardRequest, handler: DeviceHandler) -> ForwardResult:
        self._history.forward_started()
        result = self._step(request, handler, ForwardResult, "forward step")
        self._history.forwarded(request, handler)
        return result

    def backward(self, request: BackwardRequest, handler: DeviceHandler) -> BackwardResult:
        try:
            return self._step(request, handler, BackwardResult, "backward step")
        finally:
            self._history.backward_finished()

    def close(self) -> None:
        self._closed = True
        if self._session is not None:
            self._session.close()


def register(endpoint: Endpoint, enroll_token: str = "", backbone: str = "", label: str = "") -> tuple[Credentials, HostedBackbone]:
    """Enroll a new device with the service, with an enrollment token the operator issued
    (`plora backbone enroll create`); without one only a service with open enrollment accepts it."""
    request = pb.RegisterRequest(backbone=backbone, label=label, enroll_token=enroll_token)
    with endpoint.channel() as channel:
        try:
            reply = pb_grpc.SplitBackboneStub(channel).Register(request, timeout=30)
        except grpc.RpcError as err:
            raise rpc_error(err) from err
    return Credentials(reply.device_id, reply.token), wire.hosted_from_proto(reply.backbone)


def forget(endpoint: Endpoint, credentials: Credentials) -> dict[str, int]:
    """Have the service delete everything it keeps about the device, its credential included.
    Returns what it deleted: records by kind."""
    with endpoint.channel() as channel:
        try:
            reply = pb_grpc.SplitBackboneStub(channel).ForgetDevice(pb.ForgetRequest(), metadata=credentials.metadata(), timeout=30)
        except grpc.RpcError as err:
            raise rpc_error(err) from err
    return dict(reply.removed)


def send_job_reports(endpoint: Endpoint, credentials: Credentials, reports: list[JobReport]) -> int:
    """Tell the service what became of the device's jobs (metadata only); returns how many it recorded."""
    recorded = 0
    with endpoint.channel() as channel:
        stub = pb_grpc.SplitBackboneStub(channel)
        for first in range(0, len(reports), wire.MAX_JOB_REPORTS):
            request = pb.ReportJobsRequest(jobs=[wire.job_report_to_proto(r) for r in reports[first : first + wire.MAX_JOB_REPORTS]])
            try:
                recorded += stub.ReportJobs(request, metadata=credentials.metadata(), timeout=REPORT_TIMEOUT_S).recorded
            except grpc.RpcError as err:
                raise rpc_error(err) from err
    return recorded


def describe(endpoint: Endpoint, version: str) -> HostedBackbone:
    """What the service announces of a version it hosts: its identity and its bundle's hash."""
    with endpoint.channel() as channel:
        try:
            reply = pb_grpc.SplitBackboneStub(channel).Describe(pb.DescribeRequest(), timeout=30)
        except grpc.RpcError as err:
            raise rpc_error(err) from err
    hosted = {h.identity.version: h for h in map(wire.hosted_from_proto, reply.backbones)}
    if version not in hosted:
        raise VersionMismatchError(f"the service at {endpoint.address} does not host {version!r}; it hosts {sorted(hosted)}")
    return hosted[version]


def download_bundle(endpoint: Endpoint, credentials: Credentials, hosted: HostedBackbone, folder: Path) -> None:
    """Fetch the device bundle and keep it only if its hash is the one the service announced."""
    with endpoint.channel() as channel:
        stub = pb_grpc.SplitBackboneStub(channel)
        try:
            request = pb.BundleRequest(backbone=hosted.identity.version)
            chunks = stub.DownloadBundle(request, metadata=credentials.metadata(), timeout=600)
            bundle.receive_bundle(chunks, folder, hosted.bundle_sha256, max_bytes=hosted.bundle_size)
        except grpc.RpcError as err:
            raise rpc_error(err) from err
