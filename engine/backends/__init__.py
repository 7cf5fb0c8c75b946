"""Model backends: they hold the models and never see HTTP.

Each backend module exposes ``load(role_settings, settings) -> backend`` (blocking, called in a
thread by :class:`engine.registry.Registry`). The helpers here pick devices and dtypes the
same way for every role.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` means bfloat16 on CUDA and float32 elsewhere (CPU half precision is slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]
