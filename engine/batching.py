"""Dynamic batching of chat generations on one decoder-only model.

One worker thread owns the model. Each step it decodes one token for every running sequence
at once; requests that arrive meanwhile are prefilled as a group and merged into the running
batch between steps (iteration-level batching, as vLLM and TGI do), so a new request never
waits for the others to finish. Sequences have left-padded rows in one shared KV cache; the
2-D attention mask hides the padding and per-row position ids keep RoPE right. A finished or
cancelled sequence leaves the batch at the next step.

Each sequence samples with its own settings (see engine.sampling: penalties, temperature,
top-k/top-p/min-p, seed), stops on EOS, its own stop strings or its token budget, and streams
text deltas back to the event loop. While any row has a penalty, the batch keeps a
:class:`~engine.sampling.TokenHistory` row for every sequence, updated one token per step and
carried through merges and drops like the KV cache; without penalties there is none.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from transformers import DynamicCache

from engine.attention import NAME as ROWWISE_ATTENTION
from engine.attention import row_starts
from engine.prefix_cache import PrefixCache, common_prefix
from engine.queueing import Admission
from engine.sampling import (  # re-exported for callers
    SamplingParams,
    TokenHistory,
    greedy_tokens,
    sample_rows,
)

log = logging.getLogger(__name__)

# How long the idle worker waits for work before checking whether it should stop.
IDLE_POLL_SECONDS = 0.5
# Prompts run in chunks of this many tokens on a fixed grid (see Batcher._prefill_row); a cached
# prefix is reused up to the last boundary it covers. Smaller chunks reuse more but cost one
# more model call each (~15 ms for SmolLM2 on these CPUs).
PREFILL_CHUNK = 128

StepObserver = Callable[[int, float, int], None]  # (new tokens, seconds, batch size)


class TextStream:
    """Turns a growing list of token ids into safe text deltas, honouring stop strings.

    Text that could still become a stop string, or ends in half a UTF-8 character, is held
    back until the next token settles it.
    """

    def __init__(self, tokenizer: object, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._text = ""
        self._sent = 0

    def add(self, ids: list[int]) -> tuple[str, bool]:
        """The new text to send after ``ids`` (all generated ids so far), and whether it stopped."""
        self._text = self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        for stop in self._stop:
            at = self._text.find(stop, max(0, self._sent - len(stop)))
            if at >= 0:
                piece = self._text[self._sent:at]
                self._sent = len(self._text)
                return piece, True
        safe = len(self._text)
        if self._text.endswith("\ufffd"):
            safe -= 1
        for stop in self._stop:
            for size in range(min(len(stop) - 1, safe - self._sent), 0, -1):
                if self._text[safe - size:safe] == stop[:size]:
                    safe -= size
                    break
        piece = self._text[self._sent:safe] if safe > self._sent else ""
        self._sent = max(self._sent, safe)
        return piece, False

    def flush(self) -> str:
        """Whatever was held back (the sequence has ended without a stop string)."""
        piece = self._text[self._sent:]
        self._sent = len(self._text)
        return piece


@dataclass
class Delta:
    """A piece of one sequence's output."""

    text: str
    tokens: int  # completion tokens so far
    finish_reason: str | None = None  # "stop", "length", "error"
    error: str | None = None


def next_delta(text: TextStream, generated: list[int], token: int, eos_ids: set[int],
               max_tokens: int) -> Delta | None:
    """What one new token of a sequence makes: a final delta (``finish_reason`` set) when it ends the
    sequence (end token, stop string, token budget), else its new text, or None when nothing is to be
    sent yet. ``generated`` (the sequence's tokens so far) gains the token unless it ends the sequence."""
    if token in eos_ids:
        return Delta(text.flush(), len(generated), "stop")
    generated.append(token)
    piece, stopped = text.add(generated)
    if stopped:
        return Delta(piece, len(generated), "stop")
    if len(generated) >= max_tokens:
        return Delta(piece + text.flush(), len(generated), "length")
    return Delta(piece, len(generated)) if piece else None


