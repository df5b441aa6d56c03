"""Alembic migrations for the platform registry (shipped as package data)."""
