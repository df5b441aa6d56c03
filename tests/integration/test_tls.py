"""The backbone service over TLS on loopback: a throwaway CA, a server certificate for
localhost/127.0.0.1, a device that trusts that CA, one that trusts another CA, and a fleet's
device given the CA."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from plora.clients.device_store import DeviceStore
from plora.clients.grpc_link import Endpoint
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.server import TLSFiles, start_service
from plora.cloud_backbone.service import Limits
from plora.platform.cli.main import main
from plora.platform.fleet import task
from plora.platform.fleet.credentials import FleetCredentials, issue_credentials
from plora.platform.fleet.settings import FleetSettings
from plora.storage.registry import open_registry
from plora.platform.runtime import init_device, open_device
from plora.storage.errors import ConfigError, TransportError

CONFIG = PrivateLoRAConfig(rank=4, device_layers=1)


@pytest.fixture
def pki(tmp_path) -> FleetCredentials:
    """A throwaway CA and a server certificate for localhost and 127.0.0.1 (the fleet's, reused)."""
    return issue_credentials(tmp_path / "pki", nodes=0)


@pytest.fixture
def tls_server(tiny_checkpoint, pki):
    running = start_service([str(tiny_checkpoint)], CONFIG, open_registry(), Limits(reply_timeout_s=5),
                            host="127.0.0.1", port=0, tls=TLSFiles(pki.server_cert, pki.server_key))
    yield running
    running.stop(grace_s=1)


def test_a_device_that_trusts_the_ca_enrolls_and_runs_a_forward(tmp_path, tls_server, pki):
    address = f"localhost:{tls_server.port}"
    folder = tmp_path / "dev"
    init_device(folder, address, endpoint=Endpoint(address, ca_file=str(pki.ca)), enroll_token=open_registry().issue_enrollment_token()[1])
    device = open_device(folder)
    try:
        assert device.store.record.endpoint == {"insecure": False, "ca_file": str(pki.ca)}
        with torch.no_grad():
            logits = device.model(torch.tensor([[1, 2, 3]]))
        assert logits.shape == (1, 3, device.model.lm_head.out_features) == (1, 3, len(device.tokenizer))
        assert torch.isfinite(logits).all()
    finally:
        device.close()


def test_a_device_given_several_replicas_checks_their_certificate_against_their_host(tmp_path, tls_server, pki, own_port):
    # gRPC checks a list of replicas against one name, by default not a host the certificate
    # could name: the handshake failed with "Hostname Verification Check failed".
    address = f"127.0.0.1:{own_port()},127.0.0.1:{tls_server.port}"  # the first replica is down
    init_device(tmp_path / "dev", address, endpoint=Endpoint(address, ca_file=str(pki.ca)),
                enroll_token=open_registry().issue_enrollment_token()[1])
    assert DeviceStore.open(tmp_path / "dev").record.device_id


def test_a_device_that_trusts_another_ca_is_refused(tmp_path, tls_server):
    other = issue_credentials(tmp_path / "other-pki", nodes=0)
    address = f"localhost:{tls_server.port}"
    folder = tmp_path / "dev"
    with pytest.raises(TransportError, match="unreachable"):
        init_device(folder, address, endpoint=Endpoint(address, ca_file=str(other.ca)), enroll_token=open_registry().issue_enrollment_token()[1])
    assert not (folder / "device.json").exists() and not (folder / "credentials.json").exists()
    hosted = next(iter(tls_server.service.versions))
    assert tls_server.service.registry.devices_on(hosted) == []  # the handshake failed before Register


def test_a_plain_text_client_gets_nothing_from_a_tls_service(tmp_path, tls_server):
    address = f"127.0.0.1:{tls_server.port}"
    with pytest.raises(TransportError):
        init_device(tmp_path / "dev", address, endpoint=Endpoint(address, insecure=True), enroll_token=open_registry().issue_enrollment_token()[1])


def test_serve_refuses_to_start_without_tls_or_insecure(tiny_checkpoint):
    result = CliRunner().invoke(main, ["backbone", "serve", "--backbone", str(tiny_checkpoint)])
    assert result.exit_code != 0
    assert result.exit_code == 2  # click's usage error, before any backbone is loaded
    assert "give --tls-cert and --tls-key, or --insecure" in result.output


def test_serve_refuses_half_a_tls_pair(tiny_checkpoint, pki):
    result = CliRunner().invoke(main, ["backbone", "serve", "--backbone", str(tiny_checkpoint), "--tls-cert", str(pki.server_cert)])
    assert result.exit_code == 2
    assert "--tls-cert and --tls-key go together" in result.output


def test_a_fleets_devices_reach_the_backbone_over_tls_when_given_its_ca(tmp_path, tls_server, pki):
    with pytest.raises(ConfigError, match="over TLS only"):
        FleetSettings(tmp_path / "fleet", f"10.0.0.5:{tls_server.port}")  # plain text is for loopback
    token = open_registry().issue_enrollment_token(uses=1)[1]
    settings = FleetSettings(tmp_path / "fleet", f"localhost:{tls_server.port}", steps=2, batch_size=2,
                             enroll_token=token, backbone_ca=str(pki.ca))
    folder = task.prepare_device(settings, 0, 1)
    assert DeviceStore.open(folder).record.endpoint == {"insecure": False, "ca_file": str(pki.ca)}
    # Its jobs then go over TLS too: test_hosts.py runs a fleet's jobs so, across hosts.
