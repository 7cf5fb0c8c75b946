"""Bot settings, from the environment (and a .env file when present)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.store.db import default_database_url


class BotSettings(BaseSettings):
    """Every setting the bot reads. Secrets are SecretStr so they never print."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    discord_token: SecretStr | None = Field(default=None, validation_alias="DISCORD_TOKEN")
    database_url: str = Field(default_factory=default_database_url, validation_alias="MASQUE_DATABASE_URL")
    engine_url: str = Field(default="", validation_alias="MASQUE_ENGINE_URL")
    engine_api_key: SecretStr | None = Field(default=None, validation_alias="MASQUE_ENGINE_API_KEY")
    discord_api_base: str | None = Field(default=None, validation_alias="DISCORD_API_BASE")
    discord_gateway_url: str | None = Field(default=None, validation_alias="DISCORD_GATEWAY_URL")
    log_level: str = Field(default="INFO", validation_alias="MASQUE_LOG_LEVEL")
