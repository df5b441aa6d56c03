"""Enrollment and the device lifecycle against a real service over loopback gRPC: enrollment
tokens, open enrollment and its rate limit, revocation of live sessions, forgetting a device."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import grpc
import pytest
import torch
from click.testing import CliRunner
from sqlalchemy.orm import sessionmaker

from plora.clients.device_store import DeviceStore
from plora.clients.generation import stream_tokens
from plora.clients.grpc_link import Endpoint, register
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.device_access import Enrollment
from plora.cloud_backbone.protocol import split_pb2 as pb, split_pb2_grpc as pb_grpc
from plora.cloud_backbone.server import start_service
from plora.cloud_backbone.service import Limits
from plora.platform import runtime
from plora.platform.cli.main import main
from plora.storage.registry import open_registry
from plora.platform.runtime import init_device, open_device
from plora.storage import db, device_lifecycle
from plora.storage.errors import AuthenticationError, RegistryError
from plora.storage.models import utcnow
from plora.storage.registry import Registry

CONFIG = PrivateLoRAConfig(rank=4, device_layers=1)


def serve(tiny_checkpoint, enrollment: Enrollment = Enrollment()):
    return start_service([str(tiny_checkpoint)], CONFIG, open_registry(), Limits(reply_timeout_s=5), enrollment=enrollment)


@pytest.fixture
def server(tiny_checkpoint):
    running = serve(tiny_checkpoint)
    yield running
    running.stop(grace_s=0.5)


@pytest.fixture
def endpoint(server):
    return Endpoint(f"127.0.0.1:{server.port}", insecure=True)


def register_status(endpoint: Endpoint, enroll_token: str = "") -> grpc.StatusCode:
    """The status of a raw Register call, as any client would see it."""
    with endpoint.channel() as channel:
        try:
            pb_grpc.SplitBackboneStub(channel).Register(pb.RegisterRequest(enroll_token=enroll_token), timeout=10)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def other_process_registry() -> Registry:
    """A registry on an engine of its own, as the CLI in another process would hold one."""
    return Registry(sessionmaker(bind=db.create_registry_engine(db.default_url())))


def test_a_token_enrolls_its_uses_and_wrong_used_up_or_expired_tokens_are_unauthenticated(endpoint, monkeypatch):
    record, token = open_registry().issue_enrollment_token(uses=2)
    for _ in range(2):
        credentials, _ = register(endpoint, token)
        assert open_registry().get_device(credentials.device_id).revoked_at is None
    with pytest.raises(AuthenticationError, match=f"enrollment token {record.id} is used up"):
        register(endpoint, token)
    with pytest.raises(AuthenticationError, match="not one this service issued"):
        register(endpoint, "a-guessed-token")
    with pytest.raises(AuthenticationError, match="only devices that bring an enrollment token"):
        register(endpoint)
    expiring, expiring_token = open_registry().issue_enrollment_token(uses=1, expires_at=utcnow() + timedelta(hours=1))
    later = utcnow() + timedelta(hours=2)
    monkeypatch.setattr(device_lifecycle, "utcnow", lambda: later)  # the service runs in this process
    with pytest.raises(AuthenticationError, match=f"enrollment token {expiring.id} expired"):
        register(endpoint, expiring_token)
    assert register_status(endpoint, "a-guessed-token") == register_status(endpoint) == grpc.StatusCode.UNAUTHENTICATED
    assert len(open_registry().list_devices()) == 2


def test_open_enrollment_must_be_asked_for_and_is_rate_limited(tiny_checkpoint):
    running = serve(tiny_checkpoint, Enrollment(open=True, per_minute=3))
    try:
        endpoint = Endpoint(f"127.0.0.1:{running.port}", insecure=True)
        assert [register_status(endpoint) for _ in range(4)] == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        _, token = open_registry().issue_enrollment_token(uses=1)
        assert register_status(endpoint, token) == grpc.StatusCode.OK  # a token does not wait for the open bucket
        assert len(open_registry().list_devices()) == 4
    finally:
        running.stop(grace_s=0.5)


def test_revoking_a_device_from_another_process_ends_its_live_sessions_within_a_second_and_refuses_it(server, endpoint, tmp_path):
    init_device(tmp_path / "dev", endpoint.address, endpoint=endpoint, enroll_token=open_registry().issue_enrollment_token()[1])
    decoding, idle = open_device(tmp_path / "dev"), open_device(tmp_path / "dev")
    with torch.no_grad():
        idle.model(torch.tensor([[1, 2, 3]]))  # open, then quiet: no step in flight when the revoke comes
    ended: dict[str, float | BaseException] = {}
    give_up = threading.Event()  # so that a test that fails still ends

    def decode_until_refused() -> None:
        try:
            while not give_up.is_set():
                for _ in stream_tokens(decoding.model, [1, 2, 3], 8, set()):
                    pass
        except BaseException as err:  # noqa: BLE001 (recorded and asserted on below)
            ended["at"], ended["error"] = time.monotonic(), err

    thread = threading.Thread(target=decode_until_refused, daemon=True)
    thread.start()
    while server.service.active_sessions < 2:
        time.sleep(0.01)
    revoked_at = time.monotonic()
    other_process_registry().revoke_device(decoding.store.record.device_id)
    while server.service.active_sessions and time.monotonic() < revoked_at + 5:
        time.sleep(0.01)
    closed_after = time.monotonic() - revoked_at
    thread.join(timeout=5)
    give_up.set()
    assert "error" in ended, f"the device still decodes {closed_after:.1f} s after its revoke"
    assert isinstance(ended["error"], AuthenticationError) and "revoked" in str(ended["error"]), ended["error"]
    # The watcher polls every 0.25 s, so a second leaves room for a loaded machine.
    assert ended["at"] - revoked_at < 1.0 and closed_after < 1.0, (ended["at"] - revoked_at, closed_after)
    with pytest.raises(AuthenticationError, match="revoked"), torch.no_grad():
        idle.model(torch.tensor([[4]]))
    with pytest.raises(AuthenticationError, match="revoked by the service's operator"):
        open_device(tmp_path / "dev")
    for device in (decoding, idle):
        device.close()
    # A revoked device can still have itself forgotten.
    result = CliRunner().invoke(main, ["device", "forget", str(tmp_path / "dev"), "--yes"])
    assert result.exit_code == 0, result.output
    assert open_registry().list_devices() == [] and not (tmp_path / "dev").exists()


def test_forget_removes_the_device_from_the_service_and_deletes_its_folder(server, endpoint, tmp_path, monkeypatch, own_port):
    token = open_registry().issue_enrollment_token(uses=2)[1]
    folder, neighbour = tmp_path / "dev", tmp_path / "neighbour"
    for path in (folder, neighbour):
        init_device(path, endpoint.address, endpoint=endpoint, enroll_token=token)
    device_id = DeviceStore.open(folder).record.device_id
    open_registry().start_job(device_id, "personalize", {"lr": 0.01})  # a job recorded while it was in use
    runner = CliRunner()

    unreachable = runner.invoke(main, ["device", "forget", str(folder), "--yes", "--backbone", f"127.0.0.1:{own_port()}"])
    assert unreachable.exit_code == 1 and "Nothing was deleted" in unreachable.output and "again" in unreachable.output
    declined = runner.invoke(main, ["device", "forget", str(folder)], input="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    assert (folder / "device.json").is_file() and open_registry().get_device(device_id) and open_registry().list_jobs(device_id)

    forgotten = runner.invoke(main, ["device", "forget", str(folder), "--yes"])
    assert forgotten.exit_code == 0, forgotten.output
    assert "1 devices, 1 jobs" in forgotten.output and not folder.exists()
    with pytest.raises(RegistryError, match="no device"):
        open_registry().get_device(device_id)
    assert open_registry().list_jobs() == []
    assert [d.id for d in open_registry().list_devices()] == [DeviceStore.open(neighbour).record.device_id]

    # Forgotten by the service but the folder not deleted (a crash, a busy disk): a re-run finishes
    # the job without the service, which would no longer know the device.
    with monkeypatch.context() as patched:
        patched.setattr(runtime.shutil, "rmtree", lambda path: (_ for _ in ()).throw(OSError("disk busy")))
        assert runner.invoke(main, ["device", "forget", str(neighbour), "--yes"]).exit_code == 1
    assert open_registry().list_devices() == [] and (neighbour / runtime.FORGOTTEN).exists()
    again = runner.invoke(main, ["device", "forget", str(neighbour), "--yes"])
    assert again.exit_code == 0 and not neighbour.exists(), again.output


def test_forget_a_device_of_a_local_backbone_clears_the_local_registry(tmp_path, tiny_checkpoint):
    from plora.platform.jobs import register as register_locally

    store = init_device(tmp_path / "dev", str(tiny_checkpoint), CONFIG)
    register_locally(store.record, open_registry())
    open_registry().start_job(store.record.device_id, "personalize", {"lr": 0.01})
    result = CliRunner().invoke(main, ["device", "forget", str(tmp_path / "dev"), "--yes"])
    assert result.exit_code == 0, result.output
    assert "the local registry" in result.output and not (tmp_path / "dev").exists()
    assert open_registry().list_devices() == [] and open_registry().list_jobs() == []


def test_the_operator_commands_issue_list_and_revoke(endpoint, tmp_path):
    runner = CliRunner()
    created = runner.invoke(main, ["backbone", "enroll", "create", "--uses", "2", "--expires", "1h", "--label", "lab"])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert len(token) >= 40 and "\n" not in token  # the token alone on stdout, for scripts
    init_device(tmp_path / "dev", endpoint.address, endpoint=endpoint, enroll_token=token)
    listed = runner.invoke(main, ["backbone", "enroll", "list"]).stdout
    header, _, row = listed.splitlines()
    assert "uses left" in header and "1/2" in row and "valid" in row and row.rstrip().endswith("lab") and token not in listed
    (device,) = open_registry().list_devices()
    assert device.id in runner.invoke(main, ["backbone", "devices", "list"]).output
    assert runner.invoke(main, ["backbone", "devices", "revoke", device.id]).exit_code == 0
    (revoked,) = json.loads(runner.invoke(main, ["backbone", "devices", "list", "--json"]).stdout)
    assert revoked["id"] == device.id and revoked["revoked_at"]
    assert runner.invoke(main, ["backbone", "enroll", "revoke", "1"]).exit_code == 0
    (token_row,) = json.loads(runner.invoke(main, ["backbone", "enroll", "list", "--json"]).stdout)
    assert token_row["state"] == "revoked" and token_row["revoked_at"] and token not in json.dumps(token_row)
    bad = runner.invoke(main, ["backbone", "enroll", "create", "--expires", "7 weeks"])
    assert bad.exit_code == 2 and "not a duration" in bad.output
