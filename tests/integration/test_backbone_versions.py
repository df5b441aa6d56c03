"""Managing backbone versions: register, list, show, status changes, guarded retire, derive,
and a service hosting several registered versions at once (tiny random checkpoint)."""

from __future__ import annotations

import json

import pytest

from plora.clients.device_store import DeviceStore
from plora.clients.grpc_link import Endpoint, register
from plora.cloud_backbone.protocol.messages import OpenSession
from plora.cloud_backbone.server import start_service
from plora.cloud_backbone.versions import load_version
from plora.storage.registry import open_registry
from plora.storage.errors import VersionMismatchError
from tests.integration.test_cli import plora

TEXTS = [{"text": f"Question {i}: what is {i} plus {i}? Answer: {2 * i}."} for i in range(12)]


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch, tiny_checkpoint):  # after the session's home has made tiny_checkpoint
    monkeypatch.setenv("PLORA_HOME", str(tmp_path / "home"))  # derived backbones and bundles go here


@pytest.fixture
def v1(tiny_checkpoint) -> str:
    out = plora("backbone", "register", "--backbone", tiny_checkpoint, "--rank", "4").output
    return out.split()[0]


def test_register_is_idempotent_and_a_new_seed_is_a_new_version(tiny_checkpoint, v1):
    assert plora("backbone", "register", "--backbone", tiny_checkpoint, "--rank", "4").output.split()[0] == v1
    fresh = plora("backbone", "register", "--backbone", tiny_checkpoint, "--rank", "4", "--seed", "1").output.split()[0]
    assert fresh != v1
    rows = json.loads(plora("backbone", "list", "--json").stdout)
    assert [(r["name"], r["status"], r["seed"], r["devices"]) for r in rows] == [(v1, "active", 0, 0), (fresh, "active", 1, 0)]
    shown = json.loads(plora("backbone", "show", v1).output)
    assert shown["architecture"]["num_layers"] == 4 and shown["adapter_config"]["rank"] == 4
    assert "* new devices are bound to this one" in plora("backbone", "list").output


def test_status_changes_and_retire_is_guarded_while_devices_are_bound(v1):
    reg = open_registry()
    reg.register_device("f" * 32, v1)
    assert "now deprecated" in plora("backbone", "deprecate", v1).output
    assert "now active" in plora("backbone", "activate", v1).output
    refused = plora("backbone", "retire", v1, ok=False).output
    assert "1 device(s) are still bound" in refused and reg.get_backbone(v1).status == "active"
    forced = plora("backbone", "retire", v1, "--force")
    assert "now retired" in forced.output and "f" * 32 in forced.output  # says whom it strands


def test_a_subset_of_adapted_layers_is_a_version_of_its_own(tiny_checkpoint, v1):
    subset = plora("backbone", "register", "--backbone", tiny_checkpoint, "--rank", "4", "--adapt-layers", "2-3,0").output.split()[0]
    assert subset != v1
    assert json.loads(plora("backbone", "show", subset).output)["adapter_config"]["adapt_layers"] == [0, 2, 3]
    assert "adapt_layers" not in json.loads(plora("backbone", "show", v1).output)["adapter_config"]
    refused = plora("backbone", "register", "--backbone", tiny_checkpoint, "--adapt-layers", "5-3", ok=False)
    assert "a range goes up" in refused.output
    # The presets resolve against the backbone's own layers: the wan one adapts the last half.
    wan = plora("backbone", "register", "--backbone", tiny_checkpoint, "--rank", "4", "--preset", "wan").output.split()[0]
    assert json.loads(plora("backbone", "show", wan).output)["adapter_config"]["adapt_layers"] == [2, 3]  # of 4 layers
    lan = plora("backbone", "register", "--backbone", tiny_checkpoint, "--rank", "4", "--preset", "lan").output.split()[0]
    assert lan == v1
    both = plora("backbone", "register", "--backbone", tiny_checkpoint, "--preset", "wan", "--adapt-layers", "1", ok=False)
    assert "not both" in both.output


