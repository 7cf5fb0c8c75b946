"""A tiny random Qwen2.5-Omni thinker (text + image + audio -> text).

The real class, saved and loaded through ``from_pretrained``; only the sizes are tiny and the
weights random. The tokenizer, the image processor and the audio feature extractor are saved
in ``tokenizer``-root / ``image_processor/`` / ``feature_extractor/`` so the hand-written
processor of :mod:`engine.backends.omni` can load them without torchvision; with torchvision
the full ``Qwen2_5OmniProcessor`` is saved at the root as well.
"""

from __future__ import annotations

from pathlib import Path

from engine.tiny import CHATML_TEMPLATE, build_once, fast_tokenizer, train_bpe

SPECIALS = {
    "pad": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "audio_token": "<|AUDIO|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}
HIDDEN = 64
VOCAB = 320
MEL_BINS = 128  # like the real model
IMAGE_KW = {"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, "patch_size": 14,
            "temporal_patch_size": 2, "merge_size": 2}
SEED = 0


def _tokenizer():  # noqa: ANN202 - a transformers tokenizer
    named = {key: value for key, value in SPECIALS.items() if key.endswith("_token")}
    # any kwarg ending in _token becomes a named special token with an *_id attribute
    return fast_tokenizer(train_bpe(VOCAB, SPECIALS.values()), chat_template=CHATML_TEMPLATE,
                          padding_side="left", **named)


def _config(tokenizer, ids: dict[str, int]):  # noqa: ANN001, ANN202
    from transformers import Qwen2_5OmniThinkerConfig

    return Qwen2_5OmniThinkerConfig(
        audio_config={"num_mel_bins": MEL_BINS, "encoder_layers": 1, "encoder_attention_heads": 2,
                      "encoder_ffn_dim": 32, "d_model": 16, "output_dim": HIDDEN, "n_window": 100,
                      "max_source_positions": 1500},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 112, "out_hidden_size": HIDDEN, "fullatt_block_indexes": [0]},
        text_config={"vocab_size": len(tokenizer), "hidden_size": HIDDEN, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": [2, 3, 3]},
                     "eos_token_id": ids["im_end"], "pad_token_id": ids["pad"]},
        audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
        video_token_index=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"], vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
    )


def _write(folder: Path) -> None:
    import torch
    from transformers import (
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        WhisperFeatureExtractor,
    )
    from transformers.utils import is_torchvision_available

    tokenizer = _tokenizer()
    ids = {key: tokenizer.convert_tokens_to_ids(value) for key, value in SPECIALS.items()}
    feature_extractor = WhisperFeatureExtractor(feature_size=MEL_BINS)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(**IMAGE_KW).save_pretrained(folder / "image_processor")
    feature_extractor.save_pretrained(folder / "feature_extractor")
    if is_torchvision_available():  # the real processor needs torchvision's video processor
        from transformers import (
            Qwen2_5OmniProcessor,
            Qwen2VLImageProcessor,
            Qwen2VLVideoProcessor,
        )

        Qwen2_5OmniProcessor(
            image_processor=Qwen2VLImageProcessor(**IMAGE_KW),
            video_processor=Qwen2VLVideoProcessor(**IMAGE_KW),
            feature_extractor=feature_extractor, tokenizer=tokenizer,
            chat_template=CHATML_TEMPLATE,
        ).save_pretrained(folder)
    torch.manual_seed(SEED)
    model = Qwen2_5OmniThinkerForConditionalGeneration(_config(tokenizer, ids))
    model.generation_config.eos_token_id = ids["im_end"]
    model.generation_config.pad_token_id = ids["pad"]
    model.save_pretrained(folder)


def build(target: Path) -> Path:
    """Build the tiny omni thinker into ``target`` once; return it."""
    return build_once(target, _write)
