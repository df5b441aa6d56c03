"""Many devices at once against one service, each in its own process."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
import torch

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.server import start_service
from plora.cloud_backbone.service import Limits
from plora.clients.grpc_link import Endpoint
from plora.storage.registry import open_registry
from plora.platform.runtime import init_device

# Runs in one xdist worker with the other tests that start many processes (see the Makefile).
pytestmark = pytest.mark.xdist_group("processes")

CONFIG = PrivateLoRAConfig(rank=4, device_layers=1)
DEVICES = 8


def personalize_and_generate(folder: str, seed: int) -> dict:
    """One user's session: a few training steps on its own data, then greedy generation."""
    from plora.clients.data import TokenizedExample
    from plora.clients.generation import stream_tokens
    from plora.clients.training import TrainSettings, personalize
    from plora.platform.runtime import open_device

    device = open_device(folder)
    data = torch.randint(5, 1000, (3, 12), generator=torch.Generator().manual_seed(seed)).tolist()
    result = personalize(device.model, [TokenizedExample(ids, ids) for ids in data], 0, TrainSettings(steps=3, lr=0.05, batch_size=3))
    tokens = list(stream_tokens(device.model, data[0][:4], 6, stop_ids=set()))
    ms = torch.cat([m.detach().flatten() for m in device.model.weights.ms.values()])
    device.close()
    return {"losses": [result.first_loss, result.last_loss], "tokens": tokens, "ms": ms.tolist()}


def generate_forever(folder: str) -> None:
    from plora.clients.generation import stream_tokens
    from plora.platform.runtime import open_device

    device = open_device(folder)
    while True:
        for _ in stream_tokens(device.model, [1, 2, 3], 100, stop_ids=set()):
            pass


@pytest.fixture
def served_devices(tmp_path, tiny_checkpoint):
    server = start_service([str(tiny_checkpoint)], CONFIG, open_registry(), Limits(reply_timeout_s=20, max_sessions_per_device=2))
    endpoint = Endpoint(f"127.0.0.1:{server.port}", insecure=True)
    folders, token = [], open_registry().issue_enrollment_token(uses=DEVICES)[1]
    for i in range(DEVICES):
        init_device(tmp_path / f"dev{i}", endpoint.address, endpoint=endpoint, enroll_token=token)
        folders.append(str(tmp_path / f"dev{i}"))
    yield server, folders
    server.stop(grace_s=1)


def test_eight_devices_in_separate_processes_each_get_what_they_get_alone(served_devices):
    server, folders = served_devices
    alone = [personalize_and_generate(folder, seed) for seed, folder in enumerate(folders)]
    # One thread per process: eight processes share two cores.
    with multiprocessing.get_context("spawn").Pool(DEVICES, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        together = pool.starmap(personalize_and_generate, [(folder, seed) for seed, folder in enumerate(folders)])
    for seed, (a, b) in enumerate(zip(alone, together)):
        assert a["tokens"] == b["tokens"], seed
        assert torch.allclose(torch.tensor(a["ms"]), torch.tensor(b["ms"]), atol=1e-5), seed
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    assert len({tuple(r["ms"][:8]) for r in alone}) == DEVICES  # every device learned its own M
    batcher = next(iter(server.service.versions.values())).half.batcher
    assert batcher.rows > batcher.batches  # concurrent decode steps shared passes
    assert server.service.active_sessions == 0


def test_a_device_killed_mid_stream_frees_its_session_and_others_go_on(served_devices):
    server, folders = served_devices
    victim = multiprocessing.get_context("spawn").Process(target=generate_forever, args=(folders[0],))
    victim.start()
    deadline = time.monotonic() + 60
    while server.service.active_sessions == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.service.active_sessions == 1
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    deadline = time.monotonic() + 10
    while server.service.active_sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.service.active_sessions == 0
    other = personalize_and_generate(folders[1], seed=1)
    assert len(other["tokens"]) == 6
