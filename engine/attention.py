"""Attention that treats each row of a batch alone: batching and prefix reuse never change a reply.

The batcher keeps sequences as left-padded rows of one KV cache. Standard SDPA attends over the
padded width with a mask; the masked keys add exact zeros, but the kernel sums a longer, shifted
row, so a sequence's numbers change (by ~1e-5) with its neighbours' lengths. In float that
rarely flips a greedy token; with int8 activations (:mod:`engine.quantize`) a 1e-5 change can
move a rounding and the reply diverges. Here each row attends over its own keys only, sliced
past its padding, with the same kernel and the same explicit causal mask whether it runs alone,
in a batch, or from a cached prefix, so the same prompt gives the same numbers in all three.

Cost: one SDPA call per row and layer (SmolLM2: 30 layers, so 240 small calls a step at batch
8, about 10% of a decode step on these CPUs). Registered with transformers as
``masque_rows``; it needs no 4-D mask (transformers builds none for it), and the batcher passes
``row_starts`` (each row's first real column) through the model's keyword arguments.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from transformers import AttentionInterface

NAME = "masque_rows"


@lru_cache(maxsize=8)
def _causal(queries: int, keys: int) -> torch.Tensor:
    """Bottom-right aligned causal mask: query i (of the last ``queries`` positions) sees keys up
    to its own position. Read-only and shared between layers."""
    return torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)


def rowwise_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, heads, queries, dim]
    key: torch.Tensor,  # [batch, kv heads, keys, dim], left-padded rows
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # unused: rows are sliced instead
    dropout: float = 0.0,
    scaling: float | None = None,
    row_starts: list[int] | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """Attention output [batch, queries, heads, dim]; padded query positions get zeros."""
    batch, heads, queries, dim = query.shape
    keys = key.shape[2]
    starts = row_starts if row_starts is not None else [0] * batch
    out = query.new_zeros(batch, queries, heads, dim)
    gqa = key.shape[1] != heads
    for row, start in enumerate(starts):
        first = max(0, start - (keys - queries))  # this row's queries before `first` are padding
        q = query[row:row + 1, :, first:]
        k, v = key[row:row + 1, :, start:], value[row:row + 1, :, start:]
        mask = _causal(q.shape[2], k.shape[2]).to(q.device) if q.shape[2] > 1 else None
        result = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa,
        )
        out[row, first:] = result[0].transpose(0, 1)
    return out, None


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     starts: list[int]) -> torch.Tensor:
    """One query per row, for decode steps: ``query`` [batch, heads, dim] already scaled, ``key``
    and ``value`` [batch, kv heads, keys, dim] left-padded, each row's keys from ``starts[row]``.
    Returns [batch, heads * dim].

    Row by row as :func:`rowwise_attention`, so a row's numbers never depend on its neighbours,
    but with two batched matrix products and a softmax over the row's own keys, the query heads
    of a key head side by side: one query makes SDPA's blocking and its scratch buffers cost more
    than the arithmetic (~18 against ~12 us a row and layer at 50 keys, alike at 300).

    TorchScript compiles it into engine.lean's decode step (hence the plain loop). One padded
    product for all the rows did not pay: with the keys as the rows of the product (the layout
    whose sums do not depend on the width), it took 130 against 121 us a layer at 8 rows of ~90
    keys and 450 against 330 at ~350."""
    batch, heads, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    queries = query.view(batch, kv_heads, heads // kv_heads, dim)
    keys_t = key.transpose(2, 3)  # [batch, kv heads, dim, keys]: each row's keys as bmm wants them
    if batch == 1 and starts[0] == 0:  # the same products as _one_row's, on [1, kv heads, ...] views
        return torch.matmul(torch.matmul(queries, keys_t).softmax(dim=-1), value).view(1, heads * dim)
    rows = [_one_row(queries[row], keys_t[row], value[row], starts[row], length) for row in range(batch)]
    return torch.cat(rows).view(batch, heads * dim)


def _one_row(query: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, start: int,
             length: int) -> torch.Tensor:
    """softmax(q k^T) v for one row: ``query`` [kv heads, group, dim], ``keys_t`` [kv heads,
    dim, keys], ``values`` [kv heads, keys, dim], the row's keys from ``start``."""
    if start != 0:
        keys_t, values = keys_t.narrow(2, start, length - start), values.narrow(1, start, length - start)
    return torch.bmm(torch.bmm(query, keys_t).softmax(dim=-1), values)


AttentionInterface.register(NAME, rowwise_attention)


def row_starts(mask: torch.Tensor) -> list[int]:
    """Each row's first real column in a left-padded 2-D mask (1 = real token)."""
    return (mask.shape[1] - mask.sum(dim=-1)).tolist()
