"""Durable storage: SQLite (default) and Redis (cluster mode)."""
