"""Chat backend on CTranslate2 int8: an alternative CPU path from a prebuilt wheel.

CTranslate2 (already installed as faster-whisper's runtime) runs the offline model with int8
kernels and needs no compiler. It is not the offline default: the ``llm`` backend with
``quantize=int8`` (engine.lean) is as fast at batch 1 and faster with concurrent requests
(bench/engine.py --backend ct2,llm-int8 --threads 1, one run: 63 vs 62 tok/s at batch 1, 95 vs
182 at 8 concurrent), and it keeps what this backend cannot: every sampler, seeds, requests joining
a running batch, prefix reuse. The model is converted once: the de-quantised transformers
checkpoint (:func:`engine.backends.llm.locate_checkpoint`) becomes
``<cache_dir>/ct2/<name>-<digest>-v<N>``; a marker records the source digest and the sha256 of
the converted weights, which is checked on every load.

What CTranslate2 cannot do, and what this backend does instead:

- **No joining a running batch.** ``generate_batch`` decodes a fixed set of prompts; nothing can
  join until it returns. So this is static batching with a gather: one worker thread takes
  every waiting request (up to ``max_batch``) into one call; requests that arrive meanwhile
  wait for the next call. A newcomer's time to first token can therefore grow by up to one
  whole reply of the running batch (TTFT p99 2.5 s when 8 concurrent 32-token requests split
  into two calls, against 0.4 s in one),
  where the transformers batcher admits it at the next step. Several calls at once
  (``inter_threads=2``, asynchronous calls) would let a newcomer start at once, but on two
  shared cores two 4-row calls made 89 tok/s against 150 for one 8-row call: one worker it is.
- **Sampling settings per call, not per row.** Only rows with the same temperature, top-k and
  top-p share a call; the rest run in the next call. Greedy rows all share one key. The bench
  and most clients send one setting, so batches stay full; a mix of N settings costs up to N
  consecutive calls.
- **Prompts of different lengths.** CTranslate2 prefills the shortest prompt's length at once
  and feeds longer prompts' tails one token per step, so a 30-token and a 2,000-token prompt in
  one call would cost ~2,000 decode steps. Fed that way, an int8 tail also rounds differently
  from a one-shot prefill, so a greedy row could change its text with its neighbours. So greedy
  rows share a call only with prompts of their own length (then batch 8 gives batch 1's text),
  and sampled rows only within ``MAX_PROMPT_SPREAD`` tokens of the call's oldest row. This
  costs: the bench's 16 greedy questions have six prompt lengths (34-39 tokens), so 8 of them
  take several calls: 31-44 tok/s at 8 concurrent, below transformers' 43-100 in the same runs
  (its dynamic batch is exact across lengths). Many same-length or sampled requests batch fully.
- **No min-p, frequency or presence penalty, no logits hook, no per-row seed.** CTranslate2
  4.8.5 has no logits processor; its repetition penalty does not document whether it counts
  the prompt, as vLLM's (ours) does, so it is not trusted to match; and ``set_random_seed``
  seeds a thread-local generator only the first time a thread draws (the same seed before two
  calls gave two different texts), so a seed cannot be replayed. A request that uses any of these
  (``min_p``, a penalty, a ``seed``) is served by the transformers batcher, loaded beside this
  model on the same checkpoint and tokenizer (as ``hybrid`` pairs llama.cpp with it), so every
  sampler keeps its exact meaning. Note that the bot's sampler presets use min-p and
  penalties: its replies take the batcher; clients without them take the fast path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.backends import llm
from engine.batching import Delta, SequenceHandle, TextStream, next_delta
from engine.queueing import Admission
from engine.sampling import SamplingParams
from engine.settings import ChatSettings, EngineSettings

log = logging.getLogger(__name__)

DONE_MARKER = "masque-ct2.json"
# Bump when the conversion changes, so stale caches are converted again.
CONVERSION_VERSION = 1
WEIGHTS = "model.bin"
# After a request arrives, wait this long for another sent with it, and keep gathering while
# they come, up to GATHER_MAX_SECONDS: concurrent HTTP requests reach the worker tens of ms
# apart on two busy cores, and one that misses the call waits for all of it (5 ms split a
# batch of 8 into two calls: 65 tok/s and a 2.5 s TTFT p99; see the module docstring).
GATHER_SECONDS = 0.02
GATHER_MAX_SECONDS = 0.1
IDLE_POLL_SECONDS = 0.5
# Sampled rows join a call only within this many prompt tokens of its oldest row's; greedy
# rows only at the same length (see the docstring).
MAX_PROMPT_SPREAD = 32


# -- conversion ------------------------------------------------------------------------------

def source_digest(checkpoint: str) -> str:
    """The digest naming a conversion: the GGUF's sha256 for a converted GGUF, else of the
    checkpoint's config and weight files (a local folder), else of the hub id."""
    path = Path(checkpoint)
    marker = path / llm.DONE_MARKER
    if marker.is_file():
        return json.loads(marker.read_text())["sha256"]
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(path.iterdir()):
            if file.suffix in {".json", ".safetensors", ".bin"}:
                digest.update(file.name.encode() + llm.sha256_file(file).encode())
        return digest.hexdigest()
    return hashlib.sha256(checkpoint.encode()).hexdigest()


