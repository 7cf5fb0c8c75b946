"""A lean int8 decoder for Llama-family chat models on the CPU (Llama, SmolLM2, Qwen2, Mistral).

At 135M parameters a decode step's arithmetic takes ~2 ms; transformers' general-purpose forward
spends ~15 ms more dispatching ~3,000 small ops (norms in five ops, three separate projections,
RoPE per tensor) and copying the whole KV cache on every step (``torch.cat``: 92 MB a step at
2,000 tokens). This module runs the same weights and the same maths with fewer, fused ops:

- q, k and v are one int8 projection, gate and up another (:class:`engine.quantize.Int8Linear`:
  per-channel weights, per-token activations, an exact integer matmul);
- with ``decode_int4`` (``quantize=int4``) the int8 weights are prepacked for FBGEMM
  (:class:`engine.quantize.PackedInt8Linear`: the same integers, prompts ~15% faster) and the
  decode steps use a second, 4-bit copy of the projections (:class:`engine.quantize.Int4Linear`,
  GGUF Q4_1's groups): half the bytes; prompts keep int8, 4x faster than the 4-bit kernel on
  128-token chunks. The 4-bit kernel's cost grows with every 4 rows (gate+up: 0.11 ms for 1 row,
  0.35 ms for 8), so the projections named in PACKED_AT_DECODE (gate+up, the widest) and the
  output layer decode on the prepacked int8 instead, their input's outlier channels smoothed into
  the weights at load (SmoothQuant, :meth:`LeanDecoder._smooth`), so the int8 activations cost
  about no accuracy (PACKED_AT_DECODE has the figures for the others). Which kernel runs depends
  on the phase and the layer alone, never on the batch, so batching and prefix reuse still never
  change a reply (the prefix cache holds prompts' keys, all from prefill);
- a decode step (:class:`_DecodeStep`) runs on 2-D [batch, width] rows with as few ops as it
  can: a per-row attention of two small matrix products
  (:func:`engine.attention.decode_attention`), RMSNorm in three ops, 1/sqrt(dim) folded into the
  queries' RoPE factors, 4-bit kernels' bfloat16 outputs left for float32 operands to promote;
  TorchScript runs it (no C++ compiler needed), without Python between its ~900 ops and without
  the GIL (:meth:`LeanDecoder._decode_program`). On this 2-core EPYC with one thread: 10 ms a
  step at batch 1 (13 in Python, 16 before the rewrite) and 25 ms at 8 (31, 42);
- RMSNorm is ``F.rms_norm`` in prompts; RoPE's cos/sin come from one table, applied to q and k at
  once (``roll`` and a signed sine instead of rotate_half's four ops, the same numbers);
- the KV cache (:class:`GrowingCache`) has room to grow, so a step writes one column instead of
  copying the cache;
- attention is :func:`engine.attention.rowwise_attention`, so a row's numbers never depend on
  its neighbours and a chunked prefill from a cached prefix equals a cold one;
- prompts admitted together run their chunks in one call (:meth:`LeanDecoder.prefill_chunks`):
  the per-token ops on all their tokens at once, attention per prompt, each chunk's numbers its
  solo ones (8 prompts of ~37 tokens: 332 ms against 428 one after another, one thread).

It takes the batcher's call (``input_ids``, ``position_ids``, ``cache``, ``logits_to_keep``,
``row_starts``) and answers with ``.logits``, so :class:`engine.batching.Batcher` drives it as
it drives a transformers model. Other architectures keep the transformers forward with int8
linear layers (:func:`engine.quantize.quantize_int8`).
"""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from engine.attention import decode_attention, rowwise_attention
from engine.quantize import Int4Linear, Int8Linear, packed_or_plain

log = logging.getLogger(__name__)

