"""Builders of tiny random (and converted) models for tests and the offline preset.

Each builder module exposes ``build(target: Path) -> Path``: idempotent (a finished build is
marked and reused), atomic (built in a sibling temporary folder, then renamed) and loadable
with the ordinary ``from_pretrained`` calls, like any real model. The helpers here train the
tiny byte-level BPE tokenizers they share, locally, without any hub.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BUILT_MARKER = ".masque-built"
CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "A picture of a cat sitting on a mat. The audio is a short beep.",
    "Transcribe this audio. Describe this image. What do you hear and see?",
    "system user assistant You are a helpful assistant.",
)
CORPUS_REPEATS = 20
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<|vision_bos|><|IMAGE|><|vision_eos|>' }}"
    "{% elif part['type'] == 'audio' %}{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe(vocab_size: int, special_tokens: Iterable[str]) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on a small fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) * CORPUS_REPEATS, trainer=trainer)
    return tok


def fast_tokenizer(tok: Any, **kwargs: Any) -> Any:
    """Wrap a trained tokenizer as a transformers ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    options = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
               "unk_token": None, "chat_template": CHATML_TEMPLATE}
    options.update(kwargs)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **options)


def build_once(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(folder)`` unless ``target`` is already built; atomic, idempotent."""
    target = Path(target)
    if (target / BUILT_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        (staging / BUILT_MARKER).write_text("ok\n")
        if target.exists():  # a half-built leftover from an interrupted run
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