def convert_checkpoint(checkpoint: str, cache_dir: Path) -> Path:
    """Convert ``checkpoint`` to CTranslate2 int8 once; return the folder, its weights verified.

    Raises ValueError when a cached conversion's weights do not match their recorded sha256.
    """
    digest = source_digest(checkpoint)
    # a converted GGUF's folder already ends in -<digest>-v<N>: keep only the model's name
    name = Path(checkpoint).name.split(f"-{digest[:16]}")[0]
    out = cache_dir / "ct2" / f"{name}-{digest[:16]}-v{CONVERSION_VERSION}"
    marker = out / DONE_MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        actual = llm.sha256_file(out / WEIGHTS)
        if recorded.get("source_sha256") != digest or recorded.get("sha256") != actual:
            raise ValueError(f"{out} does not match its recorded digests: delete it to convert again")
        return out
    from ctranslate2.converters import TransformersConverter

    log.info("Converting %s to CTranslate2 int8 in %s (once)", checkpoint, out)
    TransformersConverter(checkpoint).convert(str(out), quantization="int8", force=True)
    marker.write_text(json.dumps({
        "source": checkpoint, "source_sha256": digest, "sha256": llm.sha256_file(out / WEIGHTS),
    }))
    return out


# -- serving ---------------------------------------------------------------------------------

def needs_batcher(params: SamplingParams) -> bool:
    """Whether ``params`` asks for something CTranslate2 cannot honour exactly."""
    return params.min_p > 0 or params.penalised or params.seed is not None


def sampling_key(params: SamplingParams) -> tuple[float, int, float]:
    """Rows with equal keys may share a ``generate_batch`` call (settings are per call)."""
    if params.temperature <= 0:
        return (0.0, 1, 1.0)  # greedy: top-k 1, the rest is moot
    return (params.temperature, params.top_k, params.top_p)


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    handle: SequenceHandle
    text: TextStream
    started: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    done: bool = False
    released: bool = False  # its admission slot has been given back


