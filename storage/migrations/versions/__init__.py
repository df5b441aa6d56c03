"""Alembic revision scripts, applied in order by ``plora.storage.db.open_database``."""
