"""The platform registry: schema and migrations, records, and what it refuses to store.

Every test runs on SQLite in tmp_path and on PostgreSQL: the run's throwaway server, or the
database PLORA_TEST_POSTGRES_URL names (see the postgres_url fixture). The registry tables
are dropped before each PostgreSQL test.
"""

import dataclasses
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import LargeBinary, inspect, text
from sqlalchemy.exc import IntegrityError

from plora.storage import db
from plora.storage.errors import CapacityError, RegistryError
from plora.storage.models import Base
from plora.storage.registry import Registry

HASH_A, HASH_B = "a" * 64, "b" * 64
DEVICE_1, DEVICE_2 = "0" * 31 + "1", "0" * 31 + "2"
ARCH = {"model_type": "llama", "num_layers": 30, "hidden_size": 576, "vocab_size": 49152, "parameters": 134515008}
ADAPTER = {"rank": 8, "targets": ["q_proj", "v_proj"]}
TABLES = {"backbone_versions", "devices", "jobs", "enrollment_tokens"}


def _reset_postgres(url: str) -> None:
    engine = db.create_registry_engine(url)
    try:
        with engine.begin() as connection:
            Base.metadata.drop_all(connection)
            connection.execute(text(f"DROP TABLE IF EXISTS {db.VERSION_TABLE}"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        _reset_postgres(url)
    yield url
    db.close_all()


@pytest.fixture
def registry(db_url):
    return Registry(db.open_database(db_url))


def schema_at(url: str, revision: str, step=command.upgrade) -> None:
    """Take the database at `url` to `revision` of the registry's migrations (up, or down with
    command.downgrade), as alembic runs them on the registry's own settings."""
    engine = db.create_registry_engine(url)
    try:
        with engine.begin() as connection:
            config = db._alembic_config(url)
            config.attributes["connection"] = connection
            step(config, revision)
    finally:
        engine.dispose()


def _backbone(registry, name="v1", content_hash=HASH_A, **overrides):
    fields = dict(source="embedded", architecture=ARCH, content_hash=content_hash, seed=7, adapter_config=ADAPTER)
    return registry.register_backbone(name, **{**fields, **overrides})


def test_upgrade_from_empty_database_creates_schema_equal_to_models(db_url):
    schema_at(db_url, "head")
    engine = db.create_registry_engine(db_url)
    try:
        with engine.connect() as connection:
            assert TABLES | {db.VERSION_TABLE} <= set(inspect(connection).get_table_names())
            context = MigrationContext.configure(
                connection, opts={"version_table": db.VERSION_TABLE, "compare_type": True}
            )
            assert compare_metadata(context, Base.metadata) == []
            assert context.get_current_revision() == "0004"
    finally:
        engine.dispose()


def write_early_rows(connection) -> None:
    """A backbone version, a device and a job, as the first schemas (0001, 0002) stored them."""
    connection.execute(text(
        "INSERT INTO backbone_versions (name, source, architecture, content_hash, seed, adapter_config, status, created_at)"
        " VALUES ('v1', 'embedded', '{}', :hash, 7, '{}', 'active', CURRENT_TIMESTAMP)"), {"hash": HASH_A})
    connection.execute(text(
        "INSERT INTO devices (id, backbone_version_id, created_at) SELECT :id, id, CURRENT_TIMESTAMP FROM backbone_versions"), {"id": DEVICE_1})
    connection.execute(text(
        "INSERT INTO jobs (device_id, backbone_version_id, kind, status, created_at, params, tokens_processed, steps_done)"
        " SELECT :id, id, 'personalize', 'succeeded', CURRENT_TIMESTAMP, '{}', 10, 2 FROM backbone_versions"), {"id": DEVICE_1})


def test_upgrade_from_the_previous_schema_keeps_existing_records(db_url):
    schema_at(db_url, "0001")
    engine = db.create_registry_engine(db_url)
    try:
        with engine.begin() as connection:  # rows as plora 0001 wrote them
            write_early_rows(connection)
    finally:
        engine.dispose()
    registry = Registry(db.open_database(db_url))  # brings the schema to head
    (old_job,) = registry.list_jobs(DEVICE_1)
    assert (old_job.kind, old_job.status, old_job.steps_done, old_job.target_backbone_version_id) == ("personalize", "succeeded", 2, None)
    assert re.fullmatch("[0-9a-f]{32}", old_job.uuid) and old_job.reported_status is None  # named by 0004
    assert registry.get_device(DEVICE_1).backbone_version_id == registry.get_backbone("v1").id
    v2 = _backbone(registry, "v2", HASH_B)
    job = registry.start_job(DEVICE_1, "migrate", {"method": "copy"}, target="v2")
    assert registry.list_jobs(DEVICE_1)[0].target_backbone_version_id == v2.id == registry.get_job(job).target_backbone_version_id


def test_opening_twice_in_one_process_and_again_after_close_is_harmless(db_url):
    first = Registry(db.open_database(db_url))
    _backbone(first)
    second = Registry(db.open_database(db_url))
    db.close_all()  # the next open migrates an up-to-date database, as a new process would
    third = Registry(db.open_database(db_url))
    assert [b.name for b in second.list_backbones()] == [b.name for b in third.list_backbones()] == ["v1"]


# Each process imports first, then opens the registry at one shared instant.
OPEN_AT_ONCE = """
import sys, time
from plora.storage import db
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
db.open_database(sys.argv[1])
"""


def test_processes_opening_a_new_database_at_once_all_find_it_ready(db_url):
    # Several device processes of one host (a simulated fleet's workers) share its registry. They
    # raced to create the schema: "table backbone_versions already exists", and a job failed.
    at = time.time() + 8
    processes = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, db_url, str(at)], stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * 6, "\n".join(errors)[-3000:]
    assert TABLES <= set(inspect(db.create_registry_engine(db_url)).get_table_names())


def test_replicas_registering_one_version_at_once_all_get_the_same_record(registry):
    # Backbone replicas that share a registry start together, and each registers the version it
    # serves on first sight: all but one find the name taken between their check and their insert.
    writers = 8
    for name in ("v1", "v2", "v3"):
        at_once = threading.Barrier(writers)

        def register(name=name, at_once=at_once):
            at_once.wait()
            return _backbone(registry, name).id

        with ThreadPoolExecutor(writers) as pool:
            ids = list(pool.map(lambda _: register(), range(writers)))
        assert len(set(ids)) == 1, ids
    assert [b.name for b in registry.list_backbones()] == ["v1", "v2", "v3"]


def test_default_url_prefers_env_url_then_sqlite_in_plora_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PLORA_DB_URL", "postgresql+psycopg://u@h/plora")
    assert db.default_url() == "postgresql+psycopg://u@h/plora"
    monkeypatch.delenv("PLORA_DB_URL")
    monkeypatch.setenv("PLORA_HOME", str(tmp_path / "home"))
    assert db.default_url() == f"sqlite:///{tmp_path / 'home' / 'plora.db'}"
    assert (tmp_path / "home").is_dir()


def test_backbone_round_trips_through_register_get_and_list(registry):
    made = _backbone(registry)
    child = _backbone(registry, "v2", HASH_B, parent_id=made.id)
    by_name, by_id = registry.get_backbone("v1"), registry.get_backbone(made.id)
    assert (by_name.id, by_id.name) == (made.id, "v1")
    assert (by_name.architecture, by_name.adapter_config, by_name.seed) == (ARCH, ADAPTER, 7)
    assert by_name.status == "active" and by_name.created_at.tzinfo == timezone.utc
    assert (registry.get_backbone("v2").id, registry.get_backbone("v2").parent_id) == (child.id, made.id)
    assert [b.name for b in registry.list_backbones()] == ["v1", "v2"]


@pytest.mark.parametrize(
    ("changed", "value"),
    [("source", "/models/other"), ("content_hash", HASH_B), ("seed", 8), ("adapter_config", {"rank": 4})],
)
def test_same_name_with_different_content_conflicts(registry, changed, value):
    _backbone(registry)
    with pytest.raises(RegistryError, match=rf"'v1' already exists.*differs in {changed}"):
        _backbone(registry, **{changed: value})


def test_identical_registration_is_idempotent(registry):
    first = _backbone(registry)
    assert _backbone(registry).id == first.id
    assert len(registry.list_backbones()) == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.get_backbone("nope"), r"no backbone version 'nope'; registered: 'v1'"),
        (lambda r: r.get_device(DEVICE_2), r"no device '0+2' \(1 devices registered\)"),
        (lambda r: r.bind_device(DEVICE_1, "nope"), r"no backbone version 'nope'"),
        (lambda r: r.fail_job(999, "boom"), r"no job 999"),
        (lambda r: r.set_backbone_status("v1", "paused"), r"'paused' is not one of active, deprecated, retired"),
        (lambda r: r.start_job(DEVICE_1, "train", {}), r"job kind 'train' is not one of"),
        (lambda r: r.register_device("not-a-uuid", "v1"), r"not a uuid4 hex"),
        (lambda r: _backbone(r, "v9", content_hash="xyz"), r"not a lowercase sha256"),
    ],
)
def test_missing_or_invalid_requests_name_what_was_asked(registry, call, message):
    _backbone(registry)
    registry.register_device(DEVICE_1, "v1")
    with pytest.raises(RegistryError, match=message):
        call(registry)


