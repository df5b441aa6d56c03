"""The wire format: every protocol message survives protobuf, malformed input is refused,
bundles arrive whole or not at all, and the committed generated code matches split.proto."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol.messages import (
    AdapterReply,
    AdapterRequest,
    BackboneIdentity,
    BackwardRequest,
    BackwardResult,
    CacheMode,
    ForwardRequest,
    ForwardResult,
    HostedBackbone,
    OpenSession,
    Phase,
    SessionOpened,
    StepError,
)
from plora.cloud_backbone.protocol import split_pb2 as pb
from plora.cloud_backbone.protocol import bundle, wire
from plora.storage.errors import ValidationError
from plora.storage.registry import JobReport

LIMIT = 1 << 20
PROTOCOL_DIR = Path(wire.__file__).parent
IDENTITY = BackboneIdentity(
    name="tiny", content_hash="ab" * 32, num_layers=4, hidden_size=8,
    adapter=PrivateLoRAConfig(rank=4, targets=("q", "v", "gate"), shared_a=True, scale=0.5, seed=7, device_layers=1),
)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + 1)).to(dtype)


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # bitwise


def _same_message(a, b) -> None:
    assert type(a) is type(b)
    for key, value in vars(a).items():
        other = getattr(b, key)
        if isinstance(value, torch.Tensor) or value is None:
            _same_tensor(value, other)
        else:
            assert value == other, key


DEVICE_MESSAGES = [
    OpenSession(IDENTITY, max_tokens=512),
    OpenSession(dataclasses.replace(IDENTITY, adapter=dataclasses.replace(IDENTITY.adapter, adapt_layers=(1, 3))), 64),
    OpenSession(dataclasses.replace(IDENTITY, adapter=dataclasses.replace(IDENTITY.adapter, device_last_layers=1)), 64),
    ForwardRequest(_rand(2, 3, 8)),
    ForwardRequest(_rand(2, 3, 8, dtype=torch.bfloat16), CacheMode.START, True, torch.ones(2, 3, dtype=torch.int64)),
    ForwardRequest(_rand(1, 1, 8, dtype=torch.float16), CacheMode.EXTEND),
    ForwardRequest(_rand(1, 4, 8), CacheMode.EXTEND, keep_cached=0),  # 0 is a value, not "absent"
    ForwardRequest(_rand(1, 4, 8), CacheMode.EXTEND, keep_cached=17),
    ForwardRequest(_rand(1, 4, 8), CacheMode.START, exchange_dtype=torch.float16),
    BackwardRequest(_rand(2, 3, 8), want_input_grad=True),
    BackwardRequest(_rand(2, 3, 8), exchange_dtype=torch.bfloat16),
    AdapterReply(3, "attn_in", Phase.FORWARD, _rand(2, 3, 8, dtype=torch.bfloat16)),
    AdapterReply(0, "mlp_in", Phase.BACKWARD, _rand(2, 3, 4, dtype=torch.float16)),
    AdapterReply(0, "mlp_in", Phase.BACKWARD, _rand(1, 3, 4, dtype=torch.float16), start=300),
]
CLOUD_MESSAGES = [
    SessionOpened("s-1", IDENTITY, 2048),
    AdapterRequest(2, "attn_in", Phase.FORWARD, _rand(2, 3, 4)),
    AdapterRequest(1, "mlp_in", Phase.BACKWARD, _rand(2, 3, 8, dtype=torch.bfloat16)),
    AdapterRequest(1, "mlp_in", Phase.FORWARD, _rand(1, 3, 8), start=2**32 - 1),
    ForwardResult(_rand(2, 3, 8, dtype=torch.float16)),
    BackwardResult(_rand(2, 3, 8)),
    BackwardResult(None),
    StepError("ValidationError", "bad tensor", fatal=True),
]


@pytest.mark.parametrize("message", DEVICE_MESSAGES, ids=lambda m: type(m).__name__)
def test_device_messages_round_trip_bitwise(message):
    encoded = pb.DeviceMessage.FromString(wire.device_message(41, message).SerializeToString())
    step, decoded = wire.parse_device_message(encoded, LIMIT)
    assert step == 41
    _same_message(message, decoded)


@pytest.mark.parametrize("message", CLOUD_MESSAGES, ids=lambda m: type(m).__name__)
def test_cloud_messages_round_trip_bitwise(message):
    encoded = pb.CloudMessage.FromString(wire.cloud_message(7, message).SerializeToString())
    step, decoded = wire.parse_cloud_message(encoded, LIMIT)
    assert step == 7
    _same_message(message, decoded)


def test_absent_optional_tensors_stay_absent():
    fwd = wire.device_message(0, ForwardRequest(_rand(1, 2, 8)))
    assert not fwd.forward.HasField("attention_mask") and not fwd.forward.HasField("keep_cached")
    assert not wire.cloud_message(0, BackwardResult(None)).backward.HasField("grad_input")


@pytest.mark.parametrize("identity", [IDENTITY, dataclasses.replace(IDENTITY, adapter=PrivateLoRAConfig(projections="principal"))],
                         ids=["random", "principal"])
def test_identity_round_trips_and_still_matches(identity):
    decoded = wire.identity_from_proto(pb.BackboneIdentity.FromString(wire.identity_to_proto(identity).SerializeToString()))
    assert decoded == identity
    decoded.require_match(identity)


def test_invalid_adapter_config_is_a_validation_error():
    msg = wire.identity_to_proto(IDENTITY)
    msg.adapter.targets.append("nope")
    with pytest.raises(ValidationError, match="nope"):
        wire.identity_from_proto(msg)
    msg = wire.identity_to_proto(IDENTITY)
    msg.adapter.rank = 0
    with pytest.raises(ValidationError, match="rank"):
        wire.identity_from_proto(msg)
    msg = wire.identity_to_proto(IDENTITY)
    msg.adapter.projections = "learned"
    with pytest.raises(ValidationError, match="learned"):
        wire.identity_from_proto(msg)


HOSTED = HostedBackbone(IDENTITY, "0f" * 32, 12345, is_default=True)


def test_a_hosted_version_round_trips():
    decoded = wire.hosted_from_proto(pb.HostedBackbone.FromString(wire.hosted_to_proto(HOSTED).SerializeToString()))
    assert decoded == HOSTED


@pytest.mark.parametrize(
    "mangle, match",
    [
        (lambda m: m.ClearField("bundle"), "bundle is missing"),
        (lambda m: m.ClearField("identity"), "identity is missing"),
        (lambda m: setattr(m.bundle, "sha256", "../../etc"), "64 lowercase hex"),
        (lambda m: setattr(m.bundle, "sha256", "0F" * 32), "64 lowercase hex"),
        (lambda m: setattr(m.bundle, "size", 0), "size is 0"),
    ],
    ids=["no bundle", "no identity", "digest not hex", "digest upper case", "empty bundle"],
)
def test_a_malformed_hosted_version_is_refused(mangle, match):
    msg = wire.hosted_to_proto(HOSTED)
    mangle(msg)
    with pytest.raises(ValidationError, match=match):
        wire.hosted_from_proto(msg)


def test_frames_round_trip_and_garbage_is_a_validation_error():
    step, decoded = wire.parse_cloud_frame(wire.cloud_frame(3, CLOUD_MESSAGES[1]), LIMIT)
    assert step == 3
    _same_message(decoded, CLOUD_MESSAGES[1])
    assert pb.DeviceMessage.FromString(wire.device_frame(4, DEVICE_MESSAGES[0])).step == 4
    with pytest.raises(ValidationError, match="4-byte frame is not a CloudMessage"):
        wire.parse_cloud_frame(b"\xff\xff\xff\xff", LIMIT)


def test_messages_going_the_wrong_way_are_refused():
    with pytest.raises(ValidationError, match="device to cloud"):
        wire.device_message(0, ForwardResult(_rand(1, 1, 8)))
    with pytest.raises(ValidationError, match="cloud to device"):
        wire.cloud_message(0, ForwardRequest(_rand(1, 1, 8)))


def test_empty_oneof_is_refused():
    with pytest.raises(ValidationError, match="empty message"):
        wire.parse_device_message(pb.DeviceMessage(step=1), LIMIT)
    with pytest.raises(ValidationError, match="empty message"):
        wire.parse_cloud_message(pb.CloudMessage(step=1), LIMIT)


def test_unknown_enum_values_are_refused():
    msg = wire.device_message(0, ForwardRequest(_rand(1, 1, 8)))
    msg.forward.cache = 9  # proto3 enums are open: an unknown value parses as a plain int
    with pytest.raises(ValidationError, match="cache"):
        wire.parse_device_message(msg, LIMIT)
    msg = wire.cloud_message(0, CLOUD_MESSAGES[1])
    msg.request.phase = 5
    with pytest.raises(ValidationError, match="phase"):
        wire.parse_cloud_message(msg, LIMIT)


@pytest.mark.parametrize("code", [pb.INT64, 77])
def test_exchanges_cross_only_in_a_float_dtype_of_the_wire(code):
    for message, body in ((ForwardRequest(_rand(1, 1, 8)), "forward"), (BackwardRequest(_rand(1, 1, 8)), "backward")):
        msg = wire.device_message(0, message)
        getattr(msg, body).exchange_dtype = code
        with pytest.raises(ValidationError, match="exchange_dtype"):
            wire.parse_device_message(msg, LIMIT)
    with pytest.raises(ValidationError, match="exchanges cannot cross"):
        wire.device_message(0, ForwardRequest(_rand(1, 1, 8), exchange_dtype=torch.int64))


def test_a_step_names_its_exchanges_dtype_apart_from_its_cut():
    default = wire.WireDtypes()
    sent = default.request(ForwardRequest(_rand(1, 2, 8)))
    assert sent.hidden.dtype == torch.float32 and sent.exchange_dtype == torch.float16
    assert wire.step_dtypes(wire.parse_device_message(wire.device_message(0, sent), LIMIT)[1]) == default
    # A device that names none speaks the cut's dtype in the exchanges too, as before the field.
    half = wire.WireDtypes(torch.float16, torch.float16).request(BackwardRequest(_rand(1, 2, 8)))
    assert half.exchange_dtype is None and wire.step_dtypes(half) == wire.WireDtypes(torch.float16, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_large_exchange_is_cut_into_pieces_along_its_tokens_and_their_replies_join_back(monkeypatch, dtype):
    monkeypatch.setattr(wire, "PIECE_BYTES", 100)
    request = AdapterRequest(3, "attn_in", Phase.BACKWARD, _rand(2, 7, 4))
    sent = wire.pieces(request, dtype)
    tokens = 100 // (2 * 4 * torch.empty((), dtype=dtype).element_size())  # a piece's, within PIECE_BYTES
    assert [piece.start for piece in sent] == list(range(0, 7, tokens)) and len(sent) > 1
    assert torch.equal(torch.cat([piece.tensor for piece in sent], dim=1), request.tensor)
    assert all((p.layer, p.group, p.phase) == (3, "attn_in", Phase.BACKWARD) for p in sent)
    replies = [piece.answer(piece.tensor * 2) for piece in sent]
    whole = wire.joined(sent, replies)
    assert torch.equal(whole.tensor, request.tensor * 2) and (whole.layer, whole.start) == (3, 0)
    small = AdapterRequest(3, "attn_in", Phase.FORWARD, _rand(1, 3, 4))
    assert wire.pieces(small, dtype) == [small]


@pytest.mark.parametrize("mangle, match", [
    (lambda r: dataclasses.replace(r, start=r.start + 1), "from token"),
    (lambda r: dataclasses.replace(r, layer=0), "from token"),
    (lambda r: dataclasses.replace(r, tensor=r.tensor[:, :1]), "shape"),
    (lambda r: dataclasses.replace(r, tensor=r.tensor[..., :1]), "shape"),
    (lambda r: dataclasses.replace(r, tensor=r.tensor.double()), "float64"),
    (lambda r: dataclasses.replace(r, tensor=r.tensor[0]), "shape"),
    (lambda r: ForwardResult(r.tensor), "expected an AdapterReply"),
], ids=["start", "layer", "tokens", "width", "dtype", "dims", "kind"])
def test_a_reply_that_does_not_answer_its_piece_is_refused(monkeypatch, mangle, match):
    monkeypatch.setattr(wire, "PIECE_BYTES", 64)
    sent = wire.pieces(AdapterRequest(3, "attn_in", Phase.FORWARD, _rand(1, 8, 4)), torch.float32)
    replies = [piece.answer(piece.tensor) for piece in sent]
    replies[1] = mangle(replies[1])
    with pytest.raises(ValidationError, match=match):
        wire.joined(sent, replies)


def test_missing_required_tensor_is_refused():
    with pytest.raises(ValidationError, match="hidden is missing"):
        wire.parse_device_message(pb.DeviceMessage(forward=pb.ForwardRequest()), LIMIT)


# --- tensors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensor_round_trip_preserves_dtype_bits_and_is_writable(dtype):
    t = _rand(2, 3, 5, dtype=dtype) if dtype != torch.int64 else torch.arange(30).reshape(2, 3, 5)
    msg = wire.tensor_to_proto(t[:, :, 1:4])  # a non-contiguous view is sent as its own values
    back = wire.tensor_from_proto(msg, LIMIT)
    _same_tensor(t[:, :, 1:4].contiguous(), back)
    back.add_(1)  # writable, and owns its memory
    assert wire.tensor_from_proto(msg, LIMIT).equal(t[:, :, 1:4])


def test_scalar_and_empty_tensors_round_trip():
    _same_tensor(wire.tensor_from_proto(wire.tensor_to_proto(torch.tensor(3.5)), LIMIT), torch.tensor(3.5))
    _same_tensor(wire.tensor_from_proto(wire.tensor_to_proto(torch.empty(0, 8)), LIMIT), torch.empty(0, 8))


def test_unsupported_dtype_cannot_be_sent():
    with pytest.raises(ValidationError, match="float64"):
        wire.tensor_to_proto(torch.zeros(2, dtype=torch.float64))


def _tensor(dtype=pb.FLOAT32, shape=(2, 3), nbytes=None):
    count = 1
    for d in shape:
        count *= max(d, 0)
    return pb.Tensor(dtype=dtype, shape=list(shape), data=bytes(count * 4 if nbytes is None else nbytes))


@pytest.mark.parametrize(
    "msg, match",
    [
        (_tensor(nbytes=23), "23 bytes.*exactly 24"),  # truncated
        (_tensor(nbytes=25), "25 bytes.*exactly 24"),  # padded
        (_tensor(dtype=pb.DTYPE_UNSPECIFIED), "DTYPE_UNSPECIFIED"),
        (_tensor(dtype=17), "unknown value 17"),
        (_tensor(shape=(2, -3), nbytes=0), "negative"),
        (_tensor(shape=(1025, 1024), nbytes=0), "1049600 elements"),
        (_tensor(shape=(1, 1, 1, 1, 2)), "5 dims"),
    ],
    ids=["truncated", "extra-data", "unspecified-dtype", "unknown-dtype", "negative-shape", "too-many-elements", "5-dims"],
)
def test_malformed_tensors_are_refused(msg, match):
    with pytest.raises(ValidationError, match=match):
        wire.tensor_from_proto(msg, LIMIT)


def test_malformed_tensor_inside_a_message_is_refused():
    msg = wire.cloud_message(0, ForwardResult(_rand(1, 2, 8)))
    msg.forward.hidden.data = msg.forward.hidden.data[:-1]
    with pytest.raises(ValidationError, match="exactly 64"):
        wire.parse_cloud_message(msg, LIMIT)


# --- bundle ----------------------------------------------------------------------------------


def _make_bundle(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 41)
    (folder / "empty.txt").write_bytes(b"")
    return folder


def test_bundle_round_trip_creates_identical_files(tmp_path):
    source = _make_bundle(tmp_path / "src")
    digest, size = bundle.bundle_digest(source)
    chunks = list(bundle.chunked_bundle(source, chunk_size=1000))
    assert [c.file for c in chunks if c.last] == ["config.json", "empty.txt", "model.safetensors"]
    assert size == sum(len(c.data) for c in chunks)
    target = tmp_path / "dst"
    bundle.receive_bundle(chunks, target, digest, max_bytes=size)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in source.iterdir())
    for p in source.iterdir():
        assert (target / p.name).read_bytes() == p.read_bytes()
    assert bundle.bundle_digest(target) == (digest, size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no staging left over


def test_bundle_replaces_an_existing_folder(tmp_path):
    source = _make_bundle(tmp_path / "src")
    target = tmp_path / "dst"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    bundle.receive_bundle(bundle.chunked_bundle(source, 64), target, bundle.bundle_digest(source)[0], 1 << 20)
    assert not (target / "stale.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_digest_cannot_be_kept_by_moving_bytes_across_files(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "x").write_bytes(b"12")
    (a / "y").write_bytes(b"34")
    b = tmp_path / "b"
    b.mkdir()
    (b / "x").write_bytes(b"12y\x0034")  # what name, NUL, bytes without sizes would confuse with `a`
    assert bundle.bundle_digest(a)[0] != bundle.bundle_digest(b)[0]


def _refused(tmp_path, chunks, digest="0" * 64, max_bytes=1 << 20, match=""):
    target = tmp_path / "dst"
    with pytest.raises(ValidationError, match=match):
        bundle.receive_bundle(chunks, target, digest, max_bytes)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "src"] == []  # no staging folder either


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "", "x" * 129, "a\n"])
def test_bundle_bad_names_are_refused(tmp_path, name):
    _refused(tmp_path, [pb.BundleChunk(file=name, data=b"1", last=True)], match="not a plain name")


def test_bundle_over_size_is_refused(tmp_path):
    source = _make_bundle(tmp_path / "src")
    digest, size = bundle.bundle_digest(source)
    _refused(tmp_path, bundle.chunked_bundle(source, 100), digest, max_bytes=size - 1, match="over")


def test_bundle_digest_mismatch_is_refused_and_shows_both(tmp_path):
    source = _make_bundle(tmp_path / "src")
    digest, _ = bundle.bundle_digest(source)
    _refused(tmp_path, bundle.chunked_bundle(source, 100), "f" * 64, match=f"{digest}.*{'f' * 64}")


def test_bundle_interleaved_files_are_refused(tmp_path):
    chunks = [pb.BundleChunk(file="a", data=b"1"), pb.BundleChunk(file="b", data=b"2", last=True)]
    _refused(tmp_path, chunks, match="before the last chunk of 'a'")


def test_bundle_truncated_stream_and_repeated_file_are_refused(tmp_path):
    _refused(tmp_path, [pb.BundleChunk(file="a", data=b"1")], match="ended inside 'a'")
    twice = [pb.BundleChunk(file="a", data=b"1", last=True), pb.BundleChunk(file="a", data=b"1", last=True)]
    _refused(tmp_path, twice, match="twice")


# --- generated code ----------------------------------------------------------------------------


def test_committed_generated_code_matches_split_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from plora.cloud_backbone.protocol import codegen

    codegen.main(["--out", str(tmp_path)])
    for name in ("split_pb2.py", "split_pb2_grpc.py", "split_pb2.pyi"):
        fresh = (tmp_path / name).read_bytes()
        assert fresh.startswith(b"# Generated by plora.cloud_backbone.protocol.codegen from split.proto. Do not edit.\n")
        assert fresh == (PROTOCOL_DIR / name).read_bytes(), (
            f"{name} is stale: run `python -m plora.cloud_backbone.protocol.codegen` after editing split.proto"
        )
    grpc_module = (tmp_path / "split_pb2_grpc.py").read_text()
    assert "from plora.cloud_backbone.protocol import split_pb2 as split__pb2" in grpc_module
    assert "\nimport split_pb2" not in grpc_module


def test_a_job_report_crosses_whole_and_a_hostile_one_is_refused_before_the_registry():
    now = datetime.now(timezone.utc).replace(microsecond=0)
    report = JobReport("a" * 32, "migrate", "failed", "v1", "v2", {"method": "distill"}, None, {"kl": 0.5}, 10, 3,
                       "TransportError: gone", now, now, None)
    assert wire.job_report_from_proto(pb.JobReport.FromString(wire.job_report_to_proto(report).SerializeToString())) == report
    hostile = [
        ("params_json", "[1, 2]"),  # not an object
        ("metrics_after_json", "[" * 5000),  # nested beyond the parser
        ("params_json", "{" + '"k": 1,' * 2000 + '"z": 0}'),  # longer than a report's JSON may be
        ("created_at", float("nan")),
        ("started_at", -5.0),
    ]
    for field, value in hostile:
        message = wire.job_report_to_proto(report)
        setattr(message, field, value)
        with pytest.raises(ValidationError, match="job report"):
            wire.job_report_from_proto(message)
