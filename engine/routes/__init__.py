"""HTTP routes. Each module exposes ``routes = web.RouteTableDef()``; engine.app mounts them.

The application keys live here (and are re-exported by :mod:`engine.app`) so route modules can
import them without importing the app factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from engine.metrics import Metrics
    from engine.registry import Registry
    from engine.settings import EngineSettings

SETTINGS: web.AppKey[EngineSettings] = web.AppKey("settings")
REGISTRY: web.AppKey[Registry] = web.AppKey("registry")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
