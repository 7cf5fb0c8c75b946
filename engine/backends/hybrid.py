"""Chat backend pairing llama.cpp and transformers on the same GGUF: each where it is fastest.

A request that arrives while llama.cpp is free runs there: its quantised kernels are the
fastest way to serve one sequence on a CPU, so a lone channel gets llama.cpp's speed. Requests
that arrive while llama.cpp is busy join the transformers dynamic batch, which shares each
forward pass among many sequences; the two run side by side (llama.cpp releases the GIL), so a
crowd gets llama.cpp's sequence plus the batch's. Both load from the same GGUF file and use the
same tokenizer and chat template. The two paths quantise differently, so greedy text may differ
with the path a request took.
"""

from __future__ import annotations

from typing import Any

from engine.backends import llamacpp, llm
from engine.batching import SamplingParams, SequenceHandle
from engine.settings import ChatSettings, EngineSettings


class HybridBackend:
    """Routes each chat request to llama.cpp when it is free, else to the batcher."""

    fusion = "composed"

    def __init__(self, batched: llm.LLMBackend, single: llamacpp.LlamaCppBackend) -> None:
        self.batched = batched
        self.single = single
        self.role = batched.role
        self.tokenizer = batched.tokenizer
        self.context_tokens = min(batched.context_tokens, single.context_tokens)

    def prepare(self, messages: list[dict[str, Any]], images: list, audios: list) -> list[int]:
        """Token ids through the shared chat template."""
        return self.batched.prepare(messages, images, audios)

    def submit(self, prompt: list[int], params: SamplingParams) -> SequenceHandle:
        """llama.cpp when it is free, the dynamic batch otherwise."""
        if self.single.queue_depth() == 0:
            return self.single.submit(prompt, params)
        return self.batched.submit(prompt, params)

    def attach_metrics(self, metrics: Any) -> None:
        """Decode-step metrics come from the batcher."""
        self.batched.attach_metrics(metrics)

    def queue_depth(self) -> int:
        """Requests waiting or running on either path."""
        return self.single.queue_depth() + self.batched.queue_depth()

    def close(self) -> None:
        """Stop both paths."""
        self.single.close()
        self.batched.close()


def load(role: ChatSettings, settings: EngineSettings) -> HybridBackend:
    """Load the GGUF both ways (blocking; needs llama-cpp-python)."""
    single = llamacpp.load(role, settings)
    return HybridBackend(llm.load(role, settings), single)