class SequenceHandle:
    """The async side of one sequence: iterate for deltas, ``cancel()`` to stop it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._finished = False
        self.cancelled = threading.Event()

    def push(self, delta: Delta) -> None:
        """Hand a delta to the event loop (called from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self.cancelled.set()

    @staticmethod
    def push_all(deltas: list[tuple[SequenceHandle, Delta]]) -> None:
        """:meth:`push` for many handles at once: one wake-up of each event loop instead of one per
        delta (a decode step's deltas, from the worker thread)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[SequenceHandle, Delta]]] = {}
        for handle, delta in deltas:
            by_loop.setdefault(handle._loop, []).append((handle, delta))  # noqa: SLF001
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                for handle, _ in items:
                    handle.cancelled.set()

    def cancel(self) -> None:
        """Stop generating for this sequence (client gone, stop string found...)."""
        self.cancelled.set()

    def __aiter__(self) -> SequenceHandle:
        return self

    async def __anext__(self) -> Delta:
        if self._finished:
            raise StopAsyncIteration
        delta = await self._queue.get()
        if delta.finish_reason is not None:
            self._finished = True
        return delta


def _deliver(items: list[tuple[SequenceHandle, Delta]]) -> None:
    for handle, delta in items:
        handle._queue.put_nowait(delta)  # noqa: SLF001 - the handle's own loop, as push() does


@dataclass
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    handle: SequenceHandle
    text: TextStream
    generator: torch.Generator | None
    inputs: object = None  # a backend's own prompt data (the omni model's encoder tensors)
    started: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    released: bool = False  # its admission slot has been given back
    prefilled: float = 0.0  # perf_counter when its prompt ran (0: still waiting)
    first_token: float = 0.0  # perf_counter of its first token


@dataclass
class _Batch:
    """The running sequences and their shared, left-padded KV cache."""

    seqs: list[_Sequence]
    cache: DynamicCache
    mask: torch.Tensor  # [batch, cached length], 1 = real token
    last: torch.Tensor  # [batch] the token to feed next
    history: TokenHistory | None = None  # while any row has a penalty


class Batcher:
    """Runs many sequences through ``model`` together on one worker thread.

    ``_prefill`` (new sequences into a fresh batch) and ``_decode`` (one token for every row)
    are the model calls; a backend whose model needs more than token ids (the omni model's
    encoders, its 3-D positions) subclasses and overrides those two.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        *,
        max_batch: int,
        max_queue: int,
        eos_ids: set[int],
        on_step: StepObserver | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.prefix_cache = prefix_cache
        self.metrics: object = None  # an engine.metrics.Metrics, for per-sequence figures
        # with the per-row attention, the model is told where each row's padding ends
        self._rowwise = getattr(model.config, "_attn_implementation", None) == ROWWISE_ATTENTION
        # a model may bring its own cache (engine.lean's grows in place)
        # the lean decoder runs decode steps with their own kernels (engine/lean.py); others take no flag
        self._decoding = {"decoding": True} if getattr(model, "decode_int4", False) else {}
        self._new_cache = getattr(model, "make_cache", None) or (
            lambda: DynamicCache(config=model.config))
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.eos_ids = eos_ids
        self.admission = Admission("chat", max_queue, workers=1)
        self.on_step = on_step
        self.peak_batch = 0  # the most sequences decoded together so far
        self._outbox: list[tuple[SequenceHandle, Delta]] | None = None  # a step's deltas, pushed at once
        self._inbox: queue.Queue[_Sequence] = queue.Queue()
        self._stop = threading.Event()
        self._device = next(model.parameters()).device
        self._thread = threading.Thread(target=self._run, name="chat-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, inputs: object = None) -> SequenceHandle:
        """Queue one sequence; raises the 503 APIError when the queue is full. ``inputs`` is kept
        on the sequence for a subclass's ``_prefill`` (the omni backend's encoder tensors)."""
        self.admission.enter()
        handle = SequenceHandle(asyncio.get_running_loop())
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self._device).manual_seed(params.seed)
        text = TextStream(self.tokenizer, params.stop)
        self._inbox.put(_Sequence(prompt, params, handle, text, generator, inputs))
        return handle

    def depth(self) -> int:
        """Sequences waiting or running."""
        return self.admission.depth

    def close(self) -> None:
        """Stop the worker thread after its current step."""
        self._stop.set()
        self._thread.join(timeout=10)

    # -- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        # torch.set_num_threads (the registry's, on another thread) reaches this thread at its first
        # ATen parallel loop; until then OpenMP's per-thread default (every core) holds, and a
        # oneDNN product (torch._int_mm) run first would use it. Settle it now.
        torch.get_num_threads()
        batch: _Batch | None = None
        while not self._stop.is_set():
            try:
                with torch.inference_mode():
                    batch = self._step(batch)
            except Exception as exc:  # a failed step ends its sequences, not the server
                log.exception("Chat generation step failed")
                for seq in batch.seqs if batch else []:
                    self._finish(seq, Delta("", len(seq.generated), "error", str(exc)))
                batch = None
        if batch is not None:
            for seq in batch.seqs:
                self._finish(seq, Delta("", len(seq.generated), "error", "server shutting down"))

    def _step(self, batch: _Batch | None) -> _Batch | None:
        """Admit new sequences or decode one token for every running one."""
        room = self.max_batch - (len(batch.seqs) if batch else 0)
        incoming = self._take(room, block=batch is None)
        if incoming:
            try:
                fresh = self._prefill(incoming)
            except Exception as exc:  # these prompts failed; the running batch is unharmed
                log.exception("Chat prefill failed")
                for seq in incoming:
                    self._finish(seq, Delta("", 0, "error", str(exc)))
                return batch
            batch = fresh if batch is None else _merge(batch, fresh)
        elif batch is not None:
            self._decode(batch)
        if batch is None:
            return None
        return self._drop_finished(batch)

    def _take(self, room: int, block: bool) -> list[_Sequence]:
        taken: list[_Sequence] = []
        if block:
            try:
                taken.append(self._inbox.get(timeout=IDLE_POLL_SECONDS))
            except queue.Empty:
                return taken
        while len(taken) < room:
            try:
                taken.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        live = []
        for seq in taken:
            if seq.handle.cancelled.is_set():
                self._release(seq)
            else:
                live.append(seq)
        return live

    def _prefill(self, seqs: list[_Sequence]) -> _Batch:
        """Run the prompts of ``seqs`` and sample their first tokens.

        With the per-row attention each prompt runs in chunks on a fixed grid, from its longest
        cached prefix: the prompts' chunks together where the model can (engine.lean, see
        :meth:`_prefill_together`), else one prompt after another (:meth:`_prefill_row`);
        otherwise all run together, left-padded, in one call."""
        now = time.perf_counter()
        for seq in seqs:
            seq.prefilled = now
        if not self._rowwise:
            return self._prefill_padded(seqs)
        if callable(getattr(self.model, "prefill_chunks", None)):
            return self._prefill_together(seqs)
        batch = None
        for seq in seqs:
            fresh = self._prefill_row(seq)
            batch = fresh if batch is None else _merge(batch, fresh)
        return batch

    def _model_extras(self, mask: torch.Tensor) -> dict[str, object]:
        return {"row_starts": row_starts(mask)} if self._rowwise else {}

    def _prefill_padded(self, seqs: list[_Sequence]) -> _Batch:
        """Run whole prompts together, left-padded, in one call."""
        width = max(len(seq.prompt) for seq in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq.prompt):] = torch.tensor(seq.prompt)
            mask[row, width - len(seq.prompt):] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        cache = self._new_cache()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        started = time.perf_counter()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            cache=cache, use_cache=True, logits_to_keep=1,
        )
        batch = _Batch(seqs, cache, mask, torch.empty(0, dtype=torch.long))
        self._advance(batch, out.logits[:, -1, :], started)
        return batch

    def _cached_prefix(self, prompt: list[int]) -> tuple[DynamicCache, int]:
        """A fresh cache holding ``prompt``'s longest cached prefix that ends on a chunk boundary,
        and that prefix's length (0 without a hit)."""
        cache = self._new_cache()
        reuse = 0
        if self.prefix_cache is not None:
            reuse, entry = self.prefix_cache.lookup(prompt, align=PREFILL_CHUNK)
            if entry is not None:
                for index, (keys, values) in enumerate(zip(entry.keys, entry.values, strict=True)):
                    cache.update(keys[:, :, :reuse], values[:, :, :reuse], index)
            if self.metrics is not None:
                self.metrics.observe_prefix("chat", len(prompt), reuse, self.prefix_cache.nbytes)
        return cache, reuse

    def _prefilled(self, seq: _Sequence, cache: DynamicCache) -> _Batch:
        """The one-row batch of a prompt that has run; its state stored for the next turn."""
        if self.prefix_cache is not None:
            self.prefix_cache.store(
                seq.prompt,
                [layer.keys.clone() for layer in cache.layers],
                [layer.values.clone() for layer in cache.layers],
            )
        mask = torch.ones((1, len(seq.prompt)), dtype=torch.long, device=self._device)
        return _Batch([seq], cache, mask, torch.empty(0, dtype=torch.long))

    def _prefill_row(self, seq: _Sequence) -> _Batch:
        """Run one prompt in PREFILL_CHUNK-token chunks at fixed positions (0-127, 128-255,
        ...), starting after the longest cached prefix that ends on a chunk boundary.

        A chunk's numbers depend only on its own tokens and the keys before it, and every
        chunk has the same shapes whether the prompt ran cold, from the cache, or beside other
        requests, so all three give the same reply (attention kernels pick their blocking from
        the lengths they see; a one-shot prefill of 386 tokens and one of 295 differ by ~0.3 in
        layer 5's keys). The prompt's state is then stored for the next turn."""
        started = time.perf_counter()
        prompt = seq.prompt
        cache, reuse = self._cached_prefix(prompt)
        for begin in range(reuse, len(prompt), PREFILL_CHUNK):
            end = min(begin + PREFILL_CHUNK, len(prompt))
            out = self.model(
                input_ids=torch.tensor([prompt[begin:end]], device=self._device),
                attention_mask=torch.ones((1, end), dtype=torch.long, device=self._device),
                position_ids=torch.arange(begin, end, device=self._device).unsqueeze(0),
                cache=cache, use_cache=True, logits_to_keep=1, row_starts=[0],
            )
        batch = self._prefilled(seq, cache)
        self._advance(batch, out.logits[:, -1, :], started)
        return batch

    def _prefill_together(self, seqs: list[_Sequence], defer: bool = True) -> _Batch:
        """:meth:`_prefill_row` for several prompts at once: each prompt's chunks are the ones
        it would run alone (same grid, same cached prefix), but the k-th chunks of all the
        prompts go through the model in one ``prefill_chunks`` call (engine.lean: the linear
        layers on all their tokens at once, attention per prompt), which gives each chunk its
        solo numbers. With a prefix cache, the prompts that share a chunk or more with an earlier
        one of the group (the same card, a regenerated turn) run in a second call, after the
        others are stored, so that they reuse that prefix."""
        started = time.perf_counter()
        first, later = [], []
        for seq in seqs:
            shares = defer and self.prefix_cache is not None and any(
                _reusable(seq.prompt, other.prompt) for other in first)
            (later if shares else first).append(seq)
        starts = [self._cached_prefix(seq.prompt) for seq in first]
        caches = [cache for cache, _ in starts]
        chunks = [list(range(reuse, len(seq.prompt), PREFILL_CHUNK))
                  for seq, (_, reuse) in zip(first, starts, strict=True)]
        last: list[torch.Tensor | None] = [None] * len(first)
        for step in range(max(len(begins) for begins in chunks)):
            rows = [row for row, begins in enumerate(chunks) if step < len(begins)]
            logits = self.model.prefill_chunks([
                (first[row].prompt[chunks[row][step]:chunks[row][step] + PREFILL_CHUNK],
                 chunks[row][step], caches[row]) for row in rows])
            for index, row in enumerate(rows):
                if step == len(chunks[row]) - 1:
                    last[row] = logits[index]
        batch = None
        for seq, cache in zip(first, caches, strict=True):
            fresh = self._prefilled(seq, cache)
            batch = fresh if batch is None else _merge(batch, fresh)
        self._advance(batch, torch.stack(last), started)
        if later:
            batch = _merge(batch, self._prefill_together(later, defer=False))
        return batch

    def _decode(self, batch: _Batch) -> None:
        """Feed every running sequence its last token and sample the next."""
        started = time.perf_counter()
        ones = torch.ones((len(batch.seqs), 1), dtype=batch.mask.dtype, device=batch.mask.device)
        positions = batch.mask.sum(-1, keepdim=True)
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        out = self.model(
            input_ids=batch.last.unsqueeze(-1), attention_mask=batch.mask, position_ids=positions,
            cache=batch.cache, use_cache=True, **self._model_extras(batch.mask), **self._decoding,
        )
        self._advance(batch, out.logits[:, -1, :], started)

    def _advance(self, batch: _Batch, logits: torch.Tensor, started: float) -> None:
        """Sample one token per row, stream the text, and note who is done."""
        params = [seq.params for seq in batch.seqs]
        generators = [seq.generator for seq in batch.seqs]
        if batch.history is None and any(p.penalised for p in params):
            # counted once (a penalised row joined); from here on one token per step
            batch.history = TokenHistory.count(
                [(seq.prompt, seq.generated) for seq in batch.seqs], logits.shape[-1],
                logits.device,
            )
        if batch.history is None and all(p.temperature <= 0 for p in params):
            tokens = greedy_tokens(logits)  # what sample_rows gives greedy rows, ~8x sooner at 8 rows
        else:
            tokens = sample_rows(logits.float(), params, generators, batch.history)
        if batch.history is not None:
            batch.history.add(tokens)
        batch.last = tokens
        self.peak_batch = max(self.peak_batch, len(batch.seqs))
        self._outbox = []
        try:
            for seq, token in zip(batch.seqs, tokens.tolist(), strict=True):
                self._emit(seq, token)
        finally:
            outbox, self._outbox = self._outbox, None
            SequenceHandle.push_all(outbox)
        if self.on_step is not None:
            self.on_step(len(batch.seqs), time.perf_counter() - started, len(batch.seqs))

    def _emit(self, seq: _Sequence, token: int) -> None:
        if seq.handle.cancelled.is_set():
            return
        if not seq.first_token:
            seq.first_token = time.perf_counter()
        delta = next_delta(seq.text, seq.generated, token, self.eos_ids, seq.params.max_tokens)
        if delta is not None and delta.finish_reason is not None:
            self._finish(seq, delta)
        elif delta is not None:
            self._send(seq, delta)

    def _send(self, seq: _Sequence, delta: Delta) -> None:
        """Push ``delta``, or keep it for the step's one push (see _advance)."""
        if self._outbox is not None:
            self._outbox.append((seq.handle, delta))
        else:
            seq.handle.push(delta)

    def _finish(self, seq: _Sequence, delta: Delta) -> None:
        listening = not seq.handle.cancelled.is_set()
        if self.metrics is not None and seq.prefilled:
            self.metrics.observe_sequence(
                "chat", queued=seq.prefilled - seq.started, completion_tokens=len(seq.generated),
                decode_seconds=time.perf_counter() - seq.first_token if seq.first_token else 0.0,
            )
        seq.handle.cancelled.set()  # marks it done for the batch
        self._release(seq)  # before the last delta, so a caller that saw it sees the slot free
        if listening:
            self._send(seq, delta)

    def _release(self, seq: _Sequence) -> None:
        if not seq.released:
            seq.released = True
            self.admission.leave(time.perf_counter() - seq.started)

    def _drop_finished(self, batch: _Batch) -> _Batch | None:
        keep = [i for i, seq in enumerate(batch.seqs) if not seq.handle.cancelled.is_set()]
        for seq in batch.seqs:
            if seq.handle.cancelled.is_set():  # done, or cancelled from outside
                self._release(seq)
        if not keep:
            return None
        if len(keep) < len(batch.seqs):
            index = torch.tensor(keep, device=batch.mask.device)
            batch.cache.batch_select_indices(index)
            batch.mask, batch.last = batch.mask[index], batch.last[index]
            batch.seqs = [batch.seqs[i] for i in keep]
            if batch.history is not None:
                penalised = any(seq.params.penalised for seq in batch.seqs)
                batch.history = batch.history.select(index) if penalised else None
            _trim_padding(batch)
        return batch


