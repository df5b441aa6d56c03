"""Backbone replicas: several `plora backbone serve` processes on one PostgreSQL registry serve
the same versions. A device given every replica's address keeps each session on one of them,
and when that replica dies mid-step it carries on at another, rebuilding the cloud's cache
from its own history: the same tokens, the same M."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy

from plora.clients.grpc_link import Endpoint
from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.service import prepare_version
from plora.platform.runtime import init_device
from plora.storage.registry import open_registry
from tests.integration.test_recovery import decode_and_train_through
from tests.service_process import TINY_ADAPTER, ServeProcess


def fresh_database(server_url: str) -> str:
    """A new, empty database on the PostgreSQL server of `server_url`, for this test alone."""
    name = f"replicas_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return str(sqlalchemy.engine.make_url(server_url).set(database=name))


def test_a_device_carries_on_at_another_replica_when_its_replica_dies_mid_step(tiny_checkpoint, tmp_path, postgres_url, caplog, own_port):
    db = fresh_database(postgres_url)
    ports = [own_port(), own_port()]
    replicas = []
    try:
        for i, port in enumerate(ports):  # one after the other: the first sets up the registry
            replicas.append(ServeProcess(tiny_checkpoint, tmp_path / f"replica-{i}.log", *TINY_ADAPTER, "--db", db, port=port))
            replicas[-1].wait_until_listening()
        address = ",".join(f"127.0.0.1:{port}" for port in ports)
        token = open_registry(db).issue_enrollment_token()[1]
        init_device(tmp_path / "dev", address, endpoint=Endpoint(address, insecure=True), enroll_token=token)
        decode_and_train_through(tmp_path / "dev", replicas[0].kill, caplog)  # pick_first: the sessions were on the first
        assert replicas[1].metrics().get('plora_tokens_total{step="forward"}', 0) > 0  # the second replica took over
        stops_when_told_again_and_again(replicas[1])
    finally:
        for replica in replicas:
            replica.kill()


def stops_when_told_again_and_again(replica: ServeProcess) -> None:
    """A supervisor's SIGTERM often comes twice: to the process group, then to the process. The
    second re-entered the first's shutdown, and the replica crashed or hung, holding its registry
    connection, so that PostgreSQL's own shutdown waited for it too."""
    replica.process.send_signal(signal.SIGTERM)
    # Signals that arrive before Python's handler runs make one call: keep signalling while it stops.
    for _ in range(200):
        if replica.process.poll() is not None:
            break
        replica.process.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    # It ends, cleanly: a signal that comes as Python itself exits, after the handler's time,
    # ends it as SIGTERM does by default.
    assert replica.process.wait(30) in (0, -signal.SIGTERM)
    assert "Traceback" not in replica.log.read_text(), replica.log.read_text()[-3000:]


def test_replicas_starting_at_once_write_their_shared_device_bundle_once(tiny_checkpoint, tmp_path):
    # deploy/operator-up.sh starts its replicas together, on one host's PLORA_HOME: the second to
    # finish writing the device bundle failed to move it into place ("Directory not empty").
    backbones = [loading.load(str(tiny_checkpoint)) for _ in range(3)]
    config, at_once = PrivateLoRAConfig(rank=4, device_layers=1), threading.Barrier(len(backbones))

    def prepare(backbone):
        at_once.wait()
        return prepare_version(backbone, config, tmp_path / "bundles")

    with ThreadPoolExecutor(len(backbones)) as pool:
        hosted = list(pool.map(prepare, backbones))
    assert len({(version.bundle, version.bundle_sha256) for version in hosted}) == 1
    assert [path.name for path in (tmp_path / "bundles").iterdir() if path.is_dir()] == [hosted[0].bundle.name]

