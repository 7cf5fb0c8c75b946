"""Native fusion: an omni model whose own encoders read the images and the audio.

The model class comes from config (``Qwen2_5OmniThinkerForConditionalGeneration`` by default;
any ``AutoModelForImageTextToText`` omni model such as Gemma 3n loads the same way). With
torchvision the model's real processor is used; without it (the CPU torch of CI) a small
hand-written processor does what Qwen2.5-Omni's does for text, images and audio.

Concurrent requests are decoded together by the text backend's dynamic batcher
(:mod:`engine.batching`), up to ``max_batch`` rows, with two model calls of this module's own:
each new request is prefilled alone with its own encoder inputs (pixels, audio features), then
joins the running batch between decode steps; every decode step gives each row its own
position. Qwen2.5-Omni's rotary positions are 3-D (time, height, width): an image's tokens share
positions, so the text after a prompt sits at its cached length plus a per-row offset, the rope
delta that ``get_rope_index`` gives at prefill.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from transformers import DynamicCache
from transformers.utils import is_torchvision_available

from engine.backends import pick_device, pick_dtype
from engine.batching import Batcher, Delta, SequenceHandle, _Batch, _merge, _Sequence
from engine.sampling import SamplingParams
from engine.settings import ChatSettings, EngineSettings

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
DEFAULT_CLASS = "Qwen2_5OmniThinkerForConditionalGeneration"


class ManualOmniProcessor:
    """Qwen2.5-Omni's processor for text + images + audio, without its torchvision video part."""

    def __init__(self, path: str) -> None:
        from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

        root = Path(path)
        sub = {name: str(root / name) if (root / name).is_dir() else path
               for name in ("image_processor", "feature_extractor")}
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(sub["image_processor"])
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(sub["feature_extractor"])
        self.image_token = getattr(self.tokenizer, "image_token", None) or "<|IMAGE|>"
        self.audio_token = getattr(self.tokenizer, "audio_token", None) or "<|AUDIO|>"

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        """The tokenizer's chat template."""
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, text: list[str], images: list | None = None,
                 audio: list[np.ndarray] | None = None, **_: Any) -> dict[str, torch.Tensor]:
        """Tensors for one prompt, with each media placeholder expanded to its token count."""
        prompt, out = text[0], {}
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
            merge = self.image_processor.merge_size ** 2
            counts = [int(grid.prod()) // merge for grid in pixels["image_grid_thw"]]
            prompt = _expand(prompt, self.image_token, counts)
        if audio:
            feats = self.feature_extractor(
                audio, sampling_rate=SAMPLE_RATE, return_attention_mask=True,
                padding="max_length", return_tensors="pt",
            )
            out.update(input_features=feats["input_features"],
                       feature_attention_mask=feats["attention_mask"])
            lengths = [int(mask.sum()) for mask in feats["attention_mask"]]
            # the audio encoder halves the frames twice (conv stride, then pooling)
            prompt = _expand(prompt, self.audio_token,
                             [((n - 1) // 2 + 1 - 2) // 2 + 1 for n in lengths])
        out.update(self.tokenizer([prompt], return_tensors="pt"))
        return out


def _expand(prompt: str, token: str, counts: list[int]) -> str:
    """Repeat the i-th ``token`` placeholder counts[i] times."""
    pieces = prompt.split(token)
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"{len(pieces) - 1} {token} placeholders for {len(counts)} inputs")
    out = pieces[0]
    for count, rest in zip(counts, pieces[1:], strict=True):
        out += token * count + rest
    return out


@dataclass
class OmniPrompt:
    """Processor outputs for one request; ``len()`` is its token count."""

    inputs: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


@dataclass
class _Row:
    """One sequence's own model data: its encoder inputs until the prefill has read them, then
    the offset of its text positions after the prompt (Qwen2.5-Omni's rope delta)."""

    media: dict[str, torch.Tensor] | None
    rope_delta: int = 0


class OmniBatcher(Batcher):
    """The dynamic batcher with an omni model's own prefill (each prompt alone, with its media)
    and decode step (each row at its own multimodal position)."""

    def __init__(self, model: Any, tokenizer: Any, **options: Any) -> None:
        super().__init__(model, tokenizer, **options)
        # Qwen2.5-Omni's 3-D rotary positions; a model without them takes plain 1-D positions
        self._mrope = hasattr(model, "get_rope_index")
        parameters = inspect.signature(model.forward).parameters
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    def _prefill(self, seqs: list[_Sequence]) -> _Batch:
        """Prefill each prompt alone (no padding, so a row's prompt is computed exactly as when
        it runs alone) and gather the rows in one batch. A failing prompt ends only its own
        sequence; when every one fails the batcher ends them with the last error."""
        batch, error = None, None
        now = time.perf_counter()
        for seq in seqs:
            seq.prefilled = now  # its queue wait ends (the batcher's per-sequence metrics)
            try:
                fresh = self._prefill_one(seq)
            except Exception as exc:
                log.exception("Omni prefill failed")
                self._finish(seq, Delta("", 0, "error", str(exc)))
                error = exc
                continue
            batch = fresh if batch is None else _merge(batch, fresh)
        if batch is None:
            raise error
        return batch

    def _prefill_one(self, seq: _Sequence) -> _Batch:
        """Run one prompt through the encoders and the decoder; sample its first token."""
        row: _Row = seq.inputs
        ids = torch.tensor([seq.prompt], dtype=torch.long, device=self._device)
        mask = torch.ones_like(ids)
        positions, row.rope_delta = self._prompt_positions(ids, mask, row.media)
        cache = DynamicCache(config=self.model.config)
        started = time.perf_counter()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
            use_cache=True, **self._last_only, **row.media,
        )
        row.media = None  # the encoders have read them; the KV cache holds what they made
        batch = _Batch([seq], cache, mask, torch.empty(0, dtype=torch.long))
        self._advance(batch, out.logits[:, -1, :], started)
        return batch

    def _prompt_positions(
        self, ids: torch.Tensor, mask: torch.Tensor, media: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        """A prompt's position ids and the offset of the text that follows it: as transformers'
        ``generate`` computes them for Qwen2.5-Omni (``get_rope_index``; each image's tokens
        share positions along its time, height and width axes, so the prompt ends at a lower
        position than its length)."""
        if not self._mrope:
            return mask.cumsum(-1) - 1, 0
        audio = media.get("feature_attention_mask")
        positions, deltas = self.model.get_rope_index(
            ids, image_grid_thw=media.get("image_grid_thw"),
            video_grid_thw=media.get("video_grid_thw"), attention_mask=mask,
            audio_seqlens=None if audio is None else audio.sum(-1),
            second_per_grids=media.get("video_second_per_grid"),
        )
        return positions, int(deltas[0])

    def _decode(self, batch: _Batch) -> None:
        """One token for every row; a text token after a multimodal prompt sits at the row's
        cached real length plus its rope delta, on all three axes."""
        if not self._mrope:
            super()._decode(batch)
            return
        started = time.perf_counter()
        cached = batch.mask.sum(-1, keepdim=True)  # [batch, 1] real tokens in the cache
        deltas = torch.tensor([[seq.inputs.rope_delta] for seq in batch.seqs], device=cached.device)
        positions = (cached + deltas).unsqueeze(0).expand(3, -1, -1)  # [3, batch, 1]
        batch.mask = F.pad(batch.mask, (0, 1), value=1)
        out = self.model(
            input_ids=batch.last.unsqueeze(-1), attention_mask=batch.mask, position_ids=positions,
            cache=batch.cache, use_cache=True,
        )
        self._advance(batch, out.logits[:, -1, :], started)


class OmniBackend:
    """An omni model behind its :class:`OmniBatcher`."""

    fusion = "native"

    def __init__(self, model: Any, processor: Any, role: ChatSettings) -> None:
        self.model, self.processor, self.role = model, processor, role
        self.tokenizer = getattr(processor, "tokenizer", processor)
        text_config = getattr(model.config, "text_config", model.config)
        self.context_tokens = min(
            role.max_context_tokens,
            getattr(text_config, "max_position_embeddings", role.max_context_tokens),
        )
        eos = model.generation_config.eos_token_id
        self.batcher = OmniBatcher(
            model, self.tokenizer, max_batch=role.max_batch, max_queue=role.max_queue,
            eos_ids={eos} if isinstance(eos, int) else set(eos or []),
        )
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype

    @property
    def peak_batch(self) -> int:
        """The most sequences decoded together so far."""
        return self.batcher.peak_batch

    def prepare(self, messages: list[dict], images: list, audios: list) -> OmniPrompt:
        """Run the processor on the chat and its media."""
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(text=[text], images=images or None, audio=audios or None,
                                return_tensors="pt", padding=True)
        return self._on_device(inputs)

    def prepare_text(self, text: str) -> OmniPrompt:
        """The prompt of a raw text completion: the text's tokens, no chat template, no media."""
        return self._on_device(self.tokenizer([text], return_tensors="pt"))

    def _on_device(self, inputs: Any) -> OmniPrompt:
        return OmniPrompt({
            key: value.to(self._device, self._dtype if value.is_floating_point() else None)
            for key, value in inputs.items() if isinstance(value, torch.Tensor)
        })

    def submit(self, prompt: OmniPrompt, params: SamplingParams) -> SequenceHandle:
        """Queue one generation (the batch takes it in between steps); 503 when the queue is
        full. The same prompt may be submitted several times (n > 1): each gets its own row."""
        ids = [int(i) for i in prompt.inputs["input_ids"][0].tolist()]
        media = {key: value for key, value in prompt.inputs.items()
                 if key not in ("input_ids", "attention_mask")}
        return self.batcher.submit(ids, params, inputs=_Row(media))

    def attach_metrics(self, metrics: Any) -> None:
        """Report each decode step to the app's :class:`~engine.metrics.Metrics`."""
        self.batcher.on_step = lambda tokens, seconds, size: metrics.observe_generation(
            "chat", tokens, seconds, size
        )
        self.batcher.metrics = metrics

    def queue_depth(self) -> int:
        """Requests waiting or running."""
        return self.batcher.depth()

    def close(self) -> None:
        """Stop the batcher's thread."""
        self.batcher.close()


def load(role: ChatSettings, settings: EngineSettings) -> OmniBackend:
    """Load the omni model named by ``role`` with its processor (blocking)."""
    import transformers

    device = pick_device(role.device)
    dtype = pick_dtype(role.dtype, device)
    model_class = getattr(transformers, role.model_class or DEFAULT_CLASS)
    if is_torchvision_available():
        processor = transformers.AutoProcessor.from_pretrained(role.model)
    else:
        log.info("torchvision is missing: using the hand-written omni processor")
        processor = ManualOmniProcessor(role.model)
    model = model_class.from_pretrained(role.model, dtype=dtype).to(device).eval()
    return OmniBackend(model, processor, role)
