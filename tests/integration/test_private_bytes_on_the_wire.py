"""M never leaves the device, checked on the bytes the device puts on the wire.

Checking the messages handed to the link (test_service.py) proves only that no tensor shares
memory with M: a copy of M would pass. Here the serialized frames of the session stream are
captured as gRPC sends them, decoded with the protocol's own decoder, and searched for M and
its gradient, every value either took during training and generation. A second test makes
the device leak M into its replies and shows that the same search finds it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from google.protobuf.message import Message

from plora.clients.data import TokenizedExample
from plora.clients.generation import stream_tokens
from plora.clients.grpc_link import Endpoint
from plora.clients.remote import RemoteDecoder
from plora.clients.training import TrainSettings, personalize
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol import split_pb2 as pb, wire
from plora.cloud_backbone.server import start_service
from plora.cloud_backbone.service import Limits
from plora.platform.runtime import init_device, open_device
from plora.storage.registry import open_registry

CONFIG = PrivateLoRAConfig(rank=4, device_layers=1)
EXAMPLE = list(range(10, 30))
PROMPT = list(range(40, 48))  # at least r tokens, so one reply holds an r x r block


@pytest.fixture
def sent_frames(monkeypatch) -> list[bytes]:
    """Every frame the device sends on a session stream, as the bytes gRPC writes."""
    frames: list[bytes] = []
    open_channel = Endpoint.channel

    def channel(endpoint):
        opened = open_channel(endpoint)
        stream_stream = opened.stream_stream

        def recording_stream_stream(method, request_serializer=None, **kwargs):
            if method == wire.SESSION_METHOD:
                def serialize(message):
                    frames.append(request_serializer(message))
                    return frames[-1]

                return stream_stream(method, request_serializer=serialize, **kwargs)
            return stream_stream(method, request_serializer=request_serializer, **kwargs)

        opened.stream_stream = recording_stream_stream
        return opened

    monkeypatch.setattr(Endpoint, "channel", channel)
    return frames


@pytest.fixture
def device(tmp_path, tiny_checkpoint, sent_frames):
    server = start_service([str(tiny_checkpoint)], CONFIG, open_registry(), Limits(reply_timeout_s=5))
    endpoint = Endpoint(f"127.0.0.1:{server.port}", insecure=True)
    init_device(tmp_path / "dev", endpoint.address, endpoint=endpoint, enroll_token=open_registry().issue_enrollment_token()[1])
    dev = open_device(tmp_path / "dev")  # its session stream opens on a recording channel
    yield dev
    dev.close()
    server.stop(grace_s=1)


def tensors_in(frames: list[bytes]) -> list[torch.Tensor]:
    """Every tensor of every frame, wherever it sits in the message, decoded as the cloud would."""
    found: list[torch.Tensor] = []

    def walk(message) -> None:
        if isinstance(message, pb.Tensor):
            found.append(wire.tensor_from_proto(message, 1 << 24))
            return
        for field, value in message.ListFields():
            if field.message_type is not None:
                for item in [value] if isinstance(value, Message) else value:  # one, or a repeated field
                    walk(item)

    for frame in frames:
        walk(pb.DeviceMessage.FromString(frame))
    return found


def carries(sent: torch.Tensor, secret: torch.Tensor) -> bool:
    """Whether `sent` holds the r x r `secret` (or its transpose) in r consecutive rows by r
    consecutive columns of `sent` as a (-1, last dim) matrix, or as r*r consecutive values."""
    if not sent.is_floating_point():
        return False
    r, dtype = secret.shape[0], sent.dtype
    # Equal up to the wire dtype's rounding: a copy is exact in float32, rounded in 16 bits.
    tol = 2 * torch.finfo(dtype).eps * secret.abs().max()
    sent = sent.float()
    rows = sent.reshape(-1, sent.shape[-1]) if sent.dim() else sent.reshape(1, 1)
    flat = sent.reshape(-1)
    for candidate in (secret, secret.T):
        candidate = candidate.to(dtype).float()
        if rows.shape[0] >= r and rows.shape[1] >= r:
            blocks = rows.unfold(0, r, 1).unfold(1, r, 1)  # (rows - r + 1, cols - r + 1, r, r)
            if ((blocks - candidate).abs().amax((-2, -1)) <= tol).any():
                return True
        if flat.numel() >= r * r and ((flat.unfold(0, r * r, 1) - candidate.reshape(-1)).abs().amax(-1) <= tol).any():
            return True
    return False


def leaked(frames: list[bytes], secrets: list[torch.Tensor]) -> bool:
    return any(carries(sent, secret) for sent in tensors_in(frames) for secret in secrets)


def train_then_generate(device, frames: list[bytes]) -> list[torch.Tensor]:
    """Train a few steps from a random M and generate from the result; returns every M and
    dL/dM the device held, and checks that both phases sent tensors."""
    ms = list(device.model.weights.ms.values())
    torch.manual_seed(1)
    with torch.no_grad():
        for m in ms:
            m.normal_(0, 0.3)  # M = 0, the default start, would be found in any block of zeros
    secrets = [m.detach().clone() for m in ms]

    def keep_step(*_):
        secrets.extend(t.detach().clone() for m in ms for t in (m, m.grad))

    settings = TrainSettings(steps=3, lr=0.05, batch_size=1)
    personalize(device.model, [TokenizedExample(EXAMPLE, EXAMPLE)], 0, settings, on_step=keep_step)
    trained = len(frames)
    generated = list(stream_tokens(device.model, PROMPT, max_new_tokens=4, stop_ids=set()))
    assert len(generated) == 4
    assert tensors_in(frames[:trained]) and tensors_in(frames[trained:])
    assert len(secrets) == len(ms) * (1 + 2 * settings.steps)
    assert all(secret.abs().max() > 0 for secret in secrets)
    assert all(not torch.equal(before, m) for before, m in zip(secrets, ms))  # training moved every M
    return secrets


def test_no_frame_the_device_sends_carries_m_or_its_gradient(device, sent_frames):
    secrets = train_then_generate(device, sent_frames)
    # Every frame the link counted was captured, so nothing crossed unsearched.
    assert sum(map(len, sent_frames)) == device.model.link.wire_bytes["up"]
    assert not leaked(sent_frames, secrets)


def test_the_search_finds_m_that_a_leaking_device_sends(device, sent_frames, monkeypatch):
    honest = RemoteDecoder._answer_forward

    def leaking(self, kept):
        answer = honest(self, kept)

        def answer_with_m(request):
            reply = answer(request)
            m = self.weights.group_ms(request.layer, request.group)[0].detach()
            rows = reply.tensor.reshape(-1, reply.tensor.shape[-1]).clone()
            if rows.shape[0] < m.shape[0]:
                return reply  # a decoding step's single row has no room for r rows of M
            rows[: m.shape[0], : m.shape[1]] = m
            return dataclasses.replace(reply, tensor=rows.reshape(reply.tensor.shape))

        return answer_with_m

    monkeypatch.setattr(RemoteDecoder, "_answer_forward", leaking)
    secrets = train_then_generate(device, sent_frames)
    assert leaked(sent_frames, secrets)
