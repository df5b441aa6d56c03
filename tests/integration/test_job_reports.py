"""A device on a host of its own reports its jobs to its service: the operator's registry, and
`plora jobs list` on its host, show them, each once, even those the service missed while out
of reach."""

from __future__ import annotations

import json

from plora.clients.training import TrainSettings
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.server import start_service
from plora.platform import jobs
from plora.platform.jobs import run_personalization
from plora.platform.runtime import init_device, open_device
from plora.storage.errors import TransportError
from plora.storage.registry import open_registry
from tests.integration.test_cli import plora

SETTINGS = TrainSettings(lr=0.05, steps=2, batch_size=2, anchor=None)


def test_the_operator_sees_the_jobs_of_a_device_on_a_host_of_its_own(tiny_checkpoint, tmp_path, monkeypatch):
    operator_db = f"sqlite:///{tmp_path / 'operator.db'}"
    server = start_service([str(tiny_checkpoint)], PrivateLoRAConfig(rank=4), open_registry(operator_db))
    try:
        address = f"127.0.0.1:{server.port}"
        token = open_registry(operator_db).issue_enrollment_token()[1]
        monkeypatch.setenv("PLORA_DB_URL", f"sqlite:///{tmp_path / 'device-host.db'}")  # the device's own registry
        plora("device", "init", tmp_path / "dev", "--backbone", address, "--insecure", "--enroll-token", token)
        notes = tmp_path / "notes.jsonl"
        notes.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(6)))

        def unreachable(*args):
            raise TransportError("the service is out of reach")

        with monkeypatch.context() as offline:  # the first job ends while the service is out of reach
            offline.setattr(jobs, "send_job_reports", unreachable)
            first = run_personalization(open_device(tmp_path / "dev"), notes, SETTINGS, val_fraction=0.0)
        assert open_registry(operator_db).list_jobs() == []
        second = run_personalization(open_device(tmp_path / "dev"), notes, SETTINGS, val_fraction=0.0)
        on_the_device = open_registry().list_jobs()
        assert open_registry().jobs_to_report(on_the_device[0].device_id) == []  # the service heard of both
        mine = {job.id: job.uuid for job in on_the_device}

        monkeypatch.setenv("PLORA_DB_URL", operator_db)  # on the operator's host
        reported = json.loads(plora("jobs", "list", "--json").output)
        assert sorted(job["uuid"] for job in reported) == sorted([mine[first.job_id], mine[second.job_id]])  # each once
        assert {(job["kind"], job["status"], job["steps_done"]) for job in reported} == {("personalize", "succeeded", 2)}
    finally:
        server.stop(grace_s=0)