class CT2Backend:
    """A CTranslate2 int8 generator for plain sampling, the transformers batcher for the rest."""

    fusion = "composed"

    def __init__(self, generator: Any, batched: llm.LLMBackend, role: ChatSettings) -> None:
        self.generator = generator
        self.batched = batched
        self.role = role
        self.tokenizer = batched.tokenizer
        self.context_tokens = batched.context_tokens
        self.eos_ids = batched.batcher.eos_ids
        self.admission = Admission("chat", role.max_queue)
        self.on_step: Any = None  # (tokens, seconds, batch size), as the batcher reports
        self.peak_batch = 0
        self.calls = 0  # generate_batch calls so far
        self._inbox: queue.Queue[_Row] = queue.Queue()
        self._pending: deque[_Row] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chat-ct2", daemon=True)
        self._thread.start()

    def prepare(self, messages: list[dict[str, Any]], images: list, audios: list) -> list[int]:
        """Token ids through the model's own chat template (shared with the batcher)."""
        return llm.text_chat_ids(self.tokenizer, messages, images, audios)

    def submit(self, prompt: list[int], params: SamplingParams) -> SequenceHandle:
        """Queue one sequence (the batcher's when it needs a sampler CTranslate2 lacks)."""
        if needs_batcher(params):
            return self.batched.submit(prompt, params)
        self.admission.enter()
        handle = SequenceHandle(asyncio.get_running_loop())
        self._inbox.put(_Row(prompt, params, handle, TextStream(self.tokenizer, params.stop)))
        return handle

    def attach_metrics(self, metrics: Any) -> None:
        """Report each decode step of either path to the app's metrics."""
        def observe(tokens: int, seconds: float, size: int) -> None:
            metrics.observe_generation("chat", tokens, seconds, size)

        self.on_step = observe
        self.batched.batcher.on_step = observe

    def queue_depth(self) -> int:
        """Sequences waiting or running on either path."""
        return self.admission.depth + self.batched.queue_depth()

    def close(self) -> None:
        """Stop both workers (a running call ends at its next token)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.batched.close()

    # -- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = self._next_call()
            if not rows:
                continue
            try:
                self._generate(rows)
            except Exception as exc:  # a failed call ends its rows, not the server
                log.exception("CTranslate2 generation failed")
                for row in rows:
                    self._finish(row, Delta("", len(row.generated), "error", str(exc)))
        for row in list(self._pending) + list(self._inbox.queue):
            self._finish(row, Delta("", 0, "error", "server shutting down"))

    def _next_call(self) -> list[_Row]:
        """The oldest waiting row and those that may share its call (same sampling key,
        prompt length close enough), up to ``max_batch``; the rest keep their order."""
        woke = not self._pending
        if woke:
            try:
                self._pending.append(self._inbox.get(timeout=IDLE_POLL_SECONDS))
            except queue.Empty:
                return []
        # rows left from the last call go at once, with whatever arrived during it
        self._gather(GATHER_MAX_SECONDS if woke else 0.0)
        for row in [r for r in self._pending if r.handle.cancelled.is_set()]:
            self._pending.remove(row)
            self._release(row)
        if not self._pending:
            return []
        first = self._pending[0]
        key, anchor = sampling_key(first.params), len(first.prompt)
        spread = 0 if first.params.temperature <= 0 else MAX_PROMPT_SPREAD
        chosen: list[_Row] = []
        for row in self._pending:
            if len(chosen) == self.role.max_batch:
                break
            length = len(row.prompt)
            if sampling_key(row.params) == key and abs(length - anchor) <= spread:
                chosen.append(row)
        for row in chosen:
            self._pending.remove(row)
        return chosen

    def _gather(self, longest: float) -> None:
        """Move arrivals to the pending rows until none comes for GATHER_SECONDS (at most
        ``longest`` seconds in all, or a full batch)."""
        deadline = time.perf_counter() + longest
        while len(self._pending) < self.role.max_batch:
            wait = min(GATHER_SECONDS, deadline - time.perf_counter())
            try:
                self._pending.append(self._inbox.get(timeout=max(wait, 0)) if wait > 0
                                     else self._inbox.get_nowait())
            except queue.Empty:
                break
        while True:  # beyond a full batch: later calls will take them in order
            try:
                self._pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break

    def _generate(self, rows: list[_Row]) -> None:
        """One ``generate_batch`` call; the callback streams each row and stops it when done."""
        temperature, top_k, top_p = sampling_key(rows[0].params)
        clock = {"step": -1, "tokens": 0, "started": time.perf_counter()}

        def report_step() -> None:
            now = time.perf_counter()
            if clock["tokens"] and self.on_step is not None:
                self.on_step(clock["tokens"], now - clock["started"], clock["tokens"])
            clock.update(tokens=0, started=now)

        def on_token(step: Any) -> bool:
            if step.step != clock["step"]:  # rows of one step arrive together, in order
                report_step()
                clock["step"] = step.step
            clock["tokens"] += 1
            return self._emit(rows[step.batch_id], step.token_id)

        self.calls += 1
        self.peak_batch = max(self.peak_batch, len(rows))
        self.generator.generate_batch(
            [self.tokenizer.convert_ids_to_tokens(row.prompt) for row in rows],
            max_length=max(row.params.max_tokens for row in rows),
            sampling_topk=top_k, sampling_topp=top_p, sampling_temperature=temperature or 1.0,
            end_token=sorted(self.eos_ids), include_prompt_in_result=False, callback=on_token,
        )
        report_step()
        for row in rows:  # rows CTranslate2 ended itself (an end token it did not report)
            if not row.done:
                self._finish(row, Delta(row.text.flush(), len(row.generated), "stop"))

    def _emit(self, row: _Row, token: int) -> bool:
        """Stream one token of ``row``; True when the row is done (the callback's answer)."""
        if row.done:
            return True
        if row.handle.cancelled.is_set() or self._stop.is_set():
            self._finish(row, Delta("", len(row.generated), "error", "cancelled"))
            return True
        delta = next_delta(row.text, row.generated, token, self.eos_ids, row.params.max_tokens)
        if delta is not None and delta.finish_reason is not None:
            self._finish(row, delta)
        elif delta is not None:
            row.handle.push(delta)
        return row.done

    def _finish(self, row: _Row, delta: Delta) -> None:
        listening = not row.handle.cancelled.is_set()
        row.done = True
        row.handle.cancelled.set()
        self._release(row)  # before the last delta, so a caller that saw it sees the slot free
        if listening:
            row.handle.push(delta)

    def _release(self, row: _Row) -> None:
        if not row.released:
            row.released = True
            self.admission.leave(time.perf_counter() - row.started)


def load(role: ChatSettings, settings: EngineSettings) -> CT2Backend:
    """Load the transformers batcher and the int8 CTranslate2 model of the same checkpoint
    (converting it once; blocking)."""
    import ctranslate2

    batched = llm.load(role, settings)
    checkpoint = llm.locate_checkpoint(role, settings.cache_dir)
    folder = convert_checkpoint(checkpoint, settings.cache_dir)
    generator = ctranslate2.Generator(
        str(folder), device="cpu", compute_type="int8", intra_threads=settings.torch_threads,
    )
    return CT2Backend(generator, batched, role)
