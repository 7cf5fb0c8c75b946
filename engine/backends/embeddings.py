"""Text embeddings with sentence-transformers (all-MiniLM-L6-v2 offline).

Vectors are L2-normalised, as OpenAI's are, so a dot product is the cosine similarity the bot
uses to find earlier scenes close to a new one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.backends import digests, pick_device


class InputTooLong(ValueError):
    """An input has more tokens than the model's window (and truncation is off)."""

    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(f"input[{index}] is longer than this model's {limit} token window")
        self.index = index
        self.tokens = tokens
        self.limit = limit


class SentenceEmbeddings:
    """A sentence-transformers model with token counting for ``usage``."""

    name = "sentence-transformers"

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 32,
                 truncate: bool = False, cache_folder: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model, device=device, cache_folder=cache_folder)
        self.batch_size = batch_size
        self.truncate = truncate
        get_dim = getattr(self.model, "get_embedding_dimension", None) or (
            self.model.get_sentence_embedding_dimension  # sentence-transformers < 5.2
        )
        self.dimensions = int(get_dim())
        self.max_tokens = int(self.model.max_seq_length)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text, special tokens included, capped at one past the model's window
        (enough to tell "too long" apart without tokenizing a whole novel)."""
        encoded = self.model.tokenizer(
            texts, add_special_tokens=True, truncation=True, max_length=self.max_tokens + 1
        )
        return [len(ids) for ids in encoded["input_ids"]]

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Unit-length vectors, one per text, in order."""
        vectors, _ = self.embed_with_usage(texts)
        return vectors

    def embed_with_usage(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Vectors and the number of tokens read (for OpenAI's ``usage``).

        Raises :class:`InputTooLong` when an input exceeds the model's window and
        truncation is off: silently embedding half a text would mislead the caller.
        """
        counts = self.count_tokens(texts)
        if not self.truncate:
            for index, count in enumerate(counts):
                if count > self.max_tokens:
                    raise InputTooLong(index, count, self.max_tokens)
        matrix = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        used = sum(min(count, self.max_tokens) for count in counts)
        return matrix.astype("float32").tolist(), used


def load(role_settings: Any, settings: Any) -> SentenceEmbeddings:
    """Load the embedding model (blocking; the registry runs it in a thread)."""
    digests.verify(Path(role_settings.model) / "model.safetensors")
    return SentenceEmbeddings(
        role_settings.model,
        device=pick_device(role_settings.device).type,
        batch_size=role_settings.batch_size,
        truncate=role_settings.truncate,
        cache_folder=str(settings.cache_dir / "hub"),
    )
