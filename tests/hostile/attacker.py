"""The hostile device that plays attacks (see kinds.py) against a live backbone service.

An `Attacker` is an enrolled device that speaks raw gRPC, so that anything at all can be a
frame and its frames reach the service's session logic. It holds at most one session, and
knows how to get into the middle of a valid step, where most attacks strike. Besides the
judge's rules (judge.py), it checks that a step refused without ending its session leaves the
session usable, and that a session whose device vanished is closed within CLOSE_WITHIN_S, which
the same device measures by reopening: the service under test allows each device one session.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from plora.cloud_backbone.protocol import split_pb2 as pb, wire
from plora.cloud_backbone.protocol.messages import BackboneIdentity, OpenSession
from tests.hostile.judge import LOAD, Answer, Broken, Busy, Report, answer_of, verdict

if TYPE_CHECKING:
    from tests.hostile.kinds import Kind

METHOD = "/plora.split.v1.SplitBackbone/"
CLOSE_WITHIN_S = 1.0  # issue 11: a dropped session is closed and its budget released within 1 s
SLACK_S = 1.0  # added to every bound, for a loaded 2-core machine
FLOOD_STREAMS = 100  # silent streams in a flood: more than the service admits at once (64 + 8 by default)
MAX_MESSAGE = 64 << 20  # what the attacker may send: more than the service accepts


def _raw(frame: bytes) -> bytes:
    return frame


def _status(code: grpc.StatusCode, details: str | None, debug: str | None) -> Answer:
    # Where an INTERNAL or UNKNOWN came from (a reset stream, the transport) is in gRPC's debug string.
    where = f" [{debug}]" if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and debug else ""
    return Answer("status", code.name, detail=(details or "") + where)


# --- a raw session stream ------------------------------------------------------------------------


class RawStream:
    """A Session stream that sends raw bytes, so that a frame can be anything at all."""

    def __init__(self, channel: grpc.aio.Channel, metadata: list[tuple[str, str]]):
        self.channel, self.metadata = channel, metadata
        session = channel.stream_stream(METHOD + "Session", request_serializer=_raw, response_deserializer=pb.CloudMessage.FromString)
        self.call = session(metadata=metadata)

    def again(self) -> RawStream:
        """A new stream like this one."""
        return RawStream(self.channel, self.metadata)

    async def send(self, frame: bytes | pb.DeviceMessage) -> bool:
        """Whether the frame went out. When the service ended the stream first, gRPC's asyncio
        client reports an INTERNAL status of its own in place of the service's."""
        try:
            await self.call.write(frame if isinstance(frame, bytes) else frame.SerializeToString())
            return True
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return False

    async def read(self, timeout: float) -> pb.CloudMessage | Answer:
        try:
            message = await asyncio.wait_for(self.call.read(), timeout)
        except asyncio.TimeoutError:
            return Answer("silence", detail=f"{timeout:g} s")
        except grpc.aio.AioRpcError as err:
            return _status(err.code(), err.details(), err.debug_error_string())
        if message is grpc.aio.EOF:
            return _status(await self.call.code(), await self.call.details(), await self.call.debug_error_string())
        return message

    def cancel(self) -> None:
        self.call.cancel()


# --- the attacker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    address: str
    identity: BackboneIdentity  # what the attacker's devices are bound to
    reply_timeout_s: float
    write_timeout_s: float
    first_frame_timeout_s: float
    max_tokens: int  # per session
    max_message_bytes: int

    @property
    def requests_per_step(self) -> int:
        """Adapter round trips in one forward (or backward) step."""
        adapter = self.identity.adapter
        return (self.identity.num_layers - adapter.device_layers) * len(adapter.groups)

    def width(self, group: str, phase: int) -> int:
        """The last dimension of a device's reply: u·M in a forward, dL/du in a backward."""
        adapter = self.identity.adapter
        count = len(adapter.groups.get(group, ("q",))) if phase == pb.PHASE_FORWARD else adapter.a_count(group)
        return adapter.rank * count


