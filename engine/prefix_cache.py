"""The KV state of recent prompts, so a story's next turn prefills only its new tail.

A story's prompt for turn N+1 starts with turn N's whole prompt (card, lore, summary, history)
and adds the reply and the new message: ~150 new tokens on ~2,000. After each prefill the
batcher stores the prompt's keys and values here; the next prompt that starts with a stored
one (in part: the longest common prefix counts) takes those and runs only the rest.

Bounded by bytes (``ChatSettings.prefix_cache_mb``), least recently used first out. A stored
prompt that is a prefix of a newer one is dropped when the newer one arrives: anything it
could serve, the newer one serves as well. Counters feed /metrics. Like vLLM's automatic
prefix caching, reuse is keyed by tokens, so it works across requests and clients, and a hit
gives the same numbers as a cold prefill where the model's layers are batch-invariant (the
int8 layers and the per-row attention are; see engine.quantize and engine.attention).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

# Reusing fewer tokens than this saves less than the lookup and copy cost.
MIN_REUSE_TOKENS = 16


@dataclass
class CachedPrefix:
    """One stored prompt: its tokens and, per layer, keys and values [1, kv heads, len, dim]."""

    tokens: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Memory held by the tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class PrefixStats:
    """Totals since start, for /metrics."""

    lookups: int = 0
    hits: int = 0
    prompt_tokens: int = 0  # tokens of every looked-up prompt
    reused_tokens: int = 0  # of those, tokens taken from the cache
    evictions: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    limit = min(len(a), len(b))
    for index in range(limit):
        if a[index] != b[index]:
            return index
    return limit


class PrefixCache:
    """An LRU of prompts' KV state, at most ``max_bytes`` in all (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.stats = PrefixStats()
        self._entries: OrderedDict[int, CachedPrefix] = OrderedDict()
        self._next_id = 0
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int], align: int = 1) -> tuple[int, CachedPrefix | None]:
        """The longest stored prefix of ``prompt`` worth reusing, as (tokens to reuse, entry);
        the count is a multiple of ``align``.

        At least one token of the prompt is always left to run, as its logits are needed.
        """
        with self._lock:
            self.stats.lookups += 1
            self.stats.prompt_tokens += len(prompt)
            best, found, found_id = 0, None, None
            for entry_id, entry in self._entries.items():
                shared = min(common_prefix(prompt, entry.tokens), len(prompt) - 1)
                shared -= shared % align
                if shared > best:
                    best, found, found_id = shared, entry, entry_id
            if found is None or best < MIN_REUSE_TOKENS:
                return 0, None
            self._entries.move_to_end(found_id)
            self.stats.hits += 1
            self.stats.reused_tokens += best
            return best, found

    def store(self, tokens: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep ``tokens``' KV state (the tensors are kept as given: pass copies)."""
        entry = CachedPrefix(list(tokens), keys, values)
        size = entry.nbytes
        if size > self.max_bytes or len(tokens) < MIN_REUSE_TOKENS:
            return
        with self._lock:
            for entry_id, old in list(self._entries.items()):
                if len(old.tokens) <= len(tokens) and tokens[:len(old.tokens)] == old.tokens:
                    self._drop(entry_id)  # dominated by the new one
            while self._entries and self._bytes + size > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.stats.evictions += 1
            self._entries[self._next_id] = entry
            self._next_id += 1
            self._bytes += size

    def _drop(self, entry_id: int) -> None:
        self._bytes -= self._entries.pop(entry_id).nbytes
