"""Native fusion: an omni model whose own encoders read the images and the audio.

The model class comes from config (``Qwen2_5OmniThinkerForConditionalGeneration`` by default;
any ``AutoModelForImageTextToText`` omni model such as Gemma 3n loads the same way). With
torchvision the model's real processor is used; without it (the CPU torch of CI) a small
hand-written processor does what Qwen2.5-Omni's does for text, images and audio.

Multimodal inputs carry per-request encoder tensors (and Qwen's 3-D rotary positions), so
requests run one ``generate`` at a time on this role's own thread, streaming as they go.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer
from transformers.utils import is_torchvision_available

from engine.backends import pick_device, pick_dtype
from engine.batching import Delta, SequenceHandle, TextStream
from engine.queueing import Admission
from engine.sampling import SamplingParams, TokenHistory, penalise
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


class _Streamer(BaseStreamer):
    """Feeds generate's tokens into a :class:`SequenceHandle` as text deltas."""

    def __init__(self, backend: OmniBackend, handle: SequenceHandle, params: SamplingParams):
        self.handle, self.params, self.eos = handle, params, backend.eos_ids
        self.admission = backend.admission
        self.released = False
        self.text = TextStream(backend.tokenizer, params.stop)
        self.ids: list[int] = []
        self.prompt_seen = False
        self.done = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.done:
                return
            if token in self.eos:
                self.finish("stop")
                return
            self.ids.append(token)
            piece, stopped = self.text.add(self.ids)
            if stopped:
                self.finish("stop", piece)
            elif piece:
                self.handle.push(Delta(piece, len(self.ids)))

    def end(self) -> None:
        if not self.done:
            self.finish("length" if len(self.ids) >= self.params.max_tokens else "stop")

    def finish(self, reason: str, piece: str = "") -> None:
        self.done = True
        self.release()  # before the last delta, so a caller that saw it sees the slot free
        self.handle.push(Delta(piece + self.text.flush(), len(self.ids), reason))

    def release(self) -> None:
        """Give the admission slot back, once."""
        if not self.released:
            self.released = True
            self.admission.leave()


class _Halt(StoppingCriteria):
    """Stops generate when the client left or a stop string ended the text."""

    def __init__(self, streamer: _Streamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        halt = self.streamer.done or self.streamer.handle.cancelled.is_set()
        return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)


class _OutputPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties inside ``generate``, with the batcher's maths
    (engine.sampling). ``generate`` has no such options of its own."""

    def __init__(self, params: SamplingParams, prompt_tokens: int) -> None:
        # generate's own repetition_penalty has run by the time this does
        self.params = replace(params, repetition_penalty=1.0)
        self.prompt_tokens = prompt_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # one request at a time: counting its few hundred output ids per step costs nothing
        # next to the forward pass
        outputs = [((), row[self.prompt_tokens:].tolist()) for row in input_ids]
        history = TokenHistory.count(outputs, scores.shape[-1], scores.device)
        return penalise(scores, [self.params] * len(outputs), history)


def generate_options(params: SamplingParams, prompt_tokens: int) -> dict[str, Any]:
    """``generate`` keyword arguments for ``params``, in vLLM's order: penalties (also when
    greedy), then temperature, top-k, top-p, min-p when sampling.

    Every sampler is passed, off ones included, so the model's generation-config defaults
    (transformers' top_k=50, a checkpoint's repetition_penalty) never apply unasked: a request
    means the same on every backend.
    """
    options: dict[str, Any] = {
        "do_sample": params.temperature > 0,
        "repetition_penalty": float(params.repetition_penalty),
    }
    if params.frequency_penalty or params.presence_penalty:
        options["logits_processor"] = LogitsProcessorList(
            [_OutputPenalties(params, prompt_tokens)]
        )
    if options["do_sample"]:
        options.update(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            min_p=params.min_p or None,  # None: no min-p step at all
        )
    return options


class OmniBackend:
    """An omni model generating one request at a time on its own thread."""

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
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        self.admission = Admission("chat", role.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-omni")
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype

    def prepare(self, messages: list[dict], images: list, audios: list) -> OmniPrompt:
        """Run the processor on the chat and its media."""
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(text=[text], images=images or None, audio=audios or None,
                                return_tensors="pt", padding=True)
        return OmniPrompt({
            key: value.to(self._device, self._dtype if value.is_floating_point() else None)
            for key, value in inputs.items() if isinstance(value, torch.Tensor)
        })

    def submit(self, prompt: OmniPrompt, params: SamplingParams) -> SequenceHandle:
        """Queue one generation; 503 when the queue is full."""
        self.admission.enter()
        handle = SequenceHandle(asyncio.get_running_loop())
        self._executor.submit(self._generate, prompt, params, handle)
        return handle

    def _generate(
        self, prompt: OmniPrompt, params: SamplingParams, handle: SequenceHandle
    ) -> None:
        streamer = _Streamer(self, handle, params)
        try:
            if handle.cancelled.is_set():
                return
            options = generate_options(params, len(prompt))
            if params.seed is not None:
                torch.manual_seed(params.seed)  # one worker thread: the global RNG is ours
            with torch.inference_mode():
                self.model.generate(
                    **prompt.inputs, max_new_tokens=params.max_tokens, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Halt(streamer)]), **options,
                )
        except Exception as exc:  # one failed request must not stop the worker
            log.exception("Omni generation failed")
            streamer.release()
            handle.push(Delta("", len(streamer.ids), "error", str(exc)))
        finally:
            streamer.release()

    def queue_depth(self) -> int:
        """Requests waiting or running."""
        return self.admission.depth

    def close(self) -> None:
        """Stop taking work."""
        self._executor.shutdown(wait=False, cancel_futures=True)


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
