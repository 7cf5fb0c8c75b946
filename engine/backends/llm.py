"""Text-only chat LLM: the composed-fusion backend.

Loads any transformers causal LM by hub id or path. A GGUF file is de-quantised once with
transformers and saved under ``<cache_dir>/converted/`` so later starts take seconds; its
sha256 is checked against the known digest when there is one. Generation goes through the
dynamic :class:`~engine.batching.Batcher`, so concurrent requests share each forward pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import lean
from engine.attention import NAME as ROWWISE_ATTENTION
from engine.backends import pick_device, pick_dtype
from engine.batching import Batcher, SamplingParams, SequenceHandle
from engine.prefix_cache import PrefixCache
from engine.quantize import quantize_int8
from engine.settings import MIB, ChatSettings, EngineSettings

log = logging.getLogger(__name__)

# Weight files we ship or know, by name: a different digest means a tampered or broken file.
KNOWN_SHA256 = {
    "SmolLM2-135M-Instruct.Q4_1.gguf":
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
HASH_CHUNK = 1 << 20
DONE_MARKER = "masque-converted.json"
# Bump when the conversion changes, so stale caches are converted again.
CONVERSION_VERSION = 2


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """De-quantise ``gguf`` once into a transformers folder under the cache; return it."""
    digest = sha256_file(gguf)
    expected = KNOWN_SHA256.get(gguf.name)
    if expected is not None and digest != expected:
        raise ValueError(f"{gguf} has sha256 {digest}, expected {expected}")
    out = cache_dir / "converted" / f"{gguf.stem}-{digest[:16]}-v{CONVERSION_VERSION}"
    if (out / DONE_MARKER).is_file():
        return out
    log.info("Converting %s to a transformers checkpoint in %s (once)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float tensors now: save them as an ordinary checkpoint, without
    # the GGUF quantization config that would route later loads through the GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / DONE_MARKER).write_text(json.dumps({"source": str(gguf), "sha256": digest}))
    return out


def locate_checkpoint(role: ChatSettings, cache_dir: Path) -> str:
    """A loadable transformers path or hub id for ``role.model`` (converting GGUF first)."""
    path = Path(role.model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path, cache_dir))
    if path.is_dir() and role.gguf_file:
        return str(convert_gguf(path / role.gguf_file, cache_dir))
    return role.model


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a turn: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def text_chat_ids(
    tokenizer: Any, messages: list[dict[str, Any]], images: list[Any], audios: list[Any]
) -> list[int]:
    """Token ids of a text-only chat, through the tokenizer's own chat template."""
    if images or audios:
        raise ValueError("a text-only model cannot take images or audio")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class LLMBackend:
    """A text-only chat model behind the batcher."""

    fusion = "composed"

    def __init__(self, model: Any, tokenizer: Any, role: ChatSettings, batcher: Batcher) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.role = role
        self.batcher = batcher
        self.context_tokens = min(
            role.max_context_tokens,
            getattr(model.config, "max_position_embeddings", role.max_context_tokens),
        )

    def prepare(
        self, messages: list[dict[str, Any]], images: list[Any], audios: list[Any]
    ) -> list[int]:
        """Token ids of a text-only chat (composed fusion has turned media into text)."""
        return text_chat_ids(self.tokenizer, messages, images, audios)

    def submit(self, prompt: list[int], params: SamplingParams) -> SequenceHandle:
        """Start generating; iterate the handle for deltas."""
        return self.batcher.submit(prompt, params)

    def attach_metrics(self, metrics: Any) -> None:
        """Report each decode step to the app's :class:`~engine.metrics.Metrics`."""
        self.batcher.on_step = lambda tokens, seconds, size: metrics.observe_generation(
            "chat", tokens, seconds, size
        )
        self.batcher.metrics = metrics

    def queue_depth(self) -> int:
        """Chat sequences waiting or running."""
        return self.batcher.depth()

    def close(self) -> None:
        """Stop the batcher's thread."""
        self.batcher.close()


def load(role: ChatSettings, settings: EngineSettings) -> LLMBackend:
    """Load the chat LLM named by ``role`` (blocking)."""
    device = pick_device(role.device)
    dtype = pick_dtype(role.dtype, device)
    checkpoint = locate_checkpoint(role, settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if role.quantize != "none" and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"quantize={role.quantize} is for the CPU in float32 (MASQUE_ENGINE_CHAT__DEVICE=cpu, "
                         f"MASQUE_ENGINE_CHAT__DTYPE=float32); this role has {device} and {dtype}")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    eos_ids = eos_token_ids(model, tokenizer)
    # each row attends over its own keys: batching and prefix reuse never change a reply
    model.set_attn_implementation(ROWWISE_ATTENTION)
    if role.quantize != "none" and lean.supports(model):
        try:
            model = lean.LeanDecoder(model, role.max_context_tokens, decode_int4=role.quantize == "int4")
        except ValueError as exc:  # 4-bit groups need widths in multiples of 32
            log.warning("quantize=int4: %s; decoding in int8 instead", exc)
            model = lean.LeanDecoder(model, role.max_context_tokens)
        log.info("Chat model: the lean %s decoder (fused quantised projections, a growing KV cache)",
                 role.quantize)
    elif role.quantize != "none":
        if role.quantize == "int4":
            log.warning("quantize=int4 needs a Llama-family model (engine.lean); %s gets int8",
                        type(model).__name__)
        swapped = quantize_int8(model)
        log.info("Chat model: %d linear layers in int8 (per-channel weights, per-token activations)",
                 swapped)
    cache = PrefixCache(role.prefix_cache_mb * MIB) if role.prefix_cache_mb else None
    batcher = Batcher(
        model, tokenizer, max_batch=role.max_batch, max_queue=role.max_queue,
        eos_ids=eos_ids, prefix_cache=cache,
    )
    return LLMBackend(model, tokenizer, role, batcher)
