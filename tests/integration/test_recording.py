"""The audit recorder of `plora backbone serve --record`, over real loopback gRPC: it captures
exactly what the service saw, only when confirmed, owner-only, and forgetting a device deletes
its captures."""

from __future__ import annotations

import stat

import torch
from click.testing import CliRunner

from plora.clients.data import TokenizedExample
from plora.clients.generation import stream_tokens
from plora.clients.grpc_link import Endpoint
from plora.clients.training import TrainSettings, personalize
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol.messages import AdapterRequest, CacheMode, Phase
from plora.cloud_backbone.recording import read_session, recorded_sessions
from plora.cloud_backbone.server import start_service
from plora.cloud_backbone.service import Limits
from plora.platform.cli.main import main
from plora.platform.runtime import forget_device, init_device, open_device
from plora.storage.registry import open_registry

CONFIG = PrivateLoRAConfig(rank=4, device_layers=1)


def test_serving_with_record_needs_its_confirmation(tmp_path):
    result = CliRunner().invoke(main, ["backbone", "serve", "--insecure", "--record", str(tmp_path / "rec")])
    assert result.exit_code == 2 and "--yes-record-activations" in result.output
    assert not (tmp_path / "rec").exists()


def test_a_recorded_session_holds_what_the_service_saw_and_forgetting_deletes_it(tmp_path, tiny_checkpoint, caplog):
    record = tmp_path / "captures"
    server = start_service([str(tiny_checkpoint)], CONFIG, open_registry(), Limits(reply_timeout_s=5), record=record)
    try:
        endpoint = Endpoint(f"127.0.0.1:{server.port}", insecure=True)
        init_device(tmp_path / "dev", endpoint.address, endpoint=endpoint, enroll_token=open_registry().issue_enrollment_token()[1])
        device = open_device(tmp_path / "dev")
        seen = []
        device.model.link.taps.append(lambda direction, message: seen.append((direction, message)))
        ids, short = list(range(10, 26)), list(range(30, 40))
        # Two rows, packed: the training step runs in two row groups (CloudSession._pipelined_training).
        half = next(iter(server.service.versions.values())).half
        half.training_group_tokens = half.grouping_round_trip_s = 0  # however fast loopback answers
        personalize(device.model, [TokenizedExample(ids, ids), TokenizedExample(short, short)], 0,
                    TrainSettings(steps=1, lr=0.05, batch_size=2, anchor=None))
        trained = len(seen)
        half.prefill_chunk_tokens = 2  # the prompt's prefill: 2 chunks
        with torch.no_grad():
            reply = list(stream_tokens(device.model, [5, 6, 7, 8, 9], 3, set()))
        device.close()

        device_id = device.store.record.device_id
        (session,) = recorded_sessions(record, device_id)
        steps = read_session(session)
        assert [s.kind for s in steps] == ["forward", "backward", "forward", "forward", "forward"]
        assert [s.meta["cache"] for s in steps if s.kind == "forward"] == ["none", "start", "extend", "extend"]
        sent = [m.hidden for d, m in seen if d == "up" and type(m).__name__ == "ForwardRequest"]
        assert all(torch.equal(s.tensors["hidden_in"], h) for s, h in zip([s for s in steps if s.kind == "forward"], sent))
        assert len(list(steps[0].adapter("u"))) == len(list(steps[0].adapter("um"))) == 3  # cloud layers 1-3, one group
        assert len(list(steps[1].adapter("grad_u"))) == 3
        # The row groups' exchanges came in whatever order; each layer's is kept whole, in the step's order of tokens.
        for step, name, phase in ((steps[0], "u", Phase.FORWARD), (steps[1], "grad_um", Phase.BACKWARD)):
            for layer, _, tensor in step.adapter(name):
                parts = {m.start: m.tensor for d, m in seen[:trained] if d == "down" and isinstance(m, AdapterRequest)
                         and m.phase is phase and m.layer == layer and m.tensor.shape[1] > 1}
                assert len(parts) == 2 and torch.equal(tensor, torch.cat([parts[k] for k in sorted(parts)], dim=1))
                assert tensor.shape[1] == len(ids) + len(short)
        # The pipelined prefill's u came chunk by chunk; each layer's is kept whole, as the device saw it.
        begins = next(i for i, (_, m) in enumerate(seen) if getattr(m, "cache", None) is CacheMode.START)
        start = [m for d, m in seen[begins:] if d == "down"]
        start = start[: [type(m).__name__ for m in start].index("ForwardResult")]
        for layer, _, u in steps[2].adapter("u"):
            assert torch.equal(u, torch.cat([m.tensor for m in start if m.layer == layer], dim=1)) and u.shape[1] == 5
        assert len(reply) == 3
        assert stat.S_IMODE(record.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in session.glob("*.safetensors"))
        assert any("recording session" in r.message for r in caplog.records)

        removed = forget_device(tmp_path / "dev", open_registry(), endpoint.address)
        assert removed["captured steps"] == 5
        assert not (record / device_id).exists()
    finally:
        server.stop(grace_s=1)