def test_device_is_bound_to_exactly_one_version_and_can_be_rebound(registry):
    _backbone(registry)
    _backbone(registry, "v2", HASH_B)
    device = registry.register_device(DEVICE_1, "v1", label="phone", token_hash="sha256:" + "c" * 64)
    assert registry.register_device(DEVICE_1, "v1", "phone", "sha256:" + "c" * 64).id == device.id
    with pytest.raises(RegistryError, match="already registered"):
        registry.register_device(DEVICE_1, "v2")
    assert [d.id for d in registry.devices_on("v1")] == [DEVICE_1]
    moved = registry.bind_device(DEVICE_1, "v2")
    assert moved.backbone_version_id == registry.get_backbone("v2").id
    assert registry.devices_on("v1") == [] and [d.id for d in registry.devices_on("v2")] == [DEVICE_1]


def test_retire_is_refused_while_devices_are_bound_unless_forced(registry):
    _backbone(registry)
    _backbone(registry, "v2", HASH_B)
    registry.register_device(DEVICE_1, "v1")
    with pytest.raises(RegistryError, match="1 device.*still bound to 'v1'"):
        registry.set_backbone_status("v1", "retired")
    assert registry.get_backbone("v1").status == "active"
    registry.bind_device(DEVICE_1, "v2")
    assert registry.set_backbone_status("v1", "retired").status == "retired"
    assert registry.set_backbone_status("v2", "retired", force=True).status == "retired"
    assert [d.id for d in registry.devices_on("v2")] == [DEVICE_1]  # stranded, and said so by devices_on


