"""Choosing the next token: vLLM's penalties, then temperature, top-k, top-p and min-p.

Every chat backend takes the same :class:`SamplingParams`; this module is where their maths
lives. The batcher samples a whole batch in one :func:`sample_rows` call. The penalties run
vectorised over the batch, on just the (row, token) entries the rows have seen, reading a
:class:`TokenHistory` that the batcher keeps current one token per step (no step recounts a
whole history). Temperature, the filters and the draw run row by row, because each row draws
from its own generator: a seeded request must give the same text alone or in a crowd. A row
that asks for none of it costs what it always did: an argmax, or one softmax and one draw.
The omni backend runs the same batcher, so the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ARGMAX_CHUNK = 1024  # see greedy_tokens


@dataclass
class SamplingParams:
    """How one sequence is sampled and when it stops: OpenAI's fields and vLLM's extras.

    Every sampler's default is its neutral value, so a request that names none samples as
    plain temperature + top-p.
    """

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (the route maps vLLM's -1 here)
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; over the prompt and the output
    frequency_penalty: float = 0.0  # over the output only, as OpenAI's
    presence_penalty: float = 0.0  # over the output only, as OpenAI's
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def penalised(self) -> bool:
        """Whether any penalty is on (only then does the sequence's token history matter)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


class TokenHistory:
    """What the penalties read, one row per sequence: which tokens the row has seen (prompt
    and output: ``seen``, for the repetition penalty) and how often it has generated each
    (``counts``, for the frequency and presence penalties). Both are [rows, vocab].

    Counted once from the token ids, then kept current with :meth:`add`; :meth:`select` and
    :meth:`concat` follow rows as a batch drops and merges them.
    """

    def __init__(self, seen: torch.Tensor, counts: torch.Tensor) -> None:
        self.seen = seen
        self.counts = counts

    @classmethod
    def count(
        cls, rows: Sequence[tuple[Sequence[int], Sequence[int]]], vocab: int,
        device: torch.device | str = "cpu",
    ) -> TokenHistory:
        """The history of rows given as ``(prompt ids, output ids)``."""
        seen = torch.zeros((len(rows), vocab), dtype=torch.bool, device=device)
        counts = torch.zeros((len(rows), vocab), dtype=torch.float32, device=device)
        for row, (prompt, output) in enumerate(rows):
            prompt_ids = torch.tensor(list(prompt), dtype=torch.long, device=device)
            output_ids = torch.tensor(list(output), dtype=torch.long, device=device)
            seen[row, prompt_ids] = True
            seen[row, output_ids] = True
            counts[row].index_add_(0, output_ids, torch.ones_like(output_ids, dtype=counts.dtype))
        return cls(seen, counts)

    def add(self, tokens: torch.Tensor) -> None:
        """Record one newly generated token per row."""
        rows = torch.arange(len(tokens), device=tokens.device)
        self.seen[rows, tokens] = True
        self.counts[rows, tokens] += 1

    def select(self, index: torch.Tensor) -> TokenHistory:
        """The rows at ``index``, in that order."""
        return TokenHistory(self.seen[index], self.counts[index])

    def concat(self, other: TokenHistory) -> TokenHistory:
        """These rows followed by ``other``'s."""
        return TokenHistory(torch.cat([self.seen, other.seen]), torch.cat([self.counts, other.counts]))


def penalise(
    logits: torch.Tensor, params: Sequence[SamplingParams], history: TokenHistory
) -> torch.Tensor:
    """``logits`` [rows, vocab] after each row's penalties, as vLLM applies them (a new tensor).

    Repetition (CTRL's, as in transformers and vLLM): a logit of a seen token is divided by
    the penalty when positive and multiplied by it when negative, so the token loses ground
    either way. Then frequency and presence (OpenAI's): minus the penalty times the token's
    count in the output, and minus the penalty once if it occurs there at all. Only the few
    seen entries are touched (whole-vocabulary passes cost several times more on a CPU), and
    each gets vLLM's exact arithmetic; neutral values leave a row bit-equal (x / 1, x * 1 and
    x - 0 are exact), so rows without penalties may share the call.
    """

    def column(name: str) -> torch.Tensor:
        values = [getattr(p, name) for p in params]
        return torch.tensor(values, dtype=logits.dtype, device=logits.device)

    # flat positions of the seen entries (a flat nonzero is twice as fast as a 2-D one)
    seen = history.seen.view(-1).nonzero().squeeze(1)
    rows = seen // logits.shape[-1]
    values, repetition = logits.reshape(-1)[seen], column("repetition_penalty")[rows]
    values = torch.where(values > 0, values / repetition, values * repetition)
    counts = history.counts.view(-1)[seen].to(logits.dtype)  # 0 for prompt-only tokens
    values = values - column("frequency_penalty")[rows] * counts
    values = values - column("presence_penalty")[rows] * (counts > 0)
    logits = logits.clone()
    logits.view(-1)[seen] = values
    return logits


def filter_row(scaled: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row of temperature-scaled logits after top-k, top-p then min-p (``scaled`` itself
    may change). Dropped tokens get -inf: the softmax that follows renormalises the rest."""
    if 0 < p.top_k < scaled.numel():
        kept = scaled.topk(p.top_k).indices  # exactly k, even when logits tie
        filtered = torch.full_like(scaled, float("-inf"))
        filtered[kept] = scaled[kept]
        scaled = filtered
    if p.top_p < 1.0:
        ordered, order = scaled.sort(descending=True)
        probs = ordered.softmax(-1)
        # keep the smallest set whose mass reaches top_p (always at least the best token)
        drop = probs.cumsum(-1) - probs >= p.top_p
        scaled[order[drop]] = float("-inf")
    if p.min_p > 0:
        # prob < min_p * max prob  <=>  logit < max logit + log(min_p): no softmax needed
        scaled[scaled < scaled.max() + math.log(p.min_p)] = float("-inf")
    return scaled


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    history: TokenHistory | None = None,
) -> torch.Tensor:
    """One next token per row of ``logits`` [batch, vocab], each row with its own settings.

    1. Penalties, vectorised over the batch (greedy rows too, as vLLM does); ``history``
       holds every row's tokens and must be given when any row is penalised.
    2. Greedy rows (temperature 0) take the argmax.
    3. Every other row: temperature, top-k, top-p, min-p, then a draw with its generator
       (:func:`draw`).
    ``logits`` itself is left as it was.
    """
    if any(p.penalised for p in params):
        if history is None:
            raise ValueError("penalised rows need their TokenHistory")
        logits = penalise(logits, params, history)
    if any(p.temperature <= 0 for p in params):
        tokens = greedy_tokens(logits)
    else:  # every row draws: no argmax to take
        tokens = torch.zeros(len(params), dtype=torch.long, device=logits.device)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.temperature <= 0:
            continue
        probs = filter_row(logits[row] / p.temperature, p).softmax(-1)
        tokens[row] = draw(probs, gen)
    return tokens


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token from ``probs`` (one row, summing to about 1), by the inverse of its cumulative
    distribution: a uniform draw u in [0, 1), the first token whose cumulative mass (summed in
    float64) exceeds u times the total. The distribution of ``torch.multinomial(probs, 1)``, which
    on the CPU races one exponential draw per token instead: 1 ms a row for SmolLM2's 49,152
    tokens against 0.05. A token of zero mass (filtered out) is never drawn: its cumulative mass
    equals its predecessor's. One float32 uniform per draw, so u * total < total."""
    cumulative = probs.double().cumsum(0)
    target = torch.rand(1, generator=generator, device=probs.device).double() * cumulative[-1]
    return torch.searchsorted(cumulative, target, right=True)[0]


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for [batch, vocab] logits (the first index of each row's maximum,
    NaN counting as the maximum, as argmax has it), via the maxima of ARGMAX_CHUNK-wide chunks:
    torch's argmax walks the vocabulary one element at a time (0.4 ms for 8 rows of SmolLM2's
    49,152), its max is vectorised (0.02 ms)."""
    rows, vocab = logits.shape
    if vocab % ARGMAX_CHUNK:
        return logits.argmax(dim=-1)
    chunks = logits.reshape(rows, vocab // ARGMAX_CHUNK, ARGMAX_CHUNK)
    best = chunks.amax(dim=-1).argmax(dim=-1)  # the first chunk holding the row's maximum
    return best * ARGMAX_CHUNK + chunks[torch.arange(rows, device=logits.device), best].argmax(dim=-1)
