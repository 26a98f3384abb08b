"""Alembic scripts of the index (the package proxy._migrations when installed)."""