def test_retired_version_accepts_no_devices(registry):
    _backbone(registry)
    registry.register_device(DEVICE_1, "v1")
    assert registry.set_backbone_status("v1", "retired", force=True).status == "retired"
    for call in (lambda: registry.register_device(DEVICE_2, "v1"), lambda: registry.bind_device(DEVICE_1, "v1")):
        with pytest.raises(RegistryError, match="retired"):
            call()


def test_database_enforces_foreign_keys(registry, db_url):
    engine = db.create_registry_engine(db_url)
    try:
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(
                text("INSERT INTO devices (id, backbone_version_id, created_at) VALUES (:id, 999, :now)"),
                {"id": DEVICE_2, "now": "2026-01-01 00:00:00"},
            )
    finally:
        engine.dispose()


def test_job_lifecycle_start_finish(registry):
    _backbone(registry)
    _backbone(registry, "v2", HASH_B)
    registry.register_device(DEVICE_1, "v1")
    job_id = registry.start_job(DEVICE_1, "personalize", {"lr": 1e-3, "steps": 100, "targets": ["q_proj"]})
    registry.bind_device(DEVICE_1, "v2")  # the job keeps the version it started on
    done = registry.finish_job(job_id, {"loss": 2.5}, {"loss": 1.9, "improved": True}, 51200, 100)
    assert (done.status, done.steps_done, done.tokens_processed) == ("succeeded", 100, 51200)
    assert done.metrics_after == {"loss": 1.9, "improved": True}
    assert done.backbone_version_id == registry.get_backbone("v1").id
    assert done.started_at <= done.ended_at and done.ended_at.tzinfo == timezone.utc
    assert registry.get_device(DEVICE_1).last_seen_at is not None
    with pytest.raises(RegistryError, match="already succeeded"):
        registry.fail_job(job_id, "late")


