"""Optional chat backend: llama.cpp (llama-cpp-python) running a GGUF file as it is.

Quantised GGUF kernels make one sequence several times faster on a small CPU than
transformers' de-quantised float weights; the price is no batching across requests here
(llama-cpp-python's high-level API runs one sequence at a time), so concurrent requests queue.
Pick it with ``MASQUE_ENGINE_CHAT__BACKEND=llamacpp`` when one channel at a time matters more
than many at once. The prompt goes through the same transformers tokenizer and chat template
as the transformers backend (converted once from the GGUF), so token counts match.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from engine.backends.llm import locate_checkpoint, text_chat_ids
from engine.batching import Delta, SequenceHandle, TextStream
from engine.queueing import Admission
from engine.sampling import SamplingParams
from engine.settings import ChatSettings, EngineSettings

log = logging.getLogger(__name__)

# n_batch=1: larger prompt batches crashed in llama.cpp's decode on the CI CPU.
PROMPT_BATCH = 1


class LlamaCppBackend:
    """A GGUF chat model served by llama.cpp, one request at a time."""

    fusion = "composed"

    def __init__(self, llama: Any, tokenizer: Any, role: ChatSettings) -> None:
        self.llama = llama
        self.tokenizer = tokenizer
        self.role = role
        self.context_tokens = min(role.max_context_tokens, llama.n_ctx())
        self.eos_ids = {llama.token_eos()} | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        )
        self.admission = Admission("chat", role.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-llamacpp")

    def prepare(self, messages: list[dict[str, Any]], images: list, audios: list) -> list[int]:
        """Token ids of a text-only chat through the model's own chat template."""
        return text_chat_ids(self.tokenizer, messages, images, audios)

    def submit(self, prompt: list[int], params: SamplingParams) -> SequenceHandle:
        """Queue one generation; 503 when the queue is full."""
        self.admission.enter()
        handle = SequenceHandle(asyncio.get_running_loop())
        self._executor.submit(self._generate, prompt, params, handle)
        return handle

    def _generate(
        self, prompt: list[int], params: SamplingParams, handle: SequenceHandle
    ) -> None:
        released = False
        ids: list[int] = []
        text = TextStream(self.tokenizer, params.stop)
        try:
            if params.seed is not None:
                self.llama.set_seed(params.seed)
            # top_k 0 and min_p 0 are off in llama.cpp too. Unlike the batcher (and vLLM), which
            # penalise over the whole prompt and output, llama.cpp applies all three penalties
            # only to its last-n window (Llama's last_n_tokens_size, 64 by default), and it
            # filters before it applies the temperature, so sampled text differs between the two.
            tokens = self.llama.generate(
                prompt, temp=params.temperature, top_p=params.top_p, top_k=params.top_k,
                min_p=params.min_p, repeat_penalty=params.repetition_penalty,
                frequency_penalty=params.frequency_penalty,
                presence_penalty=params.presence_penalty, reset=True,
            )
            finish = "length"
            for token in tokens:
                if handle.cancelled.is_set():
                    return
                if token in self.eos_ids:
                    finish = "stop"
                    break
                ids.append(token)
                piece, stopped = text.add(ids)
                if stopped:
                    handle.push(Delta(piece, len(ids), None))
                    finish = "stop"
                    break
                if len(ids) >= params.max_tokens:
                    handle.push(Delta(piece, len(ids), None))
                    break
                if piece:
                    handle.push(Delta(piece, len(ids)))
            self.admission.leave()
            released = True  # before the last delta: a caller that saw it sees the slot free
            handle.push(Delta(text.flush(), len(ids), finish))
        except Exception as exc:  # one failed request must not stop the worker
            log.exception("llama.cpp generation failed")
            handle.push(Delta("", len(ids), "error", str(exc)))
        finally:
            if not released:
                self.admission.leave()

    def queue_depth(self) -> int:
        """Requests waiting or running."""
        return self.admission.depth

    def close(self) -> None:
        """Stop taking work."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def load(role: ChatSettings, settings: EngineSettings) -> LlamaCppBackend:
    """Open the GGUF named by ``role`` with llama.cpp (blocking; needs llama-cpp-python)."""
    from llama_cpp import Llama

    path = Path(role.model).expanduser()
    gguf = path / role.gguf_file if path.is_dir() else path
    if gguf.suffix != ".gguf" or not gguf.is_file():
        raise ValueError(f"the llamacpp backend needs a .gguf file, got {role.model!r}")
    tokenizer = AutoTokenizer.from_pretrained(locate_checkpoint(role, settings.cache_dir))
    llama = Llama(
        model_path=str(gguf), n_ctx=role.max_context_tokens, n_batch=PROMPT_BATCH,
        n_threads=settings.torch_threads or None, verbose=False,
    )
    return LlamaCppBackend(llama, tokenizer, role)
