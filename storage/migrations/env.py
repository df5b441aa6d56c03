"""Alembic environment for the registry, configured from code (no alembic.ini).

``plora.storage.db`` passes an open connection in ``config.attributes["connection"]`` so
migrations run with the same engine settings (SQLite foreign keys, busy timeout) as the
application. Without one (e.g. the ``alembic`` CLI pointed at this folder), an engine is
made from the ``sqlalchemy.url`` option.
"""

from alembic import context
from plora.storage.db import VERSION_TABLE, create_registry_engine
from plora.storage.models import Base

config = context.config


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
elif (conn := config.attributes.get("connection")) is not None:
    _run(conn)
else:
    engine = create_registry_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.begin() as own:
            _run(own)
    finally:
        engine.dispose()
