"""Which ``model`` ids the media routes answer to (speech, art and embedding roles)."""

from __future__ import annotations

from typing import Any

from engine.errors import not_found


def served_ids(role_settings: Any) -> list[str]:
    """The ids a client may pass for this role: its served names, then the configured model."""
    ids = list(getattr(role_settings, "served_names", []))
    if role_settings.model and role_settings.model not in ids:
        ids.append(role_settings.model)
    return ids


def check_model(name: str, role_settings: Any, role: str) -> None:
    """404 ``model_not_found`` (as OpenAI answers) unless ``name`` is served for ``role``."""
    ids = served_ids(role_settings)
    if name not in ids:
        listed = ", ".join(repr(i) for i in ids[:4]) or "none"
        raise not_found(
            f"The model {name!r} does not exist for {role}; this server serves {listed}.",
            "model", "model_not_found",
        )
