"""Int8 linear layers for the CPU: the offline chat model at llama.cpp-class speed, no compiler.

:func:`quantize_int8` swaps every ``nn.Linear`` of a loaded transformers model for an
:class:`Int8Linear`: weights in int8 with one scale per output channel, activations quantised
per token at run time, the product an exact integer matmul (``torch._int_mm``). On these CPUs
(AVX-512 VNNI) SmolLM2-135M then decodes at 2-3x its float32 speed at batch 1 and above
CTranslate2 int8's (see bench/engine.py and the README), from the torch wheel we already have.

Why this scheme and not torch's ``quantize_dynamic`` (FBGEMM, faster still at batch 8): that
one quantises a whole batch's activations with one scale, so a row's numbers depend on its
neighbours and a greedy reply changes when another request shares its step. Per-token scales
and an integer product make every row's result independent of the batch (each row is
quantised alone, and integer sums are exact in any order), which the batcher's promise
"batch 8 gives batch 1's text" needs. The same property makes a prompt's cached prefix (see
:mod:`engine.prefix_cache`) give the same numbers as a cold prefill.

Quality: per-channel int8 of weights that came from a 4-bit GGUF loses little; the
per-token activations are the usual W8A8 "dynamic" scheme. Float32 stays for embeddings,
norms, attention and the softmax.

Decode steps (a handful of rows) have two more forms of a linear layer: :class:`Int4Linear`
(4-bit groups, torch's packed int4 kernel: half the bytes, but its cost grows with every 4
rows) and :class:`PackedInt8Linear` (an :class:`Int8Linear`'s own integers prepacked for FBGEMM,
whose cost barely grows from 1 row to 8). ``engine.lean`` picks one per projection, and
compiles its decode step, these modules' ``rows`` included, with TorchScript: they read no
module globals (constants are attributes) and call the ops by name.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

INT8_MAX = 127


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W in int8 per output channel and x quantised per row."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
        quantised = torch.round(weight / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
        self.register_buffer("qweight", quantised.to(torch.int8))
        self.register_buffer("wscale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.levels = INT8_MAX  # an attribute: TorchScript reads no module globals

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantise each row of ``x`` on its own, multiply in integers, scale back."""
        shape = list(x.shape)
        return self.rows(x.reshape(-1, shape[-1]).float()).to(x.dtype).reshape(shape[:-1] + [self.out_features])

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for 2-D float32 ``rows`` (the decode steps' form, without reshapes)."""
        # every op here runs ~200 times per decode step: in-place where it is safe, none spare
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12).div_(self.levels)
        quantised = torch.div(rows, scale).round_().to(torch.int8)
        # the transposed view is faster than a contiguous copy at batch 1 (0.9 vs 2.1 ms for the
        # 49k-row output layer) and about as fast at batch 8
        product = torch._int_mm(quantised, self.qweight.t())  # noqa: SLF001 - torch's int8 GEMM
        out = torch.mul(product, scale).mul_(self.wscale)  # int32 * float32 -> float32
        return out if self.bias is None else out.add_(self.bias)


