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
"""

from __future__ import annotations

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantise each row of ``x`` on its own, multiply in integers, scale back."""
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        # every op here runs ~200 times per decode step: in-place where it is safe, none spare
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12).div_(INT8_MAX)
        quantised = torch.div(rows, scale).round_().to(torch.int8)
        # the transposed view is faster than a contiguous copy at batch 1 (0.9 vs 2.1 ms for the
        # 49k-row output layer) and about as fast at batch 8
        product = torch._int_mm(quantised, self.qweight.t())  # noqa: SLF001 - torch's int8 GEMM
        out = torch.mul(product, scale).mul_(self.wscale)  # int32 * float32 -> float32
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_zeros).float()  # noqa: SLF001
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.reshape(*shape[:-1], self.out_features)
