"""Bot settings, from the environment (and a .env file when present)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.store.db import POOL_SIZE, default_database_url


class BotSettings(BaseSettings):
    """Every setting the bot reads. Secrets are SecretStr so they never print."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    discord_token: SecretStr | None = Field(default=None, validation_alias="DISCORD_TOKEN")
    database_url: str = Field(default_factory=default_database_url, validation_alias="MASQUE_DATABASE_URL")
    database_pool_size: int = Field(default=POOL_SIZE, ge=1, validation_alias="MASQUE_DATABASE_POOL_SIZE")
    engine_url: str = Field(default="", validation_alias="MASQUE_ENGINE_URL")
    engine_api_key: SecretStr | None = Field(default=None, validation_alias="MASQUE_ENGINE_API_KEY")
    discord_api_base: str | None = Field(default=None, validation_alias="DISCORD_API_BASE")
    discord_gateway_url: str | None = Field(default=None, validation_alias="DISCORD_GATEWAY_URL")
    log_level: str = Field(default="INFO", validation_alias="MASQUE_LOG_LEVEL")
    # The event loop (bot/event_loop.py): uvloop where installed; off: asyncio's own loop.
    uvloop: bool = Field(default=True, validation_alias="MASQUE_UVLOOP")
    # Monitoring (bot/metrics.py): Prometheus GET /metrics on this port (0: off) and address.
    metrics_port: int = Field(default=0, ge=0, le=65535, validation_alias="MASQUE_METRICS_PORT")
    metrics_host: str = Field(default="127.0.0.1", validation_alias="MASQUE_METRICS_HOST")
    # Shards (README "Several bot processes"): how many the bot has in all (unset: Discord's
    # recommendation) and which of them this process runs (unset: all; "0-1", "2,3").
    shard_count: int | None = Field(default=None, ge=1, validation_alias="MASQUE_SHARD_COUNT")
    shard_ids: Annotated[list[int] | None, NoDecode] = Field(default=None, validation_alias="MASQUE_SHARD_IDS")

    # Engine client (bot/engine_client.py). Model ids default to the names our engine serves;
    # set them to the served ids when pointing the bot at vLLM, Ollama or OpenAI.
    engine_chat_model: str = Field(default="masque-chat", validation_alias="MASQUE_ENGINE_CHAT_MODEL")
    engine_image_model: str = Field(default="masque-art", validation_alias="MASQUE_ENGINE_IMAGE_MODEL")
    engine_embedding_model: str = Field(default="masque-embed", validation_alias="MASQUE_ENGINE_EMBEDDING_MODEL")
    engine_transcription_model: str = Field(default="masque-whisper",
                                            validation_alias="MASQUE_ENGINE_TRANSCRIPTION_MODEL")
    engine_speech_model: str = Field(default="masque-tts", validation_alias="MASQUE_ENGINE_SPEECH_MODEL")
    engine_timeout_s: float = Field(default=180.0, gt=0, validation_alias="MASQUE_ENGINE_TIMEOUT_S")
    # Painting a picture on a CPU takes far longer than a chat reply.
    engine_image_timeout_s: float = Field(default=600.0, gt=0, validation_alias="MASQUE_ENGINE_IMAGE_TIMEOUT_S")
    engine_connect_timeout_s: float = Field(default=5.0, gt=0, validation_alias="MASQUE_ENGINE_CONNECT_TIMEOUT_S")
    engine_retries: int = Field(default=1, ge=0, validation_alias="MASQUE_ENGINE_RETRIES")
    engine_unhealthy_s: float = Field(default=30.0, ge=0, validation_alias="MASQUE_ENGINE_UNHEALTHY_S")
    # Local child engine (bot/engine_process.py), used when MASQUE_ENGINE_URL is unset.
    engine_start_timeout_s: float = Field(default=900.0, gt=0, validation_alias="MASQUE_ENGINE_START_TIMEOUT_S")
    engine_preset: str = Field(default="offline", validation_alias="MASQUE_ENGINE_PRESET")
    # Story pipeline (bot/pipeline.py, bot/story/).
    # "auto": the context window less the reply and a margin (bot/prompt_fit.py); a number caps it.
    prompt_token_budget: Annotated[int, Field(ge=256)] | Literal["auto"] = Field(
        default="auto", validation_alias="MASQUE_PROMPT_TOKEN_BUDGET")
    # The context window when the server does not report one (vLLM and our engine do, in /v1/models);
    # when both say, the smaller wins.
    context_window: int | None = Field(default=None, ge=512, validation_alias="MASQUE_CONTEXT_WINDOW")
    # Memory (bot/memory/): recalled older turns per prompt, and how the rolling summary is written.
    recall_turns: int = Field(default=4, ge=0, le=20, validation_alias="MASQUE_RECALL_TURNS")
    summary_min_turns: int = Field(default=8, ge=2, validation_alias="MASQUE_SUMMARY_MIN_TURNS")
    summary_max_tokens: int = Field(default=250, ge=32, validation_alias="MASQUE_SUMMARY_MAX_TOKENS")
    # Replies (bot/story/generation.py, bot/story/shaping.py): the longest a reply may be (a server's
    # /masque samplers reply_tokens and the card's own length instruction lower it), the sampler preset
    # (roleplay, creative, precise, neutral), an optional temperature over the preset's, and whether an
    # unfinished last sentence is trimmed.
    reply_max_tokens: int = Field(default=300, ge=1, validation_alias="MASQUE_REPLY_MAX_TOKENS")
    sampler_preset: Literal["roleplay", "creative", "precise", "neutral"] = Field(
        default="roleplay", validation_alias="MASQUE_SAMPLER_PRESET")
    temperature: float | None = Field(default=None, ge=0, le=2, validation_alias="MASQUE_TEMPERATURE")
    trim_incomplete: bool = Field(default=True, validation_alias="MASQUE_TRIM_INCOMPLETE")
    # Scene art (bot/scene_art.py): cosine similarity at or above which an earlier image is reused.
    scene_reuse_threshold: float = Field(default=0.9, ge=-1, le=1, validation_alias="MASQUE_SCENE_REUSE_THRESHOLD")
    # "WIDTHxHEIGHT", or "" for the engine's default size.
    scene_image_size: str = Field(default="", pattern=r"^(\d+x\d+)?$", validation_alias="MASQUE_SCENE_IMAGE_SIZE")
    # Voice (bot/voice/): spoken replies in a voice channel are short; a voice message is capped.
    voice_reply_max_tokens: int = Field(default=90, ge=8, validation_alias="MASQUE_VOICE_REPLY_MAX_TOKENS")
    voice_message_max_s: float = Field(default=60.0, gt=0, le=600, validation_alias="MASQUE_VOICE_MESSAGE_MAX_S")
    # Turn-taking: a frame is speech above this level; shorter utterances (a cough) are not turns.
    voice_vad_threshold_dbfs: float = Field(default=-45.0, le=0, validation_alias="MASQUE_VOICE_VAD_THRESHOLD_DBFS")
    voice_min_utterance_ms: int = Field(default=300, ge=0, validation_alias="MASQUE_VOICE_MIN_UTTERANCE_MS")
    # Barge-in: a user talking this long over the persona stops its playback (when the server allows it).
    voice_barge_in_ms: int = Field(default=300, ge=20, validation_alias="MASQUE_VOICE_BARGE_IN_MS")
    # Privacy (bot/store/privacy.py): a guild's data is deleted this many days after the bot leaves it.
    guild_retention_days: float = Field(default=30, gt=0, validation_alias="MASQUE_GUILD_RETENTION_DAYS")

    @field_validator("shard_ids", mode="before")
    @classmethod
    def _shard_range(cls, value: object) -> object:
        """ "0-3", "0,2", "4" or a list: the shard ids this process runs, in order."""
        if not isinstance(value, str):
            return value
        ids: list[int] = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            first, _, last = part.partition("-")
            try:
                ids += range(int(first), int(last or first) + 1)
            except ValueError:
                raise ValueError(f"MASQUE_SHARD_IDS: {part!r} is not a shard id or a range such as 0-3") from None
        return ids or None

    @model_validator(mode="after")
    def _shards_fit(self) -> BotSettings:
        if self.shard_ids is None:
            return self
        if self.shard_count is None:
            raise ValueError("MASQUE_SHARD_IDS needs MASQUE_SHARD_COUNT (the bot's shards in all, "
                             "the same in every process)")
        wrong = [i for i in self.shard_ids if not 0 <= i < self.shard_count]
        if wrong or len(set(self.shard_ids)) != len(self.shard_ids):
            raise ValueError(f"MASQUE_SHARD_IDS {self.shard_ids}: each id once, from 0 to "
                             f"{self.shard_count - 1} (MASQUE_SHARD_COUNT={self.shard_count})")
        return self

    @property
    def runs_every_shard(self) -> bool:
        """Whether this process runs all of the bot's shards (the only way SQLite can serve it)."""
        return self.shard_ids is None or len(self.shard_ids) == self.shard_count