SUPPORTED = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}
GROWTH = 256  # cache columns added beyond need when a layer runs out of room
# Decode-step projections that run on prepacked int8 (engine.quantize.PackedInt8Linear), the
# prompts' own modules, rather than on a 4-bit copy: the 4-bit kernel's cost grows with every 4
# rows, FBGEMM's barely. Their int8 activations cost little once smoothed (LeanDecoder._smooth).
# The compiled step, SmolLM2, one thread, A/B in one process (36 interleaved steps, min/median):
# ("qkv", "o", "gate_up", "down") 9.22/9.61 ms at batch 1 and 18.6/20.2 at 8, against
# 9.92/10.24 and 25.3/26.9 with gate+up alone (qkv, o and gate+up: 9.35/9.59, 21.6/22.7). Mean
# KL to float32 (teacher-forced decode steps over three texts, ~190 tokens): all four 0.0229,
# gate+up alone 0.0248, qkv, o and gate+up 0.0213, all in 4 bits 0.0210. () keeps every
# projection in 4 bits; the offline model's tests pin gate+up alone (test_prefix_cache).
PACKED_AT_DECODE = ("gate_up",)
# SmoothQuant (Xiao et al., 2023) for the projections that decode on int8 (see
# LeanDecoder._smooth): each input channel j is divided by s_j = max|x_j|^a / max|W_j|^(1-a) and
# the weights' column multiplied by it, both folded into weights (no op at run time); max|x_j|
# from CALIBRATION_TOKENS tokens the model writes itself at load.
SMOOTHING_ALPHA = 0.5
CALIBRATION_TOKENS = 64


def supports(model: Any) -> bool:
    """Whether ``model`` (a loaded transformers causal LM) can run as a :class:`LeanDecoder`."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    return (type(model).__name__ in SUPPORTED and rope.get("rope_type", "default") == "default"
            and not getattr(config, "sliding_window", None) and getattr(config, "hidden_act", "") == "silu")


def _float_linear(*linears: nn.Linear) -> nn.Linear:
    """One float32 linear computing several linears' outputs side by side."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    biases = [linear.bias for linear in linears]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None)
    fused.weight = nn.Parameter(weight.float(), requires_grad=False)
    if biases[0] is not None:
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]).float(), requires_grad=False)
    return fused


def _fused(kind: type[nn.Module], *linears: nn.Linear) -> nn.Module:
    """One quantised projection (``kind``) computing several linears' outputs side by side."""
    return kind(_float_linear(*linears))


