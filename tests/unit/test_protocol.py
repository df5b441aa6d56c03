"""The cloud session's checks on what a device sends, and the session's state rules."""

from __future__ import annotations

import dataclasses
import logging
import sys

import pytest
import torch
from grpc._cython import cygrpc

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.compute import CloudHalf
from plora.cloud_backbone.server import PeerGone
from plora.cloud_backbone.protocol.messages import (
    AdapterReply,
    BackboneIdentity,
    BackwardRequest,
    CacheMode,
    ForwardRequest,
    Phase,
)
from plora.storage.errors import CapacityError, SessionError, ValidationError, VersionMismatchError
from tests.conftest import tiny_backbone

CONFIG = PrivateLoRAConfig(rank=4)


def honest(request):
    """A device with M = 0 that answers correctly."""
    width = 3 * CONFIG.rank
    return AdapterReply(request.layer, request.group, request.phase, torch.zeros(*request.tensor.shape[:-1], width))


def tampered(change):
    def handler(request):
        return change(honest(request))

    return handler


@pytest.fixture
def session():
    return CloudHalf(tiny_backbone(), CONFIG).open_session(max_tokens=16)


def hidden(tokens=5):
    return torch.randn(1, tokens, 32)


@pytest.mark.parametrize(
    "handler, message",
    [
        pytest.param(tampered(lambda r: dataclasses.replace(r, tensor=r.tensor[..., :-1])), "shape", id="wrong-shape"),
        pytest.param(tampered(lambda r: dataclasses.replace(r, tensor=r.tensor.double())), "dtype", id="wrong-dtype"),
        pytest.param(tampered(lambda r: dataclasses.replace(r, tensor=r.tensor + float("nan"))), "NaN", id="nan"),
        pytest.param(tampered(lambda r: dataclasses.replace(r, layer=r.layer + 1)), "expected layer", id="wrong-layer"),
        pytest.param(tampered(lambda r: dataclasses.replace(r, phase=Phase.BACKWARD)), "expected layer", id="wrong-phase"),
        pytest.param(tampered(lambda r: "not a reply"), "AdapterReply", id="not-a-reply"),
    ],
)
def test_malformed_device_replies_are_refused_with_a_clear_error(session, handler, message):
    with pytest.raises(ValidationError, match=message):
        session.forward(ForwardRequest(hidden()), handler)
    # The session stays usable for a well-behaved next step.
    assert session.forward(ForwardRequest(hidden()), honest).hidden.shape == (1, 5, 32)


@pytest.mark.parametrize(
    "tensor, message",
    [
        pytest.param(torch.randn(1, 5, 31), "shape", id="wrong-width"),
        pytest.param(torch.randn(5, 32), "hidden state must be", id="missing-batch"),
        pytest.param(torch.randn(1, 5, 32).half(), "dtype", id="half"),
        pytest.param(torch.full((1, 5, 32), float("inf")), "NaN or infinity", id="infinite"),
    ],
)
def test_malformed_hidden_states_are_refused(session, tensor, message):
    with pytest.raises(ValidationError, match=message):
        session.forward(ForwardRequest(tensor), honest)


def test_session_state_rules(session):
    with pytest.raises(SessionError, match="START"):
        session.forward(ForwardRequest(hidden(1), cache=CacheMode.EXTEND), honest)
    with pytest.raises(SessionError, match="preceding forward"):
        session.backward(BackwardRequest(torch.zeros(1, 5, 32)), honest)
    session.forward(ForwardRequest(hidden(10), cache=CacheMode.START), honest)
    with pytest.raises(CapacityError, match="over its limit of 16"):
        session.forward(ForwardRequest(hidden(7), cache=CacheMode.EXTEND), honest)
    session.forward(ForwardRequest(hidden(6), cache=CacheMode.EXTEND), honest)  # exactly at the limit


def test_the_token_limit_counts_the_positions_of_every_row(session):
    with pytest.raises(CapacityError, match=r"2×10 cached positions"):
        session.forward(ForwardRequest(torch.randn(2, 10, 32), cache=CacheMode.START), honest)
    session.forward(ForwardRequest(torch.randn(2, 8, 32), cache=CacheMode.START), honest)


def test_backward_checks_the_gradient_and_is_single_use(session):
    session.forward(ForwardRequest(hidden(), train=True), honest)
    with pytest.raises(ValidationError, match="gradient"):
        session.backward(BackwardRequest(torch.zeros(1, 4, 32)), honest)
    session.forward(ForwardRequest(hidden(), train=True), honest)
    result = session.backward(BackwardRequest(torch.ones(1, 5, 32), want_input_grad=True), honest)
    assert result.grad_input.shape == (1, 5, 32)
    with pytest.raises(SessionError):
        session.backward(BackwardRequest(torch.ones(1, 5, 32)), honest)


def test_identity_mismatch_names_each_differing_field(session):
    served = session.identity
    expected = dataclasses.replace(served, content_hash="other", adapter=PrivateLoRAConfig(rank=8))
    with pytest.raises(VersionMismatchError, match="content_hash: 'other' vs 'tiny-hash-0'.*rank: 8 vs 4"):
        served.require_match(expected)
    served.require_match(BackboneIdentity(**vars(served)))


def test_a_status_the_device_left_before_is_one_line_in_the_log_not_a_traceback():
    def record(error: BaseException) -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            return logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1, "ExecuteBatchError raised in core",
                                     None, sys.exc_info())

    gone = record(cygrpc.ExecuteBatchError('Failed "execute_batch": (<grpc._cython.cygrpc.SendStatusFromServerOperation>,)'))
    assert PeerGone().filter(gone) and gone.exc_info is None and gone.levelno == logging.INFO
    other = record(cygrpc.ExecuteBatchError('Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation>,)'))
    assert PeerGone().filter(other) and other.exc_info is not None and other.levelno == logging.ERROR
