"""Devices that recover: a backbone service killed mid-step and started again on the same
port costs the device no token and no training step; one that stays down, or that no longer
knows the device, fails the step with a clear error, and a job it failed resumes on the next
run."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from plora.clients.adapter_file import load_adapter
from plora.clients.data import TokenizedExample
from plora.clients.device_store import DeviceStore
from plora.clients.generation import stream_tokens
from plora.clients.grpc_link import Endpoint
from plora.clients.recovery import RetryPolicy
from plora.clients.training import TrainResult, TrainSettings, personalize
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol.messages import AdapterReply, CacheMode, ForwardRequest, Phase
from plora.cloud_backbone.server import start_service
from plora.platform.jobs import run_personalization
from plora.platform.runtime import init_device, open_device
from plora.storage.registry import open_registry
from plora.storage.errors import AuthenticationError, TransportError
from tests.service_process import TINY_ADAPTER, ServeProcess

CONFIG = PrivateLoRAConfig(rank=4, device_layers=1)
# Waits capped at 1 s, so the device is back within a second of the service; a budget far
# above the default minute, since a loaded 2-core machine can take that long to start it.
QUICK_RETRY = RetryPolicy(budget_s=300.0, max_delay_s=1.0)
PARK_TIMEOUT_S = 120  # a thread waits this long at its kill point before the test gives up


def enroll(root: Path, endpoint: Endpoint) -> None:
    init_device(root, endpoint.address, endpoint=endpoint, enroll_token=open_registry().issue_enrollment_token()[1])


class KillPoint:
    """A tap that parks the link's thread at the `nth` message that `matches`, before it is
    sent, until the test has killed the service: that step then fails in mid-flight."""

    def __init__(self, matches, nth: int):
        self.matches, self.left = matches, nth
        self.parked, self.resume = threading.Event(), threading.Event()

    def __call__(self, direction, message) -> None:
        if self.left and self.matches(message):
            self.left -= 1
            if not self.left:
                self.parked.set()
                if not self.resume.wait(PARK_TIMEOUT_S):
                    raise TimeoutError("the test never released the link")


def decode_and_train_through(device: Path, disrupt: Callable[[], None], caplog) -> None:
    """Decode greedily on one session of `device` and train 4 steps on another, both parked
    mid-step while `disrupt()` takes their service away: both must end exactly as they do
    undisturbed, on new sessions, and say that they retried."""
    generating = open_device(device, retry=QUICK_RETRY)
    training = open_device(device, retry=QUICK_RETRY)  # a second session of the same device
    prompt, new_tokens = [5, 17, 3, 42, 8, 11], 16
    examples = [TokenizedExample(ids, ids) for ids in ([10, 20, 30, 40, 50, 60], [7, 8, 9, 10, 11], [3, 1, 4, 1, 5, 9, 2])]
    settings = TrainSettings(steps=4, batch_size=2, lr=0.05)

    def train(on_step) -> TrainResult:
        with torch.no_grad():
            for m in training.model.weights.ms.values():
                m.zero_()
        return personalize(training.model, examples, 0, settings, on_step=on_step)

    expected_tokens = list(stream_tokens(generating.model, prompt, new_tokens, set()))
    train(None)
    expected_ms = [m.detach().clone() for m in training.model.weights.ms.values()]

    # Generation is parked mid-decode, before its 6th decode step goes out; training in the
    # backward of its 3rd step, with 2 of the cloud's adapter requests already answered.
    steps_done: list[int] = []
    in_generation = KillPoint(lambda m: isinstance(m, ForwardRequest) and m.cache is CacheMode.EXTEND, nth=6)
    in_training = KillPoint(lambda m: isinstance(m, AdapterReply) and m.phase is Phase.BACKWARD and len(steps_done) == 2, nth=2)
    generating.model.link.taps.append(in_generation)
    training.model.link.taps.append(in_training)
    outcome: dict = {}
    threads = [  # daemons: a failed test leaves no thread retrying behind it
        threading.Thread(target=lambda: outcome.update(tokens=list(stream_tokens(generating.model, prompt, new_tokens, set()))),
                         daemon=True),
        threading.Thread(target=lambda: outcome.update(trained=train(lambda step, total, loss: steps_done.append(step))), daemon=True),
    ]
    with caplog.at_level(logging.WARNING, logger="plora.clients.recovery"), caplog.at_level(logging.INFO, logger="plora.clients.grpc_link"):
        for thread in threads:
            thread.start()
        assert in_generation.parked.wait(PARK_TIMEOUT_S) and in_training.parked.wait(PARK_TIMEOUT_S)
        disrupt()
        in_generation.resume.set()
        in_training.resume.set()
        for thread in threads:
            thread.join(300)
    assert outcome.get("tokens") == expected_tokens
    trained = outcome.get("trained")
    assert trained is not None and trained.steps == settings.steps and steps_done == [1, 2, 3, 4]
    for m, expected in zip(training.model.weights.ms.values(), expected_ms):
        assert torch.allclose(m, expected, atol=1e-6, rtol=0)
    # It recovered on new sessions, one for each link at least, and said so.
    reopened = [r.getMessage() for r in caplog.records if r.name == "plora.clients.grpc_link" and r.getMessage().startswith("new session ")]
    assert len(reopened) >= 2, reopened
    warnings = [r.getMessage() for r in caplog.records]
    for what in ("forward step", "backward step"):
        assert any(f"the {what} failed (attempt 1)" in w and "retry budget left" in w for w in warnings), warnings
    generating.close()
    training.close()


def test_a_service_killed_mid_step_and_restarted_costs_no_token_and_no_training_step(tiny_checkpoint, tmp_path, caplog, offline_probe, own_port):
    port = own_port()
    endpoint = Endpoint(f"127.0.0.1:{port}", insecure=True)
    services = [ServeProcess(tiny_checkpoint, tmp_path / "serve-1.log", *TINY_ADAPTER, port=port)]
    try:
        services[0].wait_until_listening()
        enroll(tmp_path / "dev", endpoint)

        def restart() -> None:
            services[0].kill()
            services.append(ServeProcess(tiny_checkpoint, tmp_path / "serve-2.log", *TINY_ADAPTER, port=port))

        decode_and_train_through(tmp_path / "dev", restart, caplog)
        assert offline_probe.offline_kinds() == {"plora"}  # both services went offline themselves
    finally:
        for service in services:
            service.kill()


@pytest.fixture
def in_process_service(tiny_checkpoint, own_port):
    """Start services on one port: the second (and later) starts replace a stopped one."""
    port, running = own_port(), []

    def start(reg=None):
        running.append(start_service([str(tiny_checkpoint)], CONFIG, reg or open_registry(), port=port))
        return running[-1]

    start.endpoint = Endpoint(f"127.0.0.1:{port}", insecure=True)
    yield start
    for server in running:
        server.stop(grace_s=0)


def test_a_service_that_no_longer_knows_the_device_fails_the_step_at_once(in_process_service, tmp_path, caplog):
    first = in_process_service()
    enroll(tmp_path / "dev", in_process_service.endpoint)
    device = open_device(tmp_path / "dev")  # the default budget: a minute
    with torch.no_grad():
        device.model(torch.tensor([[1, 2, 3]]))
    first.stop(grace_s=0)
    in_process_service(open_registry(f"sqlite:///{tmp_path / 'another-registry.db'}"))  # same port, no such device
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="plora.clients.recovery"), pytest.raises(AuthenticationError):
        with torch.no_grad():
            device.model(torch.tensor([[4]]))
    assert time.monotonic() - started < 10  # far from the budget's minute: refused, not retried
    retries = [r.getMessage() for r in caplog.records if r.name == "plora.clients.recovery"]
    assert len(retries) == 1 and "attempt 1" in retries[0]  # the lost session, then no retry
    device.close()


def test_a_service_that_stays_down_fails_the_step_saying_how_long_it_tried(in_process_service, tmp_path):
    server = in_process_service()
    enroll(tmp_path / "dev", in_process_service.endpoint)
    device = open_device(tmp_path / "dev", retry=RetryPolicy(budget_s=1.5, max_delay_s=0.5))
    server.stop(grace_s=0)
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"tried \d+ times over 1\.\d s \(retry budget 1.5 s\)"):
        with torch.no_grad():
            device.model(torch.tensor([[1, 2, 3]]))
    assert 1.5 <= time.monotonic() - started < 15
    device.close()


def test_a_job_whose_service_stays_down_fails_cleanly_and_the_next_run_resumes_it(tiny_checkpoint, tmp_path, own_port):
    port = own_port()
    endpoint = Endpoint(f"127.0.0.1:{port}", insecure=True)
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i} is {i * 7}."}) + "\n" for i in range(8)))
    settings = TrainSettings(lr=0.05, steps=6, batch_size=2, anchor=None)
    service = ServeProcess(tiny_checkpoint, tmp_path / "serve-1.log", *TINY_ADAPTER, port=port)
    try:
        service.wait_until_listening()
        for name in ("straight", "failing"):
            enroll(tmp_path / name, endpoint)
        straight = open_device(tmp_path / "straight")
        run_personalization(straight, data, settings, val_fraction=0.0)
        straight.close()

        def kill_after_step_3(step, total, loss):
            if step == 3:  # its checkpoint is written: the next step finds the service gone
                service.kill()

        failing = open_device(tmp_path / "failing", retry=RetryPolicy(budget_s=1.0, max_delay_s=0.5))
        with pytest.raises(TransportError, match="did not come back"):
            run_personalization(failing, data, settings, val_fraction=0.0, checkpoint_every=1, on_step=kill_after_step_3)
        failing.close()
        device_id = DeviceStore.open(tmp_path / "failing").record.device_id
        (failed,) = open_registry().list_jobs(device_id)
        assert failed.status == "failed" and "TransportError" in failed.reason

        service = ServeProcess(tiny_checkpoint, tmp_path / "serve-2.log", *TINY_ADAPTER, port=port).wait_until_listening()
        again = open_device(tmp_path / "failing")
        outcome = run_personalization(again, data, settings, val_fraction=0.0)
        again.close()
        resumed = open_registry().get_job(outcome.job_id)
        assert resumed.status == "succeeded" and resumed.params["resumed_from_job"] == failed.id
        assert resumed.params["resumed_from_step"] == 3 and resumed.steps_done == settings.steps
        adapters = {}
        for name in ("straight", "failing"):
            store = DeviceStore.open(tmp_path / name)
            adapters[name] = load_adapter(store.adapter_path, store.record.identity)[0]  # checks the checksum and the binding
        for name, m in adapters["failing"].items():
            torch.testing.assert_close(m, adapters["straight"][name], atol=1e-5, rtol=0)
    finally:
        service.kill()
