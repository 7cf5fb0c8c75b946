"""Alembic migrations (shipped in the wheel as bot.migrations)."""