def _reusable(prompt: list[int], other: list[int]) -> bool:
    """Whether ``prompt`` could take a chunk or more of its prefix from ``other``'s state (see
    PrefixCache.lookup: at least one token is left to run, reuse ends on a chunk boundary)."""
    return min(common_prefix(prompt, other), len(prompt) - 1) >= PREFILL_CHUNK


def _left_pad(cache: DynamicCache, mask: torch.Tensor, width: int) -> torch.Tensor:
    """Grow ``cache`` and ``mask`` on the left to ``width`` positions of padding."""
    extra = width - mask.shape[1]
    if extra <= 0:
        return mask
    for layer in cache.layers:
        layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
        layer.values = F.pad(layer.values, (0, 0, extra, 0))
    return F.pad(mask, (extra, 0))


def _merge(running: _Batch, fresh: _Batch) -> _Batch:
    """One batch holding the rows of both, aligned on the right."""
    width = max(running.mask.shape[1], fresh.mask.shape[1])
    running.mask = _left_pad(running.cache, running.mask, width)
    fresh.mask = _left_pad(fresh.cache, fresh.mask, width)
    for mine, theirs in zip(running.cache.layers, fresh.cache.layers, strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)
    history = None  # when only one side has one, the next step counts the whole batch afresh
    if running.history is not None and fresh.history is not None:
        history = running.history.concat(fresh.history)
    return _Batch(
        running.seqs + fresh.seqs,
        running.cache,
        torch.cat([running.mask, fresh.mask], dim=0),
        torch.cat([running.last, fresh.last], dim=0),
        history,
    )


def _trim_padding(batch: _Batch) -> None:
    """Drop leading columns that are padding in every remaining row."""
    used = batch.mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else 0
    if start == 0:
        return
    for layer in batch.cache.layers:
        layer.keys = layer.keys[:, :, start:]
        layer.values = layer.values[:, :, start:]
    batch.mask = batch.mask[:, start:]