def test_derive_fine_tunes_the_decoder_and_registers_a_child_version(tmp_path, v1):
    data = tmp_path / "public.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TEXTS))
    out = plora("backbone", "derive", "--from", v1, "--data", data, "--out", "tiny-v2", "--steps", "3", "--lr", "1e-3").stdout
    reg = open_registry()
    child = reg.get_backbone("tiny-v2")
    assert child.name in out and child.parent_id == reg.get_backbone(v1).id
    assert child.content_hash != reg.get_backbone(v1).content_hash and child.adapter_config == reg.get_backbone(v1).adapter_config
    old, _ = load_version(reg.get_backbone(v1))
    new, _ = load_version(child)
    assert not old.model.model.layers[0].self_attn.q_proj.weight.equal(new.model.model.layers[0].self_attn.q_proj.weight)
    assert old.model.model.embed_tokens.weight.equal(new.model.model.embed_tokens.weight)  # the device's half is unchanged
    again = plora("backbone", "derive", "--from", v1, "--data", data, "--out", "tiny-v2", ok=False).output
    assert "already exists" in again


def test_a_service_hosts_old_and_new_versions_and_refuses_retired_ones(tiny_checkpoint, v1):
    v2 = plora("backbone", "register", "--backbone", tiny_checkpoint, "--rank", "4", "--seed", "1").output.split()[0]
    reg = open_registry()
    server = start_service([], None, reg, registered=[v1, v2])
    try:
        endpoint = Endpoint(f"127.0.0.1:{server.port}", insecure=True)
        assert sorted(server.service.versions) == sorted([v1, v2])
        _, token = reg.issue_enrollment_token(uses=2)
        _, hosted = register(endpoint, token)
        assert hosted.identity.adapter.seed == 1  # the version activated last takes new devices
        plora("backbone", "deprecate", v2)
        _, hosted = register(endpoint, token)
        assert hosted.identity.adapter.seed == 0
        with pytest.raises(VersionMismatchError, match="deprecated: it takes no new devices"):
            server.service.register_device(v2, enroll_token=token)
        plora("backbone", "retire", v2, "--force")
        with pytest.raises(VersionMismatchError, match="retired"):
            server.service.open_session("0" * 32, OpenSession(server.service.versions[v2].identity))
    finally:
        server.stop(grace_s=0)


def test_a_device_that_knows_only_its_services_address_migrates(tiny_checkpoint, tmp_path, monkeypatch):
    v2 = plora("backbone", "register", "--backbone", tiny_checkpoint, "--rank", "4", "--seed", "1").output.split()[0]
    v1 = plora("backbone", "register", "--backbone", tiny_checkpoint, "--rank", "4").output.split()[0]  # new devices' version
    operator = open_registry()
    server = start_service([], None, operator, registered=[v1, v2])
    try:
        address, token = f"127.0.0.1:{server.port}", operator.issue_enrollment_token()[1]
        # The device's own host: a registry and a home of its own, which no version was ever registered in.
        monkeypatch.setenv("PLORA_DB_URL", f"sqlite:///{tmp_path / 'device-host.db'}")
        monkeypatch.setenv("PLORA_HOME", str(tmp_path / "device-home"))
        device = tmp_path / "dev"
        plora("device", "init", device, "--backbone", address, "--insecure", "--enroll-token", token)
        notes = tmp_path / "notes.jsonl"
        notes.write_text("".join(json.dumps(t) + "\n" for t in TEXTS))
        plora("personalize", device, "--data", notes, "--steps", 3, "--lr", "1e-2", "--val-fraction", 0)
        assert DeviceStore.open(device).record.identity.version == v1
        out = plora("migrate", "--to", v2, "--root", device, "--steps", 3, "--min-retention", 0).output
        assert "migrated" in out and DeviceStore.open(device).record.identity.version == v2
        assert open_registry().get_backbone(v2).source == address  # learned from the service, as it describes v2
    finally:
        server.stop(grace_s=0)
