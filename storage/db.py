"""Opening the registry database, and keeping its schema at the newest revision.

Alembic is configured from code, so no alembic.ini is needed at run time: the
migrations ship inside the package, and every ``open_database`` brings an existing
database up to ``head`` before it is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from plora.storage.paths import plora_home

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Named for plora, so the registry can share a PostgreSQL database with other apps.
VERSION_TABLE = "plora_alembic_version"
SQLITE_BUSY_TIMEOUT_MS = 30_000
MIGRATION_LOCK_KEY = int.from_bytes(b"plora-db", "big") >> 1  # a PostgreSQL advisory lock's bigint, plora's own

# One engine per URL per process: engines own connection pools, and the schema needs
# checking only once per process.
_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def default_url() -> str:
    """``$PLORA_DB_URL``, else a SQLite file in ``$PLORA_HOME`` (default ``~/.plora``)."""
    url = os.environ.get("PLORA_DB_URL")
    if url:
        return url
    return f"sqlite:///{plora_home() / 'plora.db'}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # SQLite ignores foreign keys unless asked, per connection.
        cursor.execute("PRAGMA foreign_keys=ON")
        # Several processes (cloud server, CLI) may write; wait rather than fail at once.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def create_registry_engine(url: str) -> Engine:
    """A new engine for ``url``, with the settings the registry relies on."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # configparser treats % as interpolation; URLs may carry %-escaped passwords.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """Holds a SQLite file's migration lock (see _upgrade_to_head)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or database in (None, "", ":memory:"):
        yield
        return
    with open(Path(database).expanduser().with_name(Path(database).name + ".migration-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _upgrade_to_head(engine: Engine) -> None:
    """Processes opening a new database at once (a host's devices, replicas starting together)
    take turns: each found no schema and created it, and all but one failed ("table ...
    already exists", or on PostgreSQL a duplicate type). SQLite's driver runs DDL outside any
    transaction, so a file lock; PostgreSQL, a lock held until the migration commits."""
    config = _alembic_config(engine.url.render_as_string(hide_password=False))
    with _sqlite_file_lock(engine), engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    log.info("registry schema at head on %s", engine.url.render_as_string(hide_password=True))


def open_database(url: str | None = None) -> sessionmaker[Session]:
    """Sessions on the registry at ``url`` (default: ``default_url()``), migrated to head.

    Safe to call repeatedly: the engine for a URL is made and migrated once per process,
    and later calls return sessions on that same engine.
    """
    url = url or default_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_registry_engine(url)
            try:
                _upgrade_to_head(engine)
            except BaseException:
                engine.dispose()
                raise
            _engines[url] = engine
    return sessionmaker(bind=engine, expire_on_commit=False)


def close_all() -> None:
    """Dispose every engine ``open_database`` made (tests, and processes that fork)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
