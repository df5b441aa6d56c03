"""The kinds of hostile input, each a short script for an `Attacker`, and the seeded plan.

Each kind names the refusal it must get (`expect`); frames that would cost the service real
memory if it accepted them are made of zeros, since their content does not matter.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from plora.cloud_backbone.protocol import split_pb2 as pb, wire
from plora.cloud_backbone.protocol.messages import OpenSession

from tests.hostile.attacker import FLOOD_STREAMS, SLACK_S, Attacker, RawStream, hidden, tensor
from tests.hostile.judge import CAPACITY, SESSION, VALID, answer_of, verdict

# How often a kind comes after the first round, by what it costs the service: a refused frame of an
# open session is cheap, a new stream costs an authentication, an attack inside a step costs a
# whole decode or training step first. With these, 10,000 frames on the tiny model take about 75
# CPU seconds (service, attackers and two honest devices together).
CHEAP, STREAM, IN_STEP, RARE = 10, 3, 0.75, 1
UNDECODABLE = (b"\xff\xff\xff\xff", b"\x08", b"\x0a\x05ab", b"\x0f", b"\x1a\xff\xff\xff\xff\x0f")  # truncated varints and fields, wire type 7
_MARK = "~not-utf8-mark~"  # replaced, byte for byte, by bytes that are not UTF-8


@dataclass(frozen=True)
class Kind:
    name: str
    play: Callable[[Attacker, random.Random], Awaitable[None]]
    weight: float  # relative frequency after the first round; 0: once per round only
    expect: frozenset[str] | None  # the refusal it must get; None: any proper refusal
    mid_step: bool = False  # it strikes inside a step: of a batched decode, or of a backward


KINDS: dict[str, Kind] = {}


def attack(weight: float, expect: frozenset[str] | None = VALID, mid_step: bool = False):
    def register(play):
        KINDS[play.__name__] = Kind(play.__name__, play, weight, expect, mid_step)
        return play

    return register


def plan(seed: int) -> Iterator[Kind]:
    """The kinds of attacks 0, 1, 2, ...: every kind once in a shuffled first round, then weighted draws."""
    rng = random.Random(seed)
    first = sorted(KINDS.values(), key=lambda k: k.name)
    rng.shuffle(first)
    yield from first
    drawn = [k for k in first if k.weight]
    while True:
        yield rng.choices(drawn, weights=[k.weight for k in drawn])[0]


def not_utf8(frame: pb.DeviceMessage, holder, name: str) -> bytes:
    """`frame` serialized with the string field `name` of `holder` holding bytes that are not UTF-8."""
    setattr(holder, name, _MARK)
    return frame.SerializeToString().replace(_MARK.encode(), b"\xc3\x28" + b"\xff" * (len(_MARK) - 2))


def int64s(shape: list[int], values: list[int]) -> pb.Tensor:
    return tensor(shape, pb.INT64, struct.pack(f"<{len(values)}q", *values))


def lie_about(t: pb.Tensor, rng: random.Random, what: str) -> None:
    """Make a float32 tensor lie in one way, `what`: huge, negative, zero or too_many_dims (its
    dims), width (its last dim, payload to match), nan or inf (a value), dtype, non_float_dtype,
    payload (its size). A device's hidden state or gradient may be a 16-bit float (it sets the
    step's wire dtype), so only a non-float dtype is a lie there."""
    shape = list(t.shape)
    if what == "huge":
        t.shape[:] = [2**31, 2**31, shape[-1]]
    elif what == "negative":
        t.shape[rng.randrange(len(shape))] = -rng.randrange(1, 2**40)
    elif what == "zero":
        shape[rng.randrange(len(shape))] = 0
        t.shape[:], t.data = shape, b""
    elif what == "too_many_dims":
        t.shape[:] = [1, 1, *shape]
    elif what == "width":
        shape[-1] += rng.choice([-1, 1])
        t.shape[:], t.data = shape, bytes(4 * max(0, shape[0] * shape[1] * shape[-1]))
    elif what in ("nan", "inf"):
        values = bytearray(t.data)
        bad = struct.pack("<f", float("nan") if what == "nan" else rng.choice([float("inf"), -float("inf")]))
        at = 4 * rng.randrange(len(values) // 4)
        values[at : at + 4] = bad
        t.data = bytes(values)
    elif what in ("dtype", "non_float_dtype"):
        floats = [pb.FLOAT16, pb.BFLOAT16] if what == "dtype" else []
        t.dtype = rng.choice([*floats, pb.INT64, pb.DTYPE_UNSPECIFIED, 42])
        if t.dtype in (pb.FLOAT16, pb.BFLOAT16):
            t.data = t.data[: len(t.data) // 2]
        elif t.dtype == pb.INT64:
            t.data = t.data * 2
    elif what == "payload":
        t.data = t.data[: -rng.randrange(1, 8)] if rng.random() < 0.5 else t.data + b"\0" * rng.randrange(1, 8)
    else:
        raise ValueError(what)


# --- the first frame of a stream --------------------------------------------------------------


def _opening(a: Attacker) -> pb.DeviceMessage:
    return wire.device_message(0, OpenSession(a.target.identity))


@attack(STREAM)
async def undecodable_first_frame(a: Attacker, rng: random.Random) -> None:
    await a.refused(rng.choice(UNDECODABLE), VALID, a.stream())


@attack(STREAM, None)
async def random_bytes_first_frame(a: Attacker, rng: random.Random) -> None:
    await a.refused(rng.randbytes(rng.randrange(1, 300)), None, a.stream())


@attack(STREAM)
async def not_utf8_backbone_name(a: Attacker, rng: random.Random) -> None:
    frame = _opening(a)
    await a.refused(not_utf8(frame, frame.open.expected, rng.choice(["name", "content_hash"])), VALID, a.stream())


@attack(STREAM, SESSION)
async def forward_as_first_frame(a: Attacker, rng: random.Random) -> None:
    await a.refused(a.forward(hidden(rng, 1, 2, a.target.identity.hidden_size)), SESSION, a.stream())


@attack(STREAM)
async def empty_first_frame(a: Attacker, rng: random.Random) -> None:
    await a.refused(pb.DeviceMessage(step=rng.randrange(2**64)), VALID, a.stream())


@attack(STREAM, frozenset({"VersionMismatchError"}))
async def wrong_identity(a: Attacker, rng: random.Random) -> None:
    frame = _opening(a)
    expected = frame.open.expected
    field = rng.choice(["name", "content_hash", "num_layers", "hidden_size", "seed", "device_layers"])
    if field == "name":
        expected.name = "x" * rng.choice([1, 10_000])  # a long one must be cut short in the refusal
    elif field == "content_hash":
        expected.content_hash = "0" * 64
    elif field in ("seed", "device_layers"):
        setattr(expected.adapter, field, getattr(expected.adapter, field) + 1)
    else:
        setattr(expected, field, getattr(expected, field) + 1)
    await a.refused(frame, frozenset({"VersionMismatchError"}), a.stream())


@attack(STREAM, frozenset({"ValidationError", "VersionMismatchError"}))
async def invalid_adapter_config(a: Attacker, rng: random.Random) -> None:
    frame = _opening(a)
    adapter = frame.open.expected.adapter
    choice = rng.randrange(5)
    if choice == 0:
        adapter.rank = 0
    elif choice == 1:
        adapter.targets[:] = rng.choice([["zz"], [], ["q", "q"]])
    elif choice == 2:
        adapter.scale = rng.choice([float("nan"), float("inf"), -1.0, 0.0])
    elif choice == 3:
        adapter.device_layers = 2**32 - 1
    else:
        frame.open.expected.ClearField("adapter")
    await a.refused(frame, KINDS["invalid_adapter_config"].expect, a.stream())


@attack(STREAM, frozenset({"AuthenticationError"}))
async def wrong_credentials(a: Attacker, rng: random.Random) -> None:
    device, token = a.spare[0][1], a.spare[1][1]
    metadata = rng.choice([
        [(wire.DEVICE_HEADER, device), ("authorization", "Bearer not-the-token")],
        [(wire.DEVICE_HEADER, "f" * 32), ("authorization", token)],
        [(wire.DEVICE_HEADER, device)],
        [(wire.DEVICE_HEADER, "x" * 4000), ("authorization", "Bearer " + "y" * 4000)],  # under gRPC's own 16 KiB cap
        [],
    ])
    await a.refused(_opening(a), frozenset({"AuthenticationError"}), a.stream(metadata))


@attack(RARE, CAPACITY)
async def session_flood(a: Attacker, rng: random.Random) -> None:
    await a.session()  # the one session this device may hold
    for _ in range(rng.randrange(1, 4)):
        await a.refused(_opening(a), CAPACITY, a.stream(a.metadata))


@attack(0, None)
async def silent_stream_flood(a: Attacker, rng: random.Random) -> None:
    """Streams that never send a first frame, more than the service admits at once. Meanwhile
    Describe works, and each stream is ended within the first-frame timeout."""
    patience = a.target.first_frame_timeout_s + SLACK_S
    a.report.flood_until = time.monotonic() + patience + SLACK_S
    channel = a.connect()
    anonymous = rng.randrange(10)
    streams = [RawStream(channel, a.metadata) for _ in range(FLOOD_STREAMS - anonymous)]
    streams += [RawStream(channel, []) for _ in range(anonymous)]
    a.report.silent_streams += len(streams)
    await asyncio.sleep(0.5)  # every stream reaches the service
    described = await a.unary("Describe", b"", hostile=False)
    if described.what != "result":
        a.report.find(a.kind, a.index, f"Describe during a flood of silent streams: {described}")
    answers = await asyncio.gather(*(stream.read(patience) for stream in streams))
    for problem in {verdict(answer_of(answer), None) for answer in answers} - {None}:
        a.report.find(a.kind, a.index, f"a silent stream: {problem}")
    await channel.close()


# --- frames of an open session ------------------------------------------------------------------


def _forward(a: Attacker, rng: random.Random) -> pb.DeviceMessage:
    """A valid uncached or prefill step of 1 to 4 tokens."""
    return a.forward(hidden(rng, 1, rng.randrange(1, 5), a.target.identity.hidden_size), rng.choice([pb.CACHE_NONE, pb.CACHE_START]))


def _session_frame(name: str, weight: float, expect: frozenset[str] | None, build, cached: bool = False) -> None:
    async def play(a: Attacker, rng: random.Random) -> None:
        await a.session(cached=cached)
        await a.refused(build(a, rng), expect)
        if rng.random() < a.check_share:
            await a.still_serves()

    KINDS[name] = Kind(name, play, weight, expect)


def _lying_hidden(what: str):
    def build(a: Attacker, rng: random.Random) -> pb.DeviceMessage:
        frame = _forward(a, rng)
        lie_about(frame.forward.hidden, rng, what)
        return frame

    return build


def _masked(make_mask, tokens: int | None = None, batch: int = 1):
    def build(a: Attacker, rng: random.Random) -> pb.DeviceMessage:
        t = tokens if tokens is not None else rng.randrange(1, 5)
        frame = a.forward(tensor([batch, t, a.target.identity.hidden_size], data=bytes(4 * batch * t * a.target.identity.hidden_size)),
                          rng.choice([pb.CACHE_NONE, pb.CACHE_START]))
        frame.forward.attention_mask.CopyFrom(make_mask(rng, batch, t))
        return frame

    return build


def _stray_reply(a: Attacker, rng: random.Random) -> pb.DeviceMessage:
    layer = a.target.identity.adapter.device_layers
    reply = pb.AdapterReply(layer=layer, group="attn_in", phase=pb.PHASE_FORWARD, tensor=tensor([1, 1, a.target.width("attn_in", pb.PHASE_FORWARD)]))
    return pb.DeviceMessage(step=a.step, reply=reply)


def _hog(a: Attacker, rng: random.Random, tokens: int, cache: int, rows: int | None = None) -> pb.DeviceMessage:
    """A step of `tokens` tokens in all, of zeros, spread over `rows` rows (at random if None)."""
    rows = rows or rng.choice([1, 2, 4, 8, 16])
    per_row = max(1, tokens // rows)
    size = a.target.identity.hidden_size
    return a.forward(tensor([rows, per_row, size], data=bytes(4 * rows * per_row * size)), cache)


_session_frame("undecodable_step", CHEAP, VALID, lambda a, rng: rng.choice(UNDECODABLE))
_session_frame("random_bytes_step", CHEAP, None, lambda a, rng: rng.randbytes(rng.randrange(1, 300)))
_session_frame("empty_step", CHEAP, VALID, lambda a, rng: pb.DeviceMessage(step=a.step))
_session_frame("open_mid_session", CHEAP, SESSION, lambda a, rng: _opening(a))
_session_frame("stray_reply", CHEAP, SESSION, _stray_reply)
_session_frame("huge_dims_hidden", CHEAP, frozenset({"ValidationError", "CapacityError"}), _lying_hidden("huge"))
for _lie in ("negative", "zero", "too_many_dims", "width", "nan", "inf", "non_float_dtype", "payload"):
    _session_frame(f"{_lie}_hidden", CHEAP, VALID, _lying_hidden(_lie))
_session_frame("unknown_cache_mode", CHEAP, VALID, lambda a, rng: a.forward(hidden(rng, 1, 2, a.target.identity.hidden_size), rng.choice([3, 7, 2**31 - 1])))
_session_frame("batch_mismatch_extend", CHEAP, VALID, lambda a, rng: a.forward(hidden(rng, 2, 1, a.target.identity.hidden_size), pb.CACHE_EXTEND), cached=True)


def _keeping(a: Attacker, rng: random.Random, cache: int, keep: int) -> pb.DeviceMessage:
    frame = a.forward(hidden(rng, 1, 1, a.target.identity.hidden_size), cache)
    frame.forward.keep_cached = keep
    return frame


_session_frame("keep_more_than_cached", CHEAP, VALID,
               lambda a, rng: _keeping(a, rng, pb.CACHE_EXTEND, rng.choice([a.target.max_tokens + 1, 2**32 - 1])), cached=True)
_session_frame("keep_outside_extend", CHEAP, VALID,
               lambda a, rng: _keeping(a, rng, rng.choice([pb.CACHE_NONE, pb.CACHE_START]), rng.choice([0, 1])))
_session_frame("over_max_tokens", RARE, frozenset({"SessionError", "CapacityError"}),
               lambda a, rng: _hog(a, rng, a.target.max_tokens + 1, rng.choice([pb.CACHE_START, pb.CACHE_EXTEND]), rows=1), cached=True)
_session_frame("kv_hog", 0, CAPACITY, lambda a, rng: _hog(a, rng, 2 * a.target.max_tokens, pb.CACHE_START))
_session_frame("uncached_hog", 0, CAPACITY, lambda a, rng: _hog(a, rng, int(0.8 * a.target.max_message_bytes / (4 * a.target.identity.hidden_size)), pb.CACHE_NONE))
_session_frame("oversized_frame", 0, CAPACITY, lambda a, rng: _hog(a, rng, a.target.max_message_bytes // (4 * a.target.identity.hidden_size) + 1024, pb.CACHE_NONE))
_session_frame("backward_without_forward", CHEAP, SESSION, lambda a, rng: a.backward(tensor([1, 2, a.target.identity.hidden_size])))

_session_frame("mask_nan", CHEAP, VALID, _masked(lambda rng, b, t: tensor([b, t], fill=float("nan"))))
_session_frame("mask_wrong_length", CHEAP, VALID, _masked(lambda rng, b, t: int64s([b, t + 3], [1] * (b * (t + 3)))))
_session_frame("mask_4d", CHEAP, VALID, _masked(lambda rng, b, t: int64s([b, 1, t, t], [1] * (b * t * t))))
_session_frame("mask_value_7", CHEAP, VALID, _masked(lambda rng, b, t: int64s([b, t], [7] * (b * t))))
_session_frame("mask_all_zeros", CHEAP, VALID, _masked(lambda rng, b, t: int64s([b, t], [0] * (b * t))))
_session_frame("mask_batch_mismatch", CHEAP, VALID, _masked(lambda rng, b, t: int64s([b + 1, t], [1] * ((b + 1) * t))))
_session_frame("mask_one_million", 0, VALID, _masked(lambda rng, b, t: int64s([1, 1_000_000], [1] * 1_000_000)))
_session_frame("mask_empty_batch_5000_tokens", RARE, frozenset({"ValidationError", "CapacityError"}),
               _masked(lambda rng, b, t: int64s([0, 5000], []), tokens=5000, batch=0))


@attack(RARE, SESSION)
async def extend_without_start(a: Attacker, rng: random.Random) -> None:
    await a.fresh_session()
    await a.refused(a.forward(hidden(rng, 1, 1, a.target.identity.hidden_size), pb.CACHE_EXTEND), SESSION)
    await a.still_serves()


@attack(IN_STEP)
async def lying_backward(a: Attacker, rng: random.Random) -> None:
    """A training step whose backward carries a gradient that lies: its shape, dims, dtype, NaN or Inf."""
    await a.session()
    tokens, size = rng.randrange(1, 5), a.target.identity.hidden_size
    await a.valid_step(a.forward(hidden(rng, 1, tokens, size), train=True))
    frame = a.backward(tensor([1, tokens, size], fill=0.01))
    lie_about(frame.backward.grad_hidden, rng, rng.choice(["width", "nan", "inf", "non_float_dtype", "zero", "negative"]))
    await a.refused(frame, VALID)
    await a.still_serves()


# --- a device's replies in the middle of a step -------------------------------------------------


def _reply_frame(name: str, weight: float, expect: frozenset[str] | None, build) -> None:
    async def play(a: Attacker, rng: random.Random) -> None:
        request = await a.mid_step(rng)
        await a.refused(build(a, a.reply_to(request), rng), expect, in_step=True)
        if rng.random() < a.check_share:
            await a.still_serves()

    KINDS[name] = Kind(name, play, weight, expect, mid_step=True)


def _lying_reply(what: str):
    def build(a: Attacker, frame: pb.DeviceMessage, rng: random.Random) -> pb.DeviceMessage:
        lie_about(frame.reply.tensor, rng, what)
        return frame

    return build


def _mislabelled(field: str):
    def build(a: Attacker, frame: pb.DeviceMessage, rng: random.Random) -> pb.DeviceMessage:
        reply = frame.reply
        if field == "layer":
            reply.layer = (reply.layer + rng.randrange(1, 2**32)) % 2**32
        elif field == "group":
            reply.group = rng.choice(["mlp_in", "", "attn_in ", "g" * 10_000])
        elif field == "phase":
            reply.phase = rng.choice([1 - reply.phase, 7])
        else:
            frame.step = (frame.step + rng.randrange(1, 2**63)) % 2**64
        return frame

    return build


_reply_frame("undecodable_reply", IN_STEP, VALID, lambda a, frame, rng: rng.choice(UNDECODABLE))
_reply_frame("random_bytes_reply", IN_STEP, None, lambda a, frame, rng: rng.randbytes(rng.randrange(1, 300)))
_reply_frame("not_utf8_group_reply", IN_STEP, VALID, lambda a, frame, rng: not_utf8(frame, frame.reply, "group"))
_reply_frame("empty_reply", IN_STEP, VALID, lambda a, frame, rng: pb.DeviceMessage(step=frame.step))
_reply_frame("forward_instead_of_reply", IN_STEP, frozenset({"ValidationError", "SessionError"}),
             lambda a, frame, rng: _forward(a, rng))
_reply_frame("huge_dims_reply", IN_STEP, frozenset({"ValidationError", "CapacityError"}), _lying_reply("huge"))
for _lie in ("negative", "zero", "too_many_dims", "width", "nan", "inf", "dtype", "payload"):
    _reply_frame(f"{_lie}_reply", IN_STEP, VALID, _lying_reply(_lie))
for _field in ("layer", "group", "phase", "step"):
    _reply_frame(f"wrong_{_field}_reply", IN_STEP, VALID, _mislabelled(_field))


@attack(RARE, None, mid_step=True)
async def slow_reply(a: Attacker, rng: random.Random) -> None:
    """A valid reply, late. Serving it and refusing it (a late row taken out of its batch) are both right."""
    request = await a.mid_step(rng)
    delay = rng.uniform(0.05, 0.6)
    await asyncio.sleep(delay)
    a.report.frames += 1
    if not await a.current.send(a.reply_to(request)):  # the service ended the session meanwhile; how is lost
        if not a.report.crowded:
            a.report.find(a.kind, a.index, f"the session ended before a reply {delay:.2f} s late, within the reply timeout")
        a.report.load_refusals += a.report.crowded
        a.drop()
        return
    got = answer_of(await a.run_step())
    problem = None if got.what == "result" else verdict(got, None)
    if problem:
        a.report.find(a.kind, a.index, problem)
    if got.what not in ("error", "result") or got.fatal:
        a.drop()
    await a.still_serves()


@attack(0, frozenset({"TransportError", "DEADLINE_EXCEEDED"}), mid_step=True)
async def no_reply(a: Attacker, rng: random.Random) -> None:
    """The device reads the request and never replies: its session fails after the reply timeout."""
    await a.mid_step(rng)
    a.report.frames += 1
    got = answer_of(await a.current.read(a.patience_s))
    if got.what == "request":  # not a late row: a device past its reply timeout is not asked again
        a.report.find(a.kind, a.index, f"past the reply timeout, the service asked again ({got.detail}) instead of ending the session")
    elif problem := verdict(got, KINDS["no_reply"].expect):
        a.report.find(a.kind, a.index, problem)
    a.drop()


async def _vanish_mid_step(a: Attacker, rng: random.Random, how: str) -> None:
    request = await a.mid_step(rng)
    if rng.random() < 0.5:
        await a.current.send(a.reply_to(request))  # and go away before the service's next message
    await a.vanish(how)


for _how in ("cancel", "disconnect", "half_close"):
    KINDS[f"{_how}_mid_step"] = Kind(f"{_how}_mid_step", lambda a, rng, how=_how: _vanish_mid_step(a, rng, how), RARE, None, mid_step=True)


@attack(RARE, None)
async def cancel_after_open(a: Attacker, rng: random.Random) -> None:
    await a.fresh_session()
    await a.vanish(rng.choice(["cancel", "half_close", "disconnect"]))


@attack(RARE, None)
async def vanish_holding_a_graph(a: Attacker, rng: random.Random) -> None:
    """A training forward whose backward never comes: the graph is freed with the session."""
    await a.session()
    tokens = rng.randrange(8, 64)
    await a.valid_step(a.forward(tensor([1, tokens, a.target.identity.hidden_size], fill=0.1), train=True))
    await a.vanish(rng.choice(["cancel", "disconnect"]))


@attack(0, None)
async def never_read(a: Attacker, rng: random.Random) -> None:
    """The device sends a step that makes the service write more than a flow-control window, then
    neither reads nor replies, nor closes. The service's writes and its wait for the reply both
    have deadlines, so the session ends within the two together."""
    await a.fresh_session()
    tokens = min(a.target.max_tokens, 4096)
    a.report.frames += 1
    old = a.current
    await old.send(a.forward(tensor([1, tokens, a.target.identity.hidden_size], fill=0.1)))
    sent = time.monotonic()
    a.current, a.cached = None, False
    await a.reopen_after(sent, a.target.write_timeout_s + a.target.reply_timeout_s)
    old.cancel()


# --- enrollment and the bundle -----------------------------------------------------------------


@attack(RARE, frozenset({"AuthenticationError", "CapacityError"}))
async def register_without_enrollment(a: Attacker, rng: random.Random) -> None:
    request = pb.RegisterRequest(label=rng.choice(["", "hostile", "l" * 10_000])).SerializeToString()
    for answer in await asyncio.gather(*(a.unary("Register", request) for _ in range(rng.randrange(1, 4)))):
        a.note(answer, KINDS["register_without_enrollment"].expect)


@attack(0, frozenset({"AuthenticationError", "CapacityError"}))
async def register_flood(a: Attacker, rng: random.Random) -> None:
    request = pb.RegisterRequest(label="flood").SerializeToString()
    for answer in await asyncio.gather(*(a.unary("Register", request) for _ in range(25))):
        a.note(answer, KINDS["register_flood"].expect)


@attack(RARE)
async def undecodable_unary(a: Attacker, rng: random.Random) -> None:
    method = rng.choice(["Register", "Describe", "DownloadBundle"])
    a.note(await a.unary(method, rng.choice(UNDECODABLE), a.metadata), VALID)


@attack(RARE, frozenset({"AuthenticationError"}))
async def bundle_without_credentials(a: Attacker, rng: random.Random) -> None:
    request = pb.BundleRequest(backbone=a.target.identity.version).SerializeToString()
    a.note(await a.unary("DownloadBundle", request, rng.choice([[], [(wire.DEVICE_HEADER, "f" * 32)]])), KINDS["bundle_without_credentials"].expect)


@attack(RARE, frozenset({"VersionMismatchError", "RegistryError"}))
async def bundle_of_unknown_version(a: Attacker, rng: random.Random) -> None:
    request = pb.BundleRequest(backbone=rng.choice(["no-such-version", "../" * 50, "v" * 10_000])).SerializeToString()
    a.note(await a.unary("DownloadBundle", request, a.metadata), KINDS["bundle_of_unknown_version"].expect)