@pytest.mark.parametrize(("end", "status"), [("fail_job", "failed"), ("interrupt_job", "interrupted")])
def test_job_lifecycle_start_then_end_with_reason(registry, end, status):
    _backbone(registry)
    registry.register_device(DEVICE_1, "v1")
    job_id = registry.start_job(DEVICE_1, "personalize", {})
    ended = getattr(registry, end)(job_id, "DataError: no training text")
    assert (ended.status, ended.reason, ended.metrics_after) == (status, "DataError: no training text", None)
    [listed] = registry.list_jobs(DEVICE_1)
    assert (listed.id, listed.status) == (job_id, status)


def test_list_jobs_is_newest_first_and_limited(registry):
    _backbone(registry)
    for device in (DEVICE_1, DEVICE_2):
        registry.register_device(device, "v1")
    ids = [registry.start_job(d, "personalize", {}) for d in (DEVICE_1, DEVICE_2, DEVICE_1)]
    assert [j.id for j in registry.list_jobs()] == ids[::-1]
    assert [j.id for j in registry.list_jobs(DEVICE_1, limit=1)] == [ids[2]]


@pytest.mark.parametrize(
    "bad",
    [
        {"loss": [1.0, 2.0]},
        {"loss": [[0.1, 0.2], [0.3, 0.4]]},
        {"eval": {"loss": 1.0}},
        {"loss": float("nan")},
        {"note": "the user wrote: " + "x" * 200},
        {"m": None},
        {1: 1.0},
        "tensor",
    ],
    ids=["list", "nested-list", "nested-dict", "nan", "long-text", "null", "int-key", "tensor"],
)
def test_metrics_that_could_carry_tensors_or_text_are_refused(registry, bad):
    import torch

    if bad == "tensor":
        bad = {"matrix_M": torch.zeros(8, 8)}
    _backbone(registry)
    registry.register_device(DEVICE_1, "v1")
    job_id = registry.start_job(DEVICE_1, "personalize", {})
    with pytest.raises(RegistryError):
        registry.finish_job(job_id, None, bad, 0, 0)
    with pytest.raises(RegistryError):
        registry.start_job(DEVICE_1, "personalize", {"matrix": [[1.0, 2.0]]})
    assert registry.list_jobs(DEVICE_1)[0].status == "running"


def test_no_column_can_hold_a_blob(registry, db_url):
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            assert not isinstance(column.type, LargeBinary), f"{table.name}.{column.name}"
    engine = db.create_registry_engine(db_url)
    try:
        inspector = inspect(engine)
        for table in TABLES:
            for column in inspector.get_columns(table):
                type_name = str(column["type"]).upper()
                assert not isinstance(column["type"], LargeBinary), f"{table}.{column['name']}"
                assert "BLOB" not in type_name and "BYTEA" not in type_name, f"{table}.{column['name']}"
    finally:
        engine.dispose()