def _smoothing(peaks: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors for inputs whose channels reach ``peaks``; a channel
    the calibration barely saw counts as reaching a hundredth of the typical peak, so that a later
    token cannot make it the new outlier."""
    peaks = peaks.clamp(min=peaks.median().item() / 100 + 1e-6)
    columns = weight.abs().amax(dim=0)
    columns = columns.clamp(min=columns.median().item() / 100 + 1e-6)
    return peaks ** SMOOTHING_ALPHA / columns ** (1 - SMOOTHING_ALPHA)


class _Projections(nn.Module):
    """A layer's four projections in one quantised form, but those given in ``shared`` (by name:
    another form's modules, not built twice)."""

    def __init__(self, layer: nn.Module, kind: type[nn.Module],
                 shared: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        build = {"qkv": lambda: _fused(kind, attn.q_proj, attn.k_proj, attn.v_proj),
                 "o": lambda: kind(attn.o_proj),
                 "gate_up": lambda: _fused(kind, mlp.gate_proj, mlp.up_proj),
                 "down": lambda: kind(mlp.down_proj)}
        shared = shared or {}
        for name, make in build.items():
            setattr(self, name, shared[name] if name in shared else make())


_NAMES = ("qkv", "o", "gate_up", "down")


class _Layer(nn.Module):
    def __init__(self, layer: nn.Module, decode_int4: bool) -> None:
        super().__init__()
        self.prefill = _Projections(layer, Int8Linear)
        self.decode = self.prefill
        if decode_int4:
            # prompts too on the int8 weights prepacked, where FBGEMM can serve (the same integers;
            # ~15% faster on a 45-token prompt, its quantisation costs less); decode steps share the
            # prompts' modules for PACKED_AT_DECODE, 4 bits for the others (module docstring)
            for name in _NAMES:
                setattr(self.prefill, name, packed_or_plain(getattr(self.prefill, name)))
            self.decode = _Projections(layer, Int4Linear, shared={
                name: getattr(self.prefill, name) for name in PACKED_AT_DECODE})
        self.norm_in = nn.Parameter(layer.input_layernorm.weight.detach().float().clone(), requires_grad=False)
        self.norm_post = nn.Parameter(layer.post_attention_layernorm.weight.detach().float().clone(),
                                      requires_grad=False)


class GrowingLayer(DynamicLayer):
    """A cache layer with spare columns: appending writes in place; ``keys``/``values`` are the
    filled parts. Assigning either (as the batcher does when it merges, pads, trims or drops rows,
    keys first, then values) replaces that tensor's storage; each keeps its own length, as the
    other may not have been assigned yet."""

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._k_len = self._v_len = 0
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._k is None else self._k.narrow(2, 0, self._k_len)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k, self._k_len = value, 0 if value is None else value.shape[2]

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._v is None else self._v.narrow(2, 0, self._v_len)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v, self._v_len = value, 0 if value is None else value.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[3]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[3]))
        self.is_initialized = True

    @staticmethod
    def _with_room(storage: torch.Tensor, length: int, end: int) -> torch.Tensor:
        """``storage`` if it has ``end`` columns, else a copy of its first ``length`` columns with
        room for ``end`` and GROWTH more."""
        if end <= storage.shape[2]:
            return storage
        grown = storage.new_empty((*storage.shape[:2], end + GROWTH, storage.shape[3]))
        grown[:, :, :length] = storage[:, :, :length]
        return grown

    @classmethod
    def _append(cls, storage: torch.Tensor, length: int, new: torch.Tensor) -> torch.Tensor:
        """``new`` written after the first ``length`` columns of ``storage`` (grown when it has no
        room); returns the storage that holds it."""
        storage = cls._with_room(storage, length, length + new.shape[2])
        storage.narrow(2, length, new.shape[2]).copy_(new)
        return storage

    def room(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys' and values' storages, grown where they lack room for ``columns`` more: the
        decode step (:class:`_DecodeStep`) writes its column into them itself, then calls
        :meth:`filled`. Keys and values must have the same length (they do between steps)."""
        self._k = self._with_room(self._k, self._k_len, self._k_len + columns)
        self._v = self._with_room(self._v, self._v_len, self._v_len + columns)
        return self._k, self._v

    def filled(self, columns: int) -> None:
        """Count ``columns`` more columns written after the filled ones (see :meth:`room`)."""
        self._k_len += columns
        self._v_len += columns

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._k = self._append(self._k, self._k_len, key_states)
        self._v = self._append(self._v, self._v_len, value_states)
        self._k_len += key_states.shape[2]
        self._v_len += value_states.shape[2]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._k_len


class GrowingCache(DynamicCache):
    """A :class:`~transformers.DynamicCache` of :class:`GrowingLayer`s."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = [GrowingLayer() for _ in range(layers)]


class LeanDecoder(nn.Module):
    """The Llama-family forward in int8 with fused projections (see the module docstring)."""

    def __init__(self, model: Any, max_positions: int, decode_int4: bool = False) -> None:
        super().__init__()
        self.decode_int4 = decode_int4
        config = model.config
        self.config = config
        self.generation_config = model.generation_config
        inner = model.model
        self.embed = nn.Parameter(inner.embed_tokens.weight.detach().float(), requires_grad=False)
        self.layers = nn.ModuleList(_Layer(layer, decode_int4) for layer in inner.layers)
        self.norm = nn.Parameter(inner.norm.weight.detach().float().clone(), requires_grad=False)
        # the output layer (a third of a decode step's bytes) prepacked where the decode kernels run:
        # the same int8 weights, twice as fast for one row or eight (engine.quantize)
        self.lm_head = Int8Linear(model.lm_head)
        if decode_int4:
            self.lm_head = packed_or_plain(self.lm_head)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.scaling = self.head_dim ** -0.5
        inv_freq = inner.rotary_emb.inv_freq.detach().float()
        positions = torch.arange(min(max_positions, config.max_position_embeddings), dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]
        table = torch.cat([freqs, freqs], dim=-1)
        scale = getattr(inner.rotary_emb, "attention_scaling", 1.0)
        self.register_buffer("cos", table.cos() * scale, persistent=False)
        self.register_buffer("sin", table.sin() * scale, persistent=False)
        # rotate_half(x) * sin == roll(x, half) * [-sin, sin]: one op where there were four
        half = self.head_dim // 2
        signed = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)
        self.register_buffer("sin_signed", signed, persistent=False)
        # decode steps' RMSNorm (see _rms): weights times sqrt(width), and sqrt(width * eps)
        root = config.hidden_size ** 0.5
        for layer in self.layers:
            layer.norm_in_scaled = nn.Parameter(layer.norm_in * root, requires_grad=False)
            layer.norm_post_scaled = nn.Parameter(layer.norm_post * root, requires_grad=False)
        self.norm_scaled = nn.Parameter(self.norm * root, requires_grad=False)
        self.register_buffer("norm_floor", torch.tensor((config.hidden_size * self.eps) ** 0.5),
                             persistent=False)
        # decode steps fold attention's 1/sqrt(dim) into the queries' RoPE factors
        self.register_buffer("head_scale", torch.tensor(
            [self.scaling] * self.heads + [1.0] * self.kv_heads).view(-1, 1), persistent=False)
        self._step: Any = None  # the decode step's program, built at the first step (_decode_program)
        if decode_int4:
            self._smooth(model)

    def _smooth(self, model: Any) -> None:
        """Fold SmoothQuant factors into the projections that decode on int8 (PACKED_AT_DECODE):
        gate+up's input channels through the post-attention norm's weight, down's through up's rows,
        q/k/v's and o's as :meth:`_smooth_attention` says. Per-token int8 activations lose most
        where one channel dwarfs the rest (SmolLM2's reach 7-17x their row's RMS, always the same
        few channels per layer). Fed the same text, SmolLM2's decode steps are then as close to
        float32 with all four on int8 as all in 4 bits (the figures at PACKED_AT_DECODE; unsmoothed,
        q/k/v alone on int8 took gate+up's 0.0248 to 0.0317; an earlier measure on other text:
        int8 everywhere unsmoothed 0.040). Smoothing the output layer's input did not help.
        Weights and norms change; the function does not."""
        names = [name for name in ("qkv", "o", "gate_up", "down") if name in PACKED_AT_DECODE]
        if not names:
            return
        smooth_down = "down" in PACKED_AT_DECODE
        watched: dict[Any, nn.Module] = {}
        for index, layer in enumerate(self.layers):
            for name in names:
                watched[index, name] = getattr(layer.prefill, name)
        peaks = self._calibration_peaks(watched)
        root = self.config.hidden_size ** 0.5
        with torch.no_grad():
            for index, (layer, source) in enumerate(zip(self.layers, model.model.layers, strict=True)):
                if "qkv" in names or "o" in names:
                    self._smooth_attention(layer, source.self_attn, peaks, index, names)
                if "gate_up" not in names:
                    continue
                gate_up = _float_linear(source.mlp.gate_proj, source.mlp.up_proj)
                factors = _smoothing(peaks[index, "gate_up"], gate_up.weight)
                layer.norm_post /= factors
                layer.norm_post_scaled.copy_(layer.norm_post * root)
                gate_up.weight.mul_(factors)
                if smooth_down:
                    down = _float_linear(source.mlp.down_proj)
                    factors = _smoothing(peaks[index, "down"], down.weight)
                    width = down.weight.shape[1]
                    gate_up.weight[width:] /= factors[:, None]  # up's rows: silu(gate) * up / s
                    if gate_up.bias is not None:
                        gate_up.bias[width:] /= factors
                    down.weight.mul_(factors)
                    layer.prefill.down = layer.decode.down = packed_or_plain(Int8Linear(down))
                layer.prefill.gate_up = layer.decode.gate_up = packed_or_plain(Int8Linear(gate_up))
        self._step = None  # the calibration's steps built it on the projections replaced here

    def _smooth_attention(self, layer: _Layer, attn: nn.Module, peaks: dict[Any, torch.Tensor],
                          index: int, names: list[str]) -> None:
        """:meth:`_smooth` for the attention's projections: q/k/v's input channels through the input
        norm's weight (as gate+up's through the post-attention norm's), o's through v's rows (o's
        input channel (head h, d) is softmax-weighted values of v's channel (h's key head, d), so
        dividing that v row divides it; the query heads of a key head share its factor)."""
        qkv = _float_linear(attn.q_proj, attn.k_proj, attn.v_proj)
        if "qkv" in names:
            factors = _smoothing(peaks[index, "qkv"], qkv.weight)
            layer.norm_in /= factors
            layer.norm_in_scaled.copy_(layer.norm_in * self.config.hidden_size ** 0.5)
            qkv.weight.mul_(factors)
        if "o" in names:
            out = _float_linear(attn.o_proj)
            group = self.heads // self.kv_heads
            grouped = self.kv_heads, group, self.head_dim  # o's input channels by key head
            seen = peaks[index, "o"].view(grouped).amax(dim=1)
            columns = out.weight.abs().amax(dim=0).view(grouped).amax(dim=1)
            floor = columns.median().item() / 100 + 1e-6
            factors = (seen.clamp(min=seen.median().item() / 100 + 1e-6) ** SMOOTHING_ALPHA
                       / columns.clamp(min=floor) ** (1 - SMOOTHING_ALPHA))  # [kv heads, dim]
            v_rows = slice(qkv.weight.shape[0] - self.kv_heads * self.head_dim, None)
            qkv.weight[v_rows] /= factors.reshape(-1, 1)
            if qkv.bias is not None:
                qkv.bias[v_rows] /= factors.reshape(-1)
            out.weight.mul_(factors[:, None, :].expand(grouped).reshape(1, -1))
            layer.prefill.o = layer.decode.o = packed_or_plain(Int8Linear(out))
        if "qkv" in names:
            layer.prefill.qkv = layer.decode.qkv = packed_or_plain(Int8Linear(qkv))
        else:  # o's smoothing changed v's rows: both copies of q/k/v take them
            layer.prefill.qkv = packed_or_plain(Int8Linear(qkv))
            if layer.decode is not layer.prefill:
                layer.decode.qkv = Int4Linear(qkv)

    def _calibration_peaks(self, watched: dict[Any, nn.Module]) -> dict[Any, torch.Tensor]:
        """Each watched projection's largest |input| per channel over CALIBRATION_TOKENS tokens
        that the model writes greedily from its first token (the same every load; no tokenizer
        needed), run as one prompt."""
        start = self.config.bos_token_id if isinstance(self.config.bos_token_id, int) else 0
        ids = [start]
        with torch.inference_mode():
            cache = self.make_cache()
            logits = self(input_ids=torch.tensor([ids]), position_ids=torch.tensor([[0]]), cache=cache,
                          logits_to_keep=1, row_starts=[0]).logits
            for position in range(1, CALIBRATION_TOKENS):
                ids.append(int(logits[0, -1].argmax()))
                logits = self(input_ids=torch.tensor([ids[-1:]]), position_ids=torch.tensor([[position]]),
                              cache=cache, row_starts=[0], decoding=True).logits
        peaks: dict[Any, torch.Tensor] = {}

        def watch(key: Any) -> Any:
            def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                rows = args[0].reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
                peaks[key] = rows if key not in peaks else torch.maximum(peaks[key], rows)
            return hook

        hooks = [module.register_forward_pre_hook(watch(key)) for key, module in watched.items()]
        try:
            with torch.inference_mode():
                self(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None],
                     cache=self.make_cache(), logits_to_keep=1, row_starts=[0])
        finally:
            for hook in hooks:
                hook.remove()
        return {key: peak.clone() for key, peak in peaks.items()}  # out of inference mode

    def make_cache(self) -> GrowingCache:
        """An empty KV cache for this model (the batcher asks for one per prefill)."""
        return GrowingCache(len(self.layers))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: GrowingCache,
                logits_to_keep: int = 0, row_starts: list[int] | None = None,
                decoding: bool = False, **_: Any) -> SimpleNamespace:
        """Logits [batch, tokens kept, vocab] for ``input_ids`` at ``position_ids``; ``decoding``
        (the batcher's decode steps: one token a row) takes :meth:`_decode_step`."""
        if decoding and self.decode_int4:
            return SimpleNamespace(logits=self._decode_step(input_ids, position_ids, cache, row_starts))

        def attend(index: int, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor) -> torch.Tensor:
            key, value = cache.update(key, value, index)
            return rowwise_attention(None, query, key, value, None, scaling=self.scaling,
                                     row_starts=row_starts)[0]

        hidden = self._layers(input_ids, position_ids, attend)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return SimpleNamespace(logits=self._logits(hidden))

    def prefill_chunks(self, chunks: list[tuple[list[int], int, GrowingCache]]) -> torch.Tensor:
        """Several prompts' chunks in one call, each given as (token ids, position of its first
        token, that prompt's own one-row cache, holding the tokens before it); returns each
        chunk's last logits, [chunks, vocab].

        The chunks' tokens run as the rows of one sequence through every per-token op (the
        linear layers, norms, RoPE: each row's numbers are its own, see engine.quantize), and
        each chunk attends alone over its own cache, with the shapes a solo call gives it. So each
        chunk gets bit for bit the numbers (and writes the keys) that :meth:`forward` gives it
        alone, with one set of calls per layer instead of one per prompt."""
        bounds, offset = [], 0
        for ids, _, _ in chunks:
            bounds.append((offset, len(ids)))
            offset += len(ids)
        device = self.embed.device
        input_ids = torch.tensor([[token for ids, _, _ in chunks for token in ids]], device=device)
        position_ids = torch.cat([torch.arange(begin, begin + len(ids), device=device)
                                  for ids, begin, _ in chunks])

        def attend(index: int, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor) -> torch.Tensor:
            parts = []
            for (start, length), (_, _, cache) in zip(bounds, chunks, strict=True):
                keys, values = cache.update(key[:, :, start:start + length],
                                            value[:, :, start:start + length], index)
                parts.append(rowwise_attention(
                    None, query[:, :, start:start + length], keys, values, None,
                    scaling=self.scaling, row_starts=[0])[0])
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

        hidden = self._layers(input_ids, position_ids[None], attend)
        last = torch.tensor([start + length - 1 for start, length in bounds], device=device)
        return self._logits(hidden[0, last])

    def _layers(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attend: Any) -> torch.Tensor:
        """The hidden states after every layer, [batch, length, width], attention by
        ``attend(layer index, query, key, value)`` ([batch, heads, length, dim] each; it returns
        [batch, length, heads, dim]) with the prompts' int8 projections."""
        batch, length = input_ids.shape
        hidden = F.embedding(input_ids, self.embed)
        cos = self.cos[position_ids].unsqueeze(2)  # [batch, length, 1, dim]: q and k heads alike
        sin = self.sin_signed[position_ids].unsqueeze(2)
        half = self.head_dim // 2
        q_width, k_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        width = hidden.shape[-1]
        for index, layer in enumerate(self.layers):
            proj = layer.prefill
            normed = F.rms_norm(hidden, (width,), layer.norm_in, self.eps)
            qkv = proj.qkv(normed)
            qk = qkv[..., :q_width + k_width].view(batch, length, self.heads + self.kv_heads,
                                                   self.head_dim)
            qk = qk * cos + qk.roll(half, -1) * sin
            query = qk[:, :, :self.heads].transpose(1, 2)
            key = qk[:, :, self.heads:].transpose(1, 2)
            value = qkv[..., q_width + k_width:].view(batch, length, self.kv_heads,
                                                      self.head_dim).transpose(1, 2)
            attended = attend(index, query, key, value)
            hidden = hidden + proj.o(attended.reshape(batch, length, q_width))
            normed = F.rms_norm(hidden, (width,), layer.norm_post, self.eps)
            gate, up = proj.gate_up(normed).chunk(2, dim=-1)
            hidden = hidden + proj.down(F.silu(gate) * up)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(F.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.eps))

    def _decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: GrowingCache,
                     row_starts: list[int] | None) -> torch.Tensor:
        """One token for each row ([batch, 1] ids) by :class:`_DecodeStep`, which writes each
        layer's new keys and values into the cache's storage. Logits [batch, 1, vocab].

        No torch call here but the program's: each lets the server's other threads take the GIL,
        and the worker waits to get it back."""
        room = [layer.room(1) for layer in cache.layers]
        logits = self._decode_program()(
            input_ids, position_ids, [keys for keys, _ in room], [values for _, values in room],
            cache.layers[0].get_seq_length(),
            row_starts if row_starts is not None else [0] * input_ids.shape[0])
        for layer in cache.layers:
            layer.filled(1)
        return logits

    def _decode_program(self) -> Any:
        """The decode step (:class:`_DecodeStep` on this decoder's current decode modules) compiled
        by TorchScript, built at the first step after the modules change (``_smooth`` replaces some;
        tests swap them): ~30 ops a layer, 900 a step, run by TorchScript's interpreter without the
        Python interpreter between them and without holding the GIL, so the server's event loop
        streams the previous tokens meanwhile. One thread, SmolLM2, 8 rows: 27 ms a step against 31
        in Python (13 against 10.9 at one row); the same ops, so the same numbers bit for bit.
        Where TorchScript cannot compile it (a torch without it), the same module runs in Python."""
        if self._step is None:
            step = _DecodeStep(self)
            try:
                with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.compile,
                    warnings.simplefilter("ignore")  # which needs a C++ compiler
                    self._step = torch.jit.script(step)
            except Exception as exc:  # noqa: BLE001 - any failure to compile leaves the eager module
                log.warning("TorchScript could not compile the decode step (%s); it runs in Python", exc)
                self._step = step
        return self._step


