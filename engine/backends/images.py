"""Text to image with diffusers (any text-to-image pipeline ``from_pretrained`` can open).

Safety, switched per request by the caller (``safety=True`` unless the caller turns it off):

1. The prompt is checked against :data:`BLOCKED_TERMS` (whole words, any case); a match is
   refused with :class:`ContentBlocked` before the GPU is spent.
2. :data:`SAFETY_NEGATIVE` is added to the negative prompt, steering a real model away.
3. When the loaded pipeline has a safety checker (SD 1.x ships one), it runs and any flagged
   image makes the whole request fail with :class:`ContentBlocked`. With safety off the same
   pipeline components run without the checker. Pipelines without a checker (SDXL-Turbo, the
   tiny offline one) rely on steps 1 and 2 only: a coarse guard, not a classifier.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from engine.backends import pick_device, pick_dtype

log = logging.getLogger(__name__)

BLOCKED_TERMS = (
    "nsfw", "nude", "nudes", "nudity", "naked", "porn", "porno", "pornographic", "pornography",
    "sex", "sexual", "sexy", "explicit", "erotic", "erotica", "hentai", "topless", "bottomless",
    "genital", "genitals", "penis", "vagina", "nipple", "nipples", "lingerie", "fetish",
    "gore", "gory", "dismembered", "decapitated", "mutilated",
)
SAFETY_NEGATIVE = "nsfw, nudity, sexual content, gore"
FALLBACK_NATIVE_SIZE = 512  # for pipelines whose config does not say
MAX_SEED = 2**32 - 1


class ContentBlocked(ValueError):
    """The prompt or a generated image was refused by the safety switch."""


@dataclass(frozen=True)
class GeneratedImages:
    """Images (PIL) and what made them, so a caller can reproduce one."""

    images: list[Any]
    seeds: list[int]
    steps: int
    width: int
    height: int


def blocked_terms(text: str) -> list[str]:
    """The :data:`BLOCKED_TERMS` found in ``text`` as whole words."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return [term for term in BLOCKED_TERMS if term in words]


def _load_pipeline(model: str, device: str, dtype: str, cache_dir: str) -> Any:
    """AutoPipelineForText2Image first (it picks the text-to-image class of any family), then
    DiffusionPipeline for repos AutoPipeline has no mapping for."""
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline
    from diffusers.utils import deprecation_utils

    # diffusers renamed torch_dtype to dtype (the old name warns); older releases know only it.
    dtype_key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    kwargs = {dtype_key: pick_dtype(dtype, pick_device(device)), "cache_dir": cache_dir}
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(model, **kwargs)
    except ValueError as exc:  # "AutoPipeline can't find a pipeline linked to ..."
        log.info("AutoPipelineForText2Image cannot open %s (%s); using DiffusionPipeline",
                 model, exc)
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class DiffusersImages:
    """One loaded pipeline; with a checker-free twin sharing its weights when it has a checker."""

    name = "diffusers"

    def __init__(self, pipe: Any, device: str, default_steps: int = 25,
                 guidance_scale: float | None = None) -> None:
        self.pipe = pipe
        self.device = device
        self.default_steps = default_steps
        self.guidance_scale = guidance_scale
        self.has_checker = getattr(pipe, "safety_checker", None) is not None
        # A pipeline call mutates its scheduler (set_timesteps): one call at a time, even
        # when the role is given several worker threads.
        self._lock = threading.Lock()
        self._unchecked = pipe
        if self.has_checker:
            # from_pipe shares every module with `pipe`: no second copy of the weights.
            self._unchecked = type(pipe).from_pipe(pipe, safety_checker=None,
                                                   requires_safety_checker=False)
            self._unchecked.set_progress_bar_config(disable=True)

    @property
    def native_size(self) -> int:
        """The side the model was trained at: its denoiser's sample size in latent pixels
        times the VAE's scale factor."""
        denoiser = getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
        scale = getattr(self.pipe, "vae_scale_factor", None)
        if isinstance(sample, int) and isinstance(scale, int):
            return sample * scale
        return FALLBACK_NATIVE_SIZE

    def generate(
        self,
        prompt: str,
        width: int,
        height: int,
        n: int = 1,
        negative_prompt: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        safety: bool = True,
    ) -> GeneratedImages:
        """Paint ``n`` images of ``width`` x ``height``; image ``i`` uses seed ``seed + i``.

        Raises :class:`ContentBlocked` when ``safety`` is on and the prompt or an image is
        refused (see the module docstring for what the switch does).
        """
        import torch

        if safety:
            found = blocked_terms(prompt)
            if found:
                raise ContentBlocked(f"The prompt was refused by the safety filter ({found[0]!r}).")
            negative_prompt = ", ".join(p for p in (negative_prompt, SAFETY_NEGATIVE) if p)
        base_seed = random.randint(0, MAX_SEED) if seed is None else seed
        seeds = [(base_seed + i) % (MAX_SEED + 1) for i in range(n)]
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        kwargs: dict[str, Any] = {
            "prompt": prompt, "negative_prompt": negative_prompt or None,
            "width": width, "height": height, "num_images_per_prompt": n,
            "num_inference_steps": steps or self.default_steps, "generator": generators,
        }
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        pipe = self.pipe if safety else self._unchecked
        with self._lock, torch.inference_mode():
            output = pipe(**kwargs)
        flagged = getattr(output, "nsfw_content_detected", None)
        if safety and flagged and any(flagged):
            raise ContentBlocked("A generated image was flagged by the safety checker.")
        return GeneratedImages(list(output.images), seeds, kwargs["num_inference_steps"],
                               width, height)


def load(role_settings: Any, settings: Any) -> DiffusersImages:
    """Load the configured pipeline (blocking; the registry runs it in a thread)."""
    device = pick_device(role_settings.device).type
    pipe = _load_pipeline(role_settings.model, device, role_settings.dtype,
                          str(settings.cache_dir / "hub"))
    return DiffusersImages(pipe, device, role_settings.default_steps, role_settings.guidance_scale)


def measure_image_seconds(backend: DiffusersImages, size: int = 64, steps: int = 2) -> float:
    """Seconds for one ``size`` x ``size`` image after a warm-up (for the benchmark)."""
    backend.generate("a castle on a hill", size, size, steps=steps, seed=0)
    started = time.perf_counter()
    backend.generate("a castle on a hill", size, size, steps=steps, seed=0)
    return time.perf_counter() - started