def test_a_version_is_found_by_the_stem_of_its_name_when_that_is_unambiguous(registry):
    made = _backbone(registry, "smol-1a2b3c4d")
    assert registry.get_backbone("smol").id == made.id
    _backbone(registry, "smol-99999999", HASH_B)
    with pytest.raises(RegistryError, match="could be any of 'smol-1a2b3c4d', 'smol-99999999'"):
        registry.get_backbone("smol")
    with pytest.raises(RegistryError, match="no backbone version 'smo'"):
        registry.get_backbone("smo")
    with pytest.raises(RegistryError, match="no backbone version 'sm%l'"):
        registry.get_backbone("sm%l")  # LIKE wildcards in a name are literal


def test_new_devices_go_to_the_version_activated_last(registry):
    assert registry.default_backbone() is None
    _backbone(registry, "v1")
    _backbone(registry, "v2", HASH_B)
    assert registry.default_backbone().name == "v2"
    registry.set_backbone_status("v2", "deprecated")
    assert registry.default_backbone().name == "v1"
    registry.set_backbone_status("v2", "active")
    assert registry.default_backbone().name == "v2"


def test_migrate_jobs_name_their_target_and_are_found_by_it(registry):
    _backbone(registry)
    _backbone(registry, "v2", HASH_B)
    registry.register_device(DEVICE_1, "v1")
    with pytest.raises(RegistryError, match="needs a target"):
        registry.start_job(DEVICE_1, "migrate", {})
    with pytest.raises(RegistryError, match="only a migrate job"):
        registry.start_job(DEVICE_1, "personalize", {}, target="v2")
    first = registry.start_job(DEVICE_1, "migrate", {"method": "distill"}, target="v2")
    registry.interrupt_job(first, "KeyboardInterrupt")
    registry.start_job(DEVICE_1, "personalize", {})
    assert [j.id for j in registry.migration_jobs(DEVICE_1, "v2")] == [first]
    assert registry.migration_jobs(DEVICE_1, "v1") == []


def test_a_devices_jobs_are_reported_once_per_status_and_recorded_by_uuid(registry, tmp_path):
    _backbone(registry)
    registry.register_device(DEVICE_1, "v1")
    job = registry.start_job(DEVICE_1, "personalize", {"lr": 0.01})
    (running,) = registry.jobs_to_report(DEVICE_1)
    registry.mark_reported({running.uuid: running.status})
    assert registry.jobs_to_report(DEVICE_1) == []
    registry.finish_job(job, {"loss": 3.0}, {"loss": 1.0}, 100, 4)
    (finished,) = registry.jobs_to_report(DEVICE_1)  # a new status is news again
    report = registry.job_report(finished)
    assert (report.uuid, report.status, report.version, report.steps_done) == (running.uuid, "succeeded", "v1", 4)

    # The service's registry: another database, which knows the version and the device.
    service = Registry(db.open_database(f"sqlite:///{tmp_path / 'service.db'}"))
    _backbone(service)
    service.register_device(DEVICE_1, "v1")
    service.register_device(DEVICE_2, "v1")
    for _ in range(2):  # a report sent again (a retry, a lost reply) changes nothing
        service.record_job_report(DEVICE_1, report)
    (recorded,) = service.list_jobs()
    assert (recorded.uuid, recorded.device_id, recorded.status, recorded.metrics_after) == (report.uuid, DEVICE_1, "succeeded", {"loss": 1.0})
    with pytest.raises(RegistryError, match="another device's"):
        service.record_job_report(DEVICE_2, report)
    with pytest.raises(RegistryError, match="no backbone version"):
        service.record_job_report(DEVICE_1, dataclasses.replace(report, version="v9"))
    with pytest.raises(RegistryError, match="32 lowercase hex"):
        service.record_job_report(DEVICE_1, dataclasses.replace(report, uuid="../../etc"))
    with pytest.raises(RegistryError):  # a job's metadata never carries a tensor's worth of numbers
        service.record_job_report(DEVICE_1, dataclasses.replace(report, metrics_after={"m": list(range(1000))}))
    with pytest.raises(CapacityError, match="has 1 jobs on record"):  # nor do reports fill the database
        service.record_job_report(DEVICE_1, dataclasses.replace(report, uuid="f" * 32), max_jobs=1)
