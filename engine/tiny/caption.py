"""A tiny random BLIP captioner (image -> text), saved like a real hub checkpoint.

Its captions are random tokens; it exercises the composed path's real loading and
``generate`` code exactly as a real captioner (e.g. Salesforce/blip-image-captioning-base) would.
"""

from __future__ import annotations

from pathlib import Path

from engine.tiny import build_once, fast_tokenizer, train_bpe

IMAGE_SIZE = 32
PATCH = 8
HIDDEN = 32
VOCAB = 300
SEED = 0


def _write(folder: Path) -> None:
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    specials = ["<|endoftext|>", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = fast_tokenizer(
        train_bpe(VOCAB, specials), bos_token="[CLS]", eos_token="[SEP]", sep_token="[SEP]",
        cls_token="[CLS]", mask_token="[MASK]", chat_template=None,
    )
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in specials}
    config = BlipConfig(
        vision_config={"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
                       "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": IMAGE_SIZE, "patch_size": PATCH},
        text_config={"vocab_size": len(tokenizer), "hidden_size": HIDDEN,
                     "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "encoder_hidden_size": HIDDEN,
                     "bos_token_id": ids["[CLS]"], "eos_token_id": ids["[SEP]"],
                     "sep_token_id": ids["[SEP]"], "pad_token_id": ids["<|endoftext|>"]},
    )
    torch.manual_seed(SEED)
    model = BlipForConditionalGeneration(config)
    model.generation_config.bos_token_id = ids["[CLS]"]
    model.generation_config.eos_token_id = ids["[SEP]"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build(target: Path) -> Path:
    """Build the tiny captioner into ``target`` once; return it."""
    return build_once(target, _write)
