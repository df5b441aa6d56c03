"""The registry's device lifecycle: enrollment tokens, revocation, forgetting, and migration 0003.

Runs on SQLite and on PostgreSQL, as test_storage does.
"""

import threading
from datetime import timedelta

import pytest
from alembic import command
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import OperationalError

from plora.storage import db, device_lifecycle
from plora.storage.errors import AuthenticationError, RegistryError
from plora.storage.models import Base, Device, utcnow
from plora.storage.registry import Registry
from tests.unit.test_storage import DEVICE_1, DEVICE_2, _backbone, db_url, registry, schema_at, write_early_rows  # noqa: F401 (fixtures)

DEVICE_3 = "0" * 31 + "3"


def test_a_token_enrolls_as_many_devices_as_it_allows_then_is_used_up(registry):
    _backbone(registry)
    record, token = registry.issue_enrollment_token(uses=2, label="lab")
    registry.register_device(DEVICE_1, "v1", enrollment_token=token)
    registry.register_device(DEVICE_2, "v1", enrollment_token=token)
    with pytest.raises(AuthenticationError, match=rf"enrollment token {record.id} is used up: all 2 enrollments"):
        registry.register_device(DEVICE_3, "v1", enrollment_token=token)
    with pytest.raises(RegistryError, match="no device"):
        registry.get_device(DEVICE_3)  # a refused enrollment records nothing
    (listed,) = registry.list_enrollment_tokens()
    assert (listed.uses, listed.uses_left, listed.label) == (2, 0, "lab")
    assert token not in {listed.token_hash} and len(listed.token_hash) == 64  # only its hash is kept


def test_a_refused_registration_uses_up_nothing(registry):
    _backbone(registry)
    _, token = registry.issue_enrollment_token(uses=1)
    with pytest.raises(RegistryError, match="no backbone version"):
        registry.register_device(DEVICE_1, "v9", enrollment_token=token)
    registry.register_device(DEVICE_1, "v1", enrollment_token=token)
    assert registry.list_enrollment_tokens()[0].uses_left == 0


def test_unknown_revoked_and_expired_tokens_are_refused_saying_why(registry, monkeypatch):
    _backbone(registry)
    with pytest.raises(AuthenticationError, match="not one this service issued"):
        registry.register_device(DEVICE_1, "v1", enrollment_token="guessed")
    revoked, revoked_token = registry.issue_enrollment_token(uses=5)
    registry.revoke_enrollment_token(revoked.id)
    with pytest.raises(AuthenticationError, match=rf"token {revoked.id} was revoked"):
        registry.register_device(DEVICE_1, "v1", enrollment_token=revoked_token)
    expiring, expiring_token = registry.issue_enrollment_token(uses=5, expires_at=utcnow() + timedelta(days=7))
    later = utcnow() + timedelta(days=8)
    monkeypatch.setattr(device_lifecycle, "utcnow", lambda: later)
    with pytest.raises(AuthenticationError, match=rf"token {expiring.id} expired on"):
        registry.register_device(DEVICE_1, "v1", enrollment_token=expiring_token)
    monkeypatch.undo()
    registry.register_device(DEVICE_1, "v1", enrollment_token=expiring_token)  # still valid today


@pytest.mark.parametrize("uses, expires_in", [(0, None), (-1, None), (True, None), (1, timedelta(seconds=-1))])
def test_a_token_must_allow_an_enrollment_in_the_future(registry, uses, expires_in):
    with pytest.raises(RegistryError, match="enrollment token allows|in the future"):
        registry.issue_enrollment_token(uses=uses, expires_at=None if expires_in is None else utcnow() + expires_in)


def test_devices_racing_for_a_tokens_last_uses_get_exactly_that_many(registry):
    _backbone(registry)
    _, token = registry.issue_enrollment_token(uses=2)
    outcomes: list[str] = []

    def enroll(n: int) -> None:
        try:
            registry.register_device(f"{n:032x}", "v1", enrollment_token=token)
            outcomes.append("enrolled")
        except AuthenticationError:
            outcomes.append("refused")
        except OperationalError as err:  # would be a locking bug, reported as such
            outcomes.append(f"database error: {err}")

    threads = [threading.Thread(target=enroll, args=(n,)) for n in range(1, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["enrolled"] * 2 + ["refused"] * 4
    assert len(registry.list_devices()) == 2


def test_revoked_and_forgotten_devices_are_inactive(registry):
    _backbone(registry)
    for device in (DEVICE_1, DEVICE_2):
        registry.register_device(device, "v1")
    assert registry.inactive_devices([DEVICE_1, DEVICE_2]) == {}
    first = registry.revoke_device(DEVICE_1).revoked_at
    assert registry.revoke_device(DEVICE_1).revoked_at == first  # a second revoke keeps the first date
    registry.forget_device(DEVICE_2)
    assert registry.inactive_devices([DEVICE_1, DEVICE_2]) == {
        DEVICE_1: "the operator revoked the device", DEVICE_2: "the device was forgotten"}
    with pytest.raises(RegistryError, match="no device"):
        registry.revoke_device(DEVICE_3)


def test_forgetting_a_device_leaves_no_row_that_refers_to_it(registry, db_url):
    _backbone(registry)
    registry.register_device(DEVICE_1, "v1", token_hash="c" * 64)
    registry.register_device(DEVICE_2, "v1")
    for device in (DEVICE_1, DEVICE_1, DEVICE_2):
        registry.start_job(device, "personalize", {"lr": 0.01})
    assert registry.forget_device(DEVICE_1) == {"jobs": 2, "devices": 1}
    engine = db.create_registry_engine(db_url)
    try:
        with engine.connect() as connection:
            # Every column that refers to a device, in whatever tables the schema has.
            for table in Base.metadata.sorted_tables:
                for key in table.foreign_keys:
                    if key.column.table is Device.__table__:
                        left = connection.scalar(select(key.parent).where(key.parent == DEVICE_1).limit(1))
                        assert left is None, f"{table.name}.{key.parent.name} still refers to the forgotten device"
            assert connection.scalar(select(Device.id).where(Device.id == DEVICE_1)) is None
    finally:
        engine.dispose()
    assert [j.device_id for j in registry.list_jobs()] == [DEVICE_2]  # the other device keeps its records
    assert registry.forget_device(DEVICE_1) == {}  # forgetting twice is harmless


def test_migration_0003_upgrades_and_downgrades_keeping_devices_and_jobs(db_url):
    schema_at(db_url, "0002")
    engine = db.create_registry_engine(db_url)
    try:
        with engine.begin() as connection:  # rows as plora 0002 wrote them
            write_early_rows(connection)
        schema_at(db_url, "0003")
        registry = Registry(db.open_database(db_url))
        assert registry.get_device(DEVICE_1).revoked_at is None
        registry.issue_enrollment_token(uses=3)
        registry.revoke_device(DEVICE_1)
        db.close_all()
        schema_at(db_url, "0002", command.downgrade)
        with engine.connect() as connection:
            schema = inspect(connection)
            assert "enrollment_tokens" not in schema.get_table_names()
            assert "revoked_at" not in {c["name"] for c in schema.get_columns("devices")}
            assert connection.scalar(text("SELECT count(*) FROM jobs WHERE device_id = :id"), {"id": DEVICE_1}) == 1
        schema_at(db_url, "0003")
        assert Registry(db.open_database(db_url)).get_device(DEVICE_1).revoked_at is None
    finally:
        engine.dispose()
