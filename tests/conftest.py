"""Shared fixtures. Most tests use a tiny random Llama built from a config, so they run in
seconds; a few end-to-end tests use the real embedded SmolLM2 (marked `embedded`)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from plora.storage.offline import OFFLINE_ENV, go_offline

go_offline()  # like every plora entry point, before anything imports Hugging Face's libraries

# One PLORA_HOME for the whole run, shared with the processes the tests start, so the
# embedded backbone is converted once; each test still gets its own registry database (see
# _isolated_database). The run's first process made it, and removes it at exit: it holds a
# converted backbone of about 500 MB.
if "PLORA_TEST_HOME" not in os.environ:
    os.environ["PLORA_TEST_HOME"] = tempfile.mkdtemp(prefix="plora-test-home-")
    atexit.register(shutil.rmtree, os.environ["PLORA_TEST_HOME"], ignore_errors=True)
os.environ["PLORA_HOME"] = os.environ["PLORA_TEST_HOME"]

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests start service, device and Flower processes that run side by side on few cores, where
# torch's default of an OpenMP thread per core in every process oversubscribes them: with one
# other busy process on 2 cores, the tiny model's forward took 5x and the embedded model's 7x
# as long as with one thread. The processes tests start get one thread each (the simulated
# fleet test: 168 s instead of 194 s); this one, which mostly runs alone, keeps torch's
# default, which it read on import (tests/integration/test_jobs.py: 65 s instead of 80 s).
# Measured 2026-12-02 on 2 cores. Under xdist (make test) the workers themselves run side by
# side, so each takes one thread too. An OMP_NUM_THREADS already set is left as it is.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from plora.cloud_backbone import loading  # noqa: E402
from plora.cloud_backbone.loading import Backbone, BackboneSource  # noqa: E402
from tests.postgres import PostgresServerError, throwaway_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """`make test` runs the tests that start many processes on one worker, and each module of
    an xdist_group on one worker that makes its fixtures once (--dist loadgroup). pytest-xdist
    marks an item's group by rewriting its node id, which pytest 9.2 no longer lets it do
    (pytest-xdist#1386): the groups then split across the workers without a word, and the
    suite made its fleets twice and ran its process-heavy tests side by side. Say so instead."""
    if config.getoption("dist", default=None) == "loadgroup" and not _node_ids_take_groups():
        raise pytest.UsageError(f"--dist loadgroup cannot group tests under pytest {pytest.__version__} "
                                "(pytest-xdist#1386); install a pytest that pyproject.toml's test extra allows")


def _node_ids_take_groups() -> bool:
    """Whether an item's node id follows its `_nodeid`, which pytest-xdist's loadgroup rewrites."""
    probe = object.__new__(pytest.Function)
    probe._nodeid = "test@group"
    try:
        return probe.nodeid == "test@group"
    except AttributeError:  # pytest 9.2 derives the node id from elsewhere
        return False


OFFLINE_PROBE = Path(__file__).resolve().parent / "offline_probe"

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A float32 random Llama with GQA and tied embeddings, frozen, in eval mode."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    return model.eval().requires_grad_(False)


def tiny_backbone(seed: int = 0, **overrides) -> Backbone:
    return Backbone(BackboneSource("tiny", Path("tiny"), f"tiny-hash-{seed}"), tiny_llama(seed, **overrides), None)


@pytest.fixture(autouse=True)
def _isolated_database(tmp_path, monkeypatch):
    monkeypatch.setenv("PLORA_DB_URL", f"sqlite:///{tmp_path / 'registry.db'}")


class OfflineProbe:
    """What the processes a test started said when they first imported huggingface_hub."""

    def __init__(self, folder: Path):
        self.folder = folder

    def offline_kinds(self) -> set[str]:
        """The programs (e.g. "plora", "default_worker.py" for Ray's workers) whose processes
        imported huggingface_hub, every one of them offline by then; fails on any that was not."""
        records = [json.loads(path.read_text()) for path in sorted(self.folder.glob("*.json"))]
        online = [record for record in records if not record["offline"]]
        assert not online, f"processes imported huggingface_hub before going offline: {online}"
        return {Path(record["argv"][0]).name for record in records}


def probe_offline(folder: Path, monkeypatch: pytest.MonkeyPatch) -> OfflineProbe:
    """Processes started under `monkeypatch`'s environment begin without the offline flags, as
    on a machine where nobody set them, and each records in `folder` whether it had gone
    offline itself by the time it first imported huggingface_hub; one that had not fails there
    (tests/offline_probe). For tests that start plora's entry points (the CLI, Flower's app
    processes, Ray's workers), not helpers that rely on inheriting this process's environment."""
    folder.mkdir()
    for flag in OFFLINE_ENV:
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(OFFLINE_PROBE), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PLORA_OFFLINE_PROBE", str(folder))
    return OfflineProbe(folder)


@pytest.fixture
def offline_probe(tmp_path, monkeypatch) -> OfflineProbe:
    """`probe_offline` for the processes this test starts."""
    return probe_offline(tmp_path / "offline-probe", monkeypatch)


@pytest.fixture
def own_port():
    """Takes loopback ports that stay this test's until it ends: each is kept bound, never
    listening, so no other process is handed it, and connecting to it is refused while none of
    the test's services listens there. A port merely found free can be handed to another test's
    service, started on port 0, while this test's service is down; a device retrying then
    reached that stranger (AuthenticationError in the suite)."""
    held = []

    def hold(port: int) -> int:
        holder = socket.socket()
        # gRPC's servers bind with SO_REUSEADDR too, so the test's services can still listen here.
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", port))
        except OSError:
            holder.close()
            raise
        held.append(holder)
        return holder.getsockname()[1]

    def take(consecutive: int = 1) -> int:
        """A port, and the `consecutive` - 1 after it, for a service that numbers its ports on from one."""
        while True:
            first = hold(0)
            try:
                for port in range(first + 1, first + consecutive):
                    hold(port)
                return first
            except OSError:
                continue  # what it held stays held till the end: never handed out twice

    yield take
    for holder in held:
        holder.close()


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2 as a safetensors checkpoint folder (converted once per run)."""
    return loading._converted_copy(loading.resolve(loading.EMBEDDED))


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's tokenizer, read from the embedded GGUF file: a few seconds, where converting the
    whole backbone (embedded_dir) takes half a minute, which only a worker that runs the
    embedded tests then pays."""
    return loading.load_tokenizer(loading.resolve(loading.EMBEDDED).path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny random Llama saved as a Hugging Face checkpoint folder, with SmolLM2's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    tiny_llama(vocab_size=len(smol_tokenizer), pad_token_id=smol_tokenizer.pad_token_id).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def postgres_url():
    """A SQLAlchemy URL of a PostgreSQL server over TCP: PLORA_TEST_POSTGRES_URL when set, else a
    throwaway server started for this run (tests/postgres.py) and stopped at its end."""
    if url := os.environ.get("PLORA_TEST_POSTGRES_URL"):
        yield url
        return
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(throwaway_server())
        except PostgresServerError as error:
            message = f"the PostgreSQL server for the registry tests did not start: {error}"
            raise pytest.fail.Exception(message, pytrace=False) from None
        yield url