def _rms(rows: torch.Tensor, weight_scaled: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """RMSNorm of 2-D ``rows`` in three ops where F.rms_norm takes seven (twice as long at a few
    rows): ``x / sqrt(mean(x^2) + eps) = x * sqrt(n) / hypot(|x|, sqrt(n * eps))``, the ``sqrt(n)``
    folded into the weight and ``floor`` = sqrt(n * eps)."""
    return torch.div(rows, torch.hypot(torch.linalg.vector_norm(rows, dim=-1, keepdim=True),
                                       floor)).mul_(weight_scaled)


class _DecodeLayer(nn.Module):
    """One layer of a decode step: :class:`LeanDecoder`'s forward on 2-D [batch, width] rows with
    the decode projections, the attention scale folded into the queries' RoPE factors and
    :func:`engine.attention.decode_attention`. Every row's numbers depend on that row alone.
    It shares its decoder's modules and tensors (no copy)."""

    def __init__(self, decoder: LeanDecoder, layer: _Layer) -> None:
        super().__init__()
        proj = layer.decode
        self.qkv, self.o, self.gate_up, self.down = proj.qkv, proj.o, proj.gate_up, proj.down
        self.norm_in, self.norm_post = layer.norm_in_scaled, layer.norm_post_scaled
        self.register_buffer("floor", decoder.norm_floor, persistent=False)
        self.q_heads, self.heads = decoder.heads, decoder.heads + decoder.kv_heads
        self.dim, self.half = decoder.head_dim, decoder.head_dim // 2

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, length: int, starts: list[int]) -> torch.Tensor:
        """``hidden`` after this layer (updated in place); ``keys``/``values``: this layer's cache
        storage, ``length`` columns filled, the new column written at ``length``."""
        batch = hidden.shape[0]
        # the projections' outputs may be bfloat16 (Int4Linear.rows): float32 operands promote them.
        # Every op here runs 30 times a step: views taken in one indexing each, none spare
        qkv = self.qkv.rows(_rms(hidden, self.norm_in, self.floor)).view(batch, -1, self.dim)
        qk = qkv[:, :self.heads]  # [batch, q + kv heads, dim], then v's heads
        qk = qk * cos + qk.roll(self.half, -1) * sin
        keys.narrow(2, length, 1).copy_(qk[:, self.q_heads:, None])  # [batch, kv heads, 1, dim]
        values.narrow(2, length, 1).copy_(qkv[:, self.heads:, None])
        attended = decode_attention(qk[:, :self.q_heads], keys.narrow(2, 0, length + 1),
                                    values.narrow(2, 0, length + 1), starts)
        hidden.add_(self.o.rows(attended))
        gate, up = self.gate_up.rows(_rms(hidden, self.norm_post, self.floor)).chunk(2, dim=-1)
        if gate.dtype != torch.float32:
            gate = gate.float()
        return hidden.add_(self.down.rows(F.silu(gate).mul_(up)))