class PackedInt8Linear(nn.Module):
    """An :class:`Int8Linear`'s weights prepacked for FBGEMM, for decode steps (a few rows at once).

    The same scheme and the same integers: per-channel int8 weights, each row of ``x`` quantised
    alone (``round(127 * x / max|x|)``), an exact integer product, scaled back per row and per
    channel. ``torch._int_mm`` repacks its weight on every call, which at a handful of rows
    costs more than the product: at 8 rows SmolLM2's output layer takes 3 ms here against 6 ms
    (1.1 against 2.0 ms at one row), and a layer's four projections 0.3 ms against 0.7 ms with
    the 4-bit kernel (:class:`Int4Linear`), whose cost grows with every 4 rows. On prompts the
    product itself is as fast as ``torch._int_mm``'s (~10% slower at 128-row chunks, faster at
    a few dozen) and the quantisation costs less (FBGEMM rounds while it packs the rows): a
    45-token prompt of SmolLM2 takes 54 ms against 64.

    The activations go to FBGEMM's fp32-in/fp32-out op already divided by their row's maximum,
    with the one scale ``1/127`` and zero point 128 that op takes for the whole call, so its
    quantisation is the per-row one and the batch never changes a row's numbers. Raises
    ValueError where FBGEMM is missing (non-x86 builds, a torch that dropped it) or does not
    multiply exactly (a CPU without VNNI, whose 16-bit pair sums saturate): callers keep the
    :class:`Int8Linear` then.
    """

    def __init__(self, source: Int8Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.bias = source.bias
        self.step = 1 / INT8_MAX  # FBGEMM's activation scale; an attribute: TorchScript reads no globals
        try:
            with warnings.catch_warnings():  # the quantized-tensor API is deprecated; the op still ships
                warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
                weight = torch._make_per_channel_quantized_tensor(  # noqa: SLF001 - FBGEMM's input form
                    source.qweight, source.wscale.double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
                self.packed = torch.ops.quantized.linear_prepack(weight, None)
            torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default  # noqa: B018 - present?
        except (AttributeError, RuntimeError) as exc:
            raise ValueError(f"no FBGEMM int8 linear in torch {torch.__version__}: {exc}") from exc
        self._check_exact(source)

    def _check_exact(self, source: Int8Linear) -> None:
        """Compare with the exact integer product on the worst case for 16-bit pair sums (every
        product at its largest, signs agreeing) and on ordinary rows."""
        signs = torch.where(source.qweight[:1] >= 0, 1.0, -1.0)
        rows = torch.cat([signs, -signs, torch.randn(2, self.in_features,
                                                     generator=torch.Generator().manual_seed(0))])
        codes = torch.round(rows / rows.abs().amax(dim=-1, keepdim=True) * INT8_MAX).to(torch.int8)
        exact = torch._int_mm(codes, source.qweight.t()).float()  # noqa: SLF001
        got = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes.float(), 1.0, 128,
                                                                               self.packed)
        if not torch.allclose(got, exact * source.wscale, rtol=1e-5, atol=0):
            raise ValueError("FBGEMM's int8 product is not exact on this CPU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape)
        return self.rows(x.reshape(-1, shape[-1]).float()).reshape(shape[:-1] + [self.out_features])

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for 2-D float32 ``rows``."""
        # max|x| as abs then amax: linalg.vector_norm(inf), one op, walks each row unvectorised
        # (8 rows of 576: 14 against 4 us; a prompt's 300 rows of 1536: 1.2 ms against 0.06)
        peak = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)
        # FBGEMM rounds rows/peak * 127 to integers and scales the integer sums by 1/127 and the
        # channel scales; each row's own peak goes back on after
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            rows / peak, self.step, 128, self.packed).mul_(peak)
        return out if self.bias is None else out.add_(self.bias)


def packed_or_plain(source: Int8Linear) -> nn.Module:
    """A :class:`PackedInt8Linear` of ``source``, or ``source`` itself where FBGEMM cannot serve."""
    try:
        return PackedInt8Linear(source)
    except ValueError:
        return source


def quantize_int8(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``model`` by an :class:`Int8Linear`; return how many.

    A tied output layer gets its own int8 copy; the float embedding stays for the lookup.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
                swapped += 1
    return swapped


INT4_GROUP = 32  # inputs per scale and offset: GGUF's Q4_0/Q4_1 blocks, so their weights convert exactly


class Int4Linear(nn.Module):
    """``y = x @ W.T + b`` with W in 4 bits, groups of INT4_GROUP inputs each with a scale and an
    offset (``w = q * scale + min``, GGUF Q4_1's form: a Q4_1 model's weights are kept exactly),
    activations in bfloat16, the product torch's packed int4 CPU kernel; output in float32.

    Half the bytes of :class:`Int8Linear` per weight: a decode step that is bound by memory
    bandwidth reads half as much. Each row's result depends on that row alone (the kernel sums
    every row in the same order whatever the batch), so batching still never changes a reply.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            raise ValueError(f"torch {torch.__version__} has no 4-bit CPU kernel (it came in 2.6)")
        if in_features % INT4_GROUP:
            raise ValueError(f"Int4Linear needs inputs in groups of {INT4_GROUP}, got {in_features}")
        groups = weight.reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scale = (high - low).clamp(min=1e-12) / 15
        codes = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(  # noqa: SLF001
            codes.reshape(out_features, in_features), 1))
        # the kernel's zero point is the value of code 8: w = (q - 8) * scale + zero
        zeros = low + 8 * scale
        self.register_buffer("scales_zeros", torch.cat([scale, zeros], dim=-1)
                             .transpose(0, 1).contiguous().to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float())
        self.in_features, self.out_features = in_features, out_features
        self.group = INT4_GROUP  # an attribute: TorchScript reads no module globals

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape)
        return self.rows(x.reshape(-1, shape[-1])).float().reshape(shape[:-1] + [self.out_features])

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for 2-D ``rows`` (the decode steps' form), in the kernel's bfloat16 when
        there is no bias: every bfloat16 is a float32, so a float32 operand promotes it exactly,
        and the decode step saves the copy."""
        out = torch._weight_int4pack_mm_for_cpu(  # noqa: SLF001
            rows.to(torch.bfloat16), self.packed, self.group, self.scales_zeros)
        return out if self.bias is None else out.float().add_(self.bias)
