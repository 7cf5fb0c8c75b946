"""Image captioner of the composed path: any transformers image-to-text model.

Encoder-decoder captioners (BLIP, GIT...) get the image and an optional conditioning prompt;
chat VLMs (a processor with a chat template, e.g. LLaVA or Qwen2-VL) get one user turn asking
for a description. Greedy decoding: a caption is a fact about the image, not a creative turn.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from engine.backends import pick_device, pick_dtype
from engine.settings import CaptionSettings, EngineSettings

log = logging.getLogger(__name__)

CHAT_PROMPT = "Describe this image in one sentence."
NO_CAPTION = "(no description)"


class Captioner:
    """Describes images in a sentence."""

    def __init__(self, model: Any, processor: Any, role: CaptionSettings) -> None:
        self.model = model
        self.processor = processor
        self.role = role
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype
        self._lock = threading.Lock()  # one generate at a time on this model

    def _inputs(self, image: Image.Image) -> dict[str, torch.Tensor]:
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": self.role.prompt or CHAT_PROMPT},
            ]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=[image], text=text, return_tensors="pt")
        elif self.role.prompt:
            inputs = self.processor(images=image, text=self.role.prompt, return_tensors="pt")
        else:
            inputs = self.processor(images=image, return_tensors="pt")
        return {
            key: value.to(self._device, self._dtype if value.is_floating_point() else None)
            for key, value in inputs.items()
        }

    def caption(self, image: Image.Image) -> str:
        """One sentence about ``image`` (blocking; run it on the caption queue)."""
        inputs = self._inputs(image)
        with self._lock, torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.role.max_new_tokens, do_sample=False
            )
        prompt = inputs.get("input_ids")
        if prompt is not None and not self.model.config.is_encoder_decoder:
            if out.shape[1] > prompt.shape[1] and torch.equal(out[:, : prompt.shape[1]], prompt):
                out = out[:, prompt.shape[1]:]  # decoder-only: drop the echoed prompt
        text = self.processor.batch_decode(out, skip_special_tokens=True)[0].strip()
        return text or NO_CAPTION


def load(role: CaptionSettings, settings: EngineSettings) -> Captioner:
    """Load the captioner named by ``role`` (blocking)."""
    device = pick_device(role.device)
    dtype = pick_dtype(role.dtype, device)
    processor = AutoProcessor.from_pretrained(role.model)
    model = AutoModelForImageTextToText.from_pretrained(role.model, dtype=dtype)
    return Captioner(model.to(device).eval(), processor, role)