def tensor(shape: list[int], dtype: int = pb.FLOAT32, data: bytes | None = None, fill: float = 0.0) -> pb.Tensor:
    """A wire tensor; without `data`, float32 values all equal to `fill`."""
    if data is None:
        data = struct.pack("<f", fill) * math.prod(shape)
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def hidden(rng: random.Random, batch: int, tokens: int, width: int) -> pb.Tensor:
    """Hidden states of ordinary size: N(0, 1) floats."""
    return tensor([batch, tokens, width], data=struct.pack(f"<{batch * tokens * width}f", *(rng.gauss(0, 1) for _ in range(batch * tokens * width))))


class Attacker:
    """One enrolled hostile device. It holds at most one session, and plays attacks one by one."""

    def __init__(self, target: Target, metadata: list[tuple[str, str]], report: Report, spare: list[tuple[str, str]] | None = None):
        """`metadata` and `spare` are the call metadata of two enrolled devices. Sessions are the
        first's; streams whose first frame is the attack are the spare's, which holds no session:
        the service counts an opening stream as its device's, and would refuse it for the device's
        session limit before reading its first frame."""
        self.target, self.metadata, self.report = target, metadata, report
        self.spare = spare or metadata
        self.channel = self.connect()
        self.current: RawStream | None = None
        self.cached = False  # the current session holds a sequence of one row
        self.step = 0
        self.kind, self.index = "", -1
        self.training_share = 0.3  # of the attacks inside a step, those inside a training step's backward
        # After a refused step, how often the session's next valid step is checked right away:
        # a valid step costs the service 20 times what a refused frame costs, and the attacks that
        # follow in the same session run valid steps anyway. A table of single attacks checks always.
        self.check_share = 0.02

    def connect(self) -> grpc.aio.Channel:
        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        return grpc.aio.insecure_channel(self.target.address, options=options)

    @property
    def patience_s(self) -> float:
        """How long a frame may wait for its answer: a batch may wait on a slow row meanwhile."""
        return self.target.reply_timeout_s + SLACK_S

    async def play(self, attack: Kind, index: int, seed: int) -> None:
        self.kind, self.index = attack.name, index
        self.report.attacks[attack.name] += 1
        try:
            await attack.play(self, random.Random(f"{seed}/{index}"))
        except Broken as err:
            self.report.find(attack.name, index, str(err))
            self.drop()
        except Busy:
            self.report.load_refusals += 1
            self.drop()

    def failed(self, what: str, got: pb.CloudMessage | Answer) -> Exception:
        """The exception for a valid exchange that went wrong: Busy if a crowded service refused it for load."""
        answer = answer_of(got)
        if self.report.crowded and answer.names & LOAD:
            return Busy(what)
        return Broken(f"{what}: {answer}")

    def stream(self, metadata: list[tuple[str, str]] | None = None) -> RawStream:
        """A new stream, by default of the spare device: one whose first frame is the attack."""
        return RawStream(self.channel, self.spare if metadata is None else metadata)

    def drop(self) -> float:
        """Cancel the current session's stream, if any; when it was dropped."""
        if self.current is not None:
            self.current.cancel()
        self.current, self.cached = None, False
        return time.monotonic()

    async def close(self) -> None:
        self.drop()
        await self.channel.close()

    async def session(self, cached: bool = False) -> RawStream:
        """The open session, or a new one; with `cached`, one that holds a sequence of one row."""
        if self.current is None:
            self.current = await self.open(time.monotonic() + self.patience_s)
        if cached and not self.cached:
            await self.valid_step(self.forward(hidden(random.Random(self.step), 1, 3, self.target.identity.hidden_size), pb.CACHE_START))
            self.cached = True
        return self.current

    async def fresh_session(self) -> RawStream:
        self.drop()
        return await self.session()

    async def open(self, deadline: float, what: str = "a valid OpenSession") -> RawStream:
        """A new session, retried until `deadline` while the service still counts this device's
        last one (or, during a flood of silent streams, while the flood lasts)."""
        while True:
            stream = self.stream(self.metadata)
            await stream.send(wire.device_message(0, OpenSession(self.target.identity)))
            got = answer_of(await stream.read(self.patience_s))
            if got.what == "opened":
                return stream
            stream.cancel()
            if time.monotonic() > max(deadline, self.report.flood_until):
                raise Broken(f"{what} is still refused: {got}")  # not Busy: the service must make room
            await asyncio.sleep(0.02)

    async def reopen_after(self, dropped: float, within_s: float = CLOSE_WITHIN_S) -> None:
        """Reopen right after dropping a session: the service must have closed it within `within_s`."""
        flooded = self.report.flood_until > dropped
        self.current = await self.open(dropped + within_s + SLACK_S, f"{within_s:g} s after the drop, a new session")
        if within_s == CLOSE_WITHIN_S and not flooded:
            self.report.close_latency_s.append(time.monotonic() - dropped)

    def forward(self, hidden_state: pb.Tensor, cache: int = pb.CACHE_NONE, train: bool = False, mask: pb.Tensor | None = None) -> pb.DeviceMessage:
        self.step += 1
        return pb.DeviceMessage(step=self.step, forward=pb.ForwardRequest(hidden=hidden_state, cache=cache, train=train, attention_mask=mask))

    def backward(self, grad: pb.Tensor) -> pb.DeviceMessage:
        self.step += 1
        return pb.DeviceMessage(step=self.step, backward=pb.BackwardRequest(grad_hidden=grad))

    def reply_to(self, request: pb.CloudMessage) -> pb.DeviceMessage:
        """A valid reply: zeros, as from M = 0."""
        asked = request.request
        shape = [*asked.tensor.shape[:-1], self.target.width(asked.group, asked.phase)]
        reply = pb.AdapterReply(layer=asked.layer, group=asked.group, phase=asked.phase, tensor=tensor(shape), start=asked.start)
        return pb.DeviceMessage(step=request.step, reply=reply)

    async def run_step(self, frame: pb.DeviceMessage | None = None) -> pb.CloudMessage | Answer:
        """Send `frame` (if any) and answer every adapter request validly, to the step's end."""
        if frame is not None:
            await self.current.send(frame)
        while True:
            got = await self.current.read(self.patience_s)
            if not (isinstance(got, pb.CloudMessage) and got.WhichOneof("body") == "request"):
                return got
            await self.current.send(self.reply_to(got))

    async def valid_step(self, frame: pb.DeviceMessage) -> pb.CloudMessage:
        got = await self.run_step(frame)
        if answer_of(got).what != "result":
            raise self.failed(f"a valid {frame.WhichOneof('body')} step failed", got)
        return got

    async def into_step(self, frame: pb.DeviceMessage, answered: int) -> pb.CloudMessage:
        """Start a valid step and answer its first `answered` adapter requests; the next one."""
        await self.current.send(frame)
        for done in range(answered + 1):
            got = await self.current.read(self.patience_s)
            if answer_of(got).what != "request":
                raise self.failed(f"a valid {frame.WhichOneof('body')} step ended early", got)
            if done < answered:
                await self.current.send(self.reply_to(got))
        return got

    async def mid_step(self, rng: random.Random) -> pb.CloudMessage:
        """Into a valid step, up to the adapter request an attack answers: of a decode step,
        batched with the honest devices' when they decode, or of a training step's backward."""
        answered, size = rng.randrange(self.target.requests_per_step), self.target.identity.hidden_size
        if rng.random() >= self.training_share:
            await self.session(cached=True)
            return await self.into_step(self.forward(hidden(rng, 1, 1, size), pb.CACHE_EXTEND), answered)
        await self.session()
        tokens = rng.randrange(1, 6)
        await self.valid_step(self.forward(hidden(rng, 1, tokens, size), train=True))
        return await self.into_step(self.backward(tensor([1, tokens, size], fill=0.01)), answered)

    async def refused(
        self, frame: bytes | pb.DeviceMessage, expect: frozenset[str] | None, stream: RawStream | None = None, in_step: bool = False
    ) -> Answer:
        """Send one hostile frame and judge the answer (see `judged`). A new stream the service
        ended before its first frame went out is tried again, twice; its status is lost."""
        self.report.frames += 1
        for _ in range(3):
            if await (stream or self.current).send(frame) or stream is None:
                return await self.judged(expect, stream, in_step)
            stream.cancel()
            stream = stream.again()
        stream.cancel()
        self.report.load_refusals += 1
        return Answer("unsent")

    async def judged(self, expect: frozenset[str] | None, stream: RawStream | None = None, in_step: bool = False) -> Answer:
        """Read the answer to a hostile frame and judge it. A session that cannot go on is
        dropped; a stream other than the session's is cancelled. In a crowded run, a frame
        `in_step` may have come too late for its batch: the service then runs the step again
        alone, and asks anew (a load refusal, not a finding)."""
        answer = answer_of(await (stream or self.current).read(self.patience_s))
        if in_step and self.report.crowded and answer.what == "request":
            self.report.load_refusals += 1
            self.drop()
            return answer
        problem = verdict(answer, self.report.expected(expect, stream is not None))
        if problem:
            self.report.find(self.kind, self.index, problem)
        if stream is not None:
            stream.cancel()
        elif answer.what not in ("error", "result") or answer.fatal:
            self.drop()
        return answer

    async def vanish(self, how: str, within_s: float = CLOSE_WITHIN_S) -> None:
        """Leave the session as a broken device would; the service must close it within `within_s`."""
        self.report.frames += 1
        old = self.current
        if how == "cancel":
            old.cancel()
        elif how == "half_close":
            await old.call.done_writing()
        elif how == "disconnect":
            channel, self.channel = self.channel, self.connect()
            await channel.close()
        self.current, self.cached = None, False
        await self.reopen_after(time.monotonic(), within_s)
        old.cancel()

    async def still_serves(self) -> None:
        """After a refused step, the session's next valid step works (its cache was rolled back)."""
        if self.current is None:
            return
        size = self.target.identity.hidden_size
        if self.cached:
            frame = self.forward(hidden(random.Random(self.step), 1, 1, size), pb.CACHE_EXTEND)
        else:
            frame = self.forward(hidden(random.Random(self.step), 1, 2, size))
        try:
            await self.valid_step(frame)
        except Broken as err:
            raise Broken(f"after a refused step, {err}") from None

    def note(self, answer: Answer, expect: frozenset[str] | None) -> None:
        """Judge the answer to a hostile unary call."""
        problem = verdict(answer, self.report.expected(expect, admission=True))
        if problem:
            self.report.find(self.kind, self.index, problem)

    async def unary(self, method: str, request: bytes, metadata: list[tuple[str, str]] | None = None, hostile: bool = True) -> Answer:
        """A unary call (or the first chunk of a download) with raw request bytes."""
        self.report.frames += hostile
        try:
            if method == "DownloadBundle":
                call = self.channel.unary_stream(METHOD + method, request_serializer=_raw, response_deserializer=_raw)
                async for _ in call(request, metadata=metadata, timeout=self.patience_s):
                    return Answer("result", detail="a bundle chunk")
                return Answer("result", detail="an empty bundle")
            call = self.channel.unary_unary(METHOD + method, request_serializer=_raw, response_deserializer=_raw)
            await call(request, metadata=metadata, timeout=self.patience_s)
            return Answer("result", detail=f"{method} succeeded")
        except grpc.aio.AioRpcError as err:
            return _status(err.code(), err.details(), err.debug_error_string())