class _DecodeStep(nn.Module):
    """A whole decode step, one token a row: embedding, RoPE factors, every :class:`_DecodeLayer`,
    the final norm and the output layer; logits [batch, vocab]. Written for TorchScript (see
    :meth:`LeanDecoder._decode_program`): the cache comes in as each layer's storage and the
    filled length, the batcher's bookkeeping stays in Python."""

    def __init__(self, decoder: LeanDecoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DecodeLayer(decoder, layer) for layer in decoder.layers)
        self.lm_head = decoder.lm_head
        for name in ("embed", "norm_scaled"):
            setattr(self, name, getattr(decoder, name))
        for name in ("cos", "sin_signed", "head_scale", "norm_floor"):
            self.register_buffer(name, getattr(decoder, name), persistent=False)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], length: int, starts: list[int]) -> torch.Tensor:
        """Logits [batch, 1, vocab] for ``ids`` at ``positions`` (both [batch, 1])."""
        hidden = F.embedding(ids.view(-1), self.embed)
        positions = positions.view(-1)
        cos = self.cos[positions].unsqueeze(1) * self.head_scale  # [batch, q + kv heads, dim]
        sin = self.sin_signed[positions].unsqueeze(1) * self.head_scale
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, keys[index], values[index], length, starts)
        return self.lm_head.rows(_rms(hidden, self.norm_scaled, self.norm_floor)).unsqueeze(1)
