"""The device against a hostile service over real gRPC: a frame of another step, a flood of
error text or an error that names no plora error gets a typed error, kept short; a frame out
of step closes the session (tests/unit/test_hostile_cloud.py checks what the frames carry, and M)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest
import torch

from plora.clients.grpc_link import Credentials, Endpoint, _Session
from plora.clients.recovery import ConnectionLost
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol import split_pb2 as pb, wire
from plora.cloud_backbone.protocol.messages import (
    AdapterRequest,
    BackboneIdentity,
    ForwardRequest,
    ForwardResult,
    OpenSession,
    Phase,
    SessionOpened,
    StepError,
)
from plora.storage.errors import CapacityError, TransportError, ValidationError

IDENTITY = BackboneIdentity("hostile", "0" * 64, 4, 32, PrivateLoRAConfig(rank=4))
HIDDEN = torch.zeros(1, 3, 32)

ANSWERS = {
    "another step's result": lambda step: [wire.cloud_message(step + 1, ForwardResult(HIDDEN))],
    "an earlier step's adapter request": lambda step: [
        wire.cloud_message(step - 1, AdapterRequest(0, "attn_in", Phase.FORWARD, torch.zeros(1, 3, 4)))
    ],
    "an error of a megabyte": lambda step: [wire.cloud_message(step, StepError("ValidationError", "x" * (1 << 20)))],
    "an error of no plora kind": lambda step: [wire.cloud_message(step, StepError("SystemExit" * 1000, "bye"))],
}
EXPECTED = {  # the error, its text, and whether the session ends (a refusal the service reports leaves it open)
    "another step's result": (ValidationError, "step 2 during step 1", True),
    "an earlier step's adapter request": (ValidationError, "step 0 during step 1", True),
    "an error of a megabyte": (ValidationError, "x" * 100, False),
    "an error of no plora kind": (TransportError, "bye", False),
}


@contextmanager
def serving(answer):
    """A Session method that opens honestly, then answers each step with the frames of
    `answer(step, context)`, and ends the stream where that returns True."""

    def session(frames, context):
        for frame in frames:
            step, message = wire.parse_device_message(frame, 1 << 20)
            if isinstance(message, OpenSession):
                yield wire.cloud_message(step, SessionOpened("hostile-session", IDENTITY, 4096))
            elif (yield from answer(step, context)):
                return

    handler = grpc.stream_stream_rpc_method_handler(
        session, request_deserializer=pb.DeviceMessage.FromString, response_serializer=pb.CloudMessage.SerializeToString
    )
    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE, {"Session": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Endpoint(f"127.0.0.1:{port}", insecure=True)
    finally:
        server.stop(0)


@pytest.fixture
def hostile_service(request):
    answer = ANSWERS[request.param]
    with serving(lambda step, context: answer(step)) as endpoint:
        yield request.param, endpoint


@pytest.mark.parametrize("hostile_service", list(ANSWERS), indirect=True)
def test_a_hostile_service_gets_a_typed_short_error(hostile_service):
    case, endpoint = hostile_service
    session = _Session(endpoint, Credentials("device", "token"), IDENTITY, 10.0, lambda direction, size: None)
    kind, text, ends = EXPECTED[case]
    with pytest.raises(kind, match=text) as raised:
        session.step(ForwardRequest(HIDDEN), lambda request: pytest.fail("answered a request of another step"), ForwardResult)
    assert type(raised.value) is kind and len(str(raised.value)) <= wire.MAX_ERROR_CHARS
    assert session.over == ends
    session.close()


ENDINGS = {  # how the service ends the stream while the device answers its request, and what the step raises
    "ends it": (None, ConnectionLost, "the service ended the session stream"),
    "aborts it": ((grpc.StatusCode.RESOURCE_EXHAUSTED, "CapacityError: full"), CapacityError, "full"),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_stream_ended_while_the_device_answers_fails_the_step_at_once(ending):
    """The device answers on gRPC's request thread, which gRPC gives up once the stream is over,
    with the answer unsent: the step still learns of the end at once, not when its reply times out."""
    abort, kind, text = ENDINGS[ending]

    def answer(step, context):
        yield wire.cloud_message(step, AdapterRequest(0, "attn_in", Phase.FORWARD, torch.zeros(1, 3, 4)))
        if abort is not None:
            context.abort(*abort)
        return True

    def slow_answer(request):
        time.sleep(0.5)  # the stream is over before the answer is handed to gRPC
        return request.answer(torch.zeros(1, 3, 12))

    with serving(answer) as endpoint:
        session = _Session(endpoint, Credentials("device", "token"), IDENTITY, 30.0, lambda direction, size: None)
        started = time.monotonic()
        with pytest.raises(kind, match=text):
            session.step(ForwardRequest(HIDDEN), slow_answer, ForwardResult)
        assert time.monotonic() - started < 5, "the step waited for its reply to time out"
        assert session.over
