"""Alembic migrations of the fleet server's schema (``alembic upgrade head`` runs at startup)."""
