"""``tiny:diffusion``: a tiny random Stable Diffusion pipeline for tests (never a default: its pictures are noise).

No diffusion, VAE or CLIP weights are reachable offline, so this builds the real diffusers
classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler) at a
toy size with random weights and saves them with ``save_pretrained``. The engine then loads the
folder with ``from_pretrained`` exactly as it would load SD 1.5 from the hub, so every line of
the image path runs; only the pictures are noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

BUILD_VERSION = 2  # bump when the architecture below changes, to rebuild old caches
MARKER = "masque_tiny.json"
SEED = 0
MAX_TEXT_POSITIONS = 77
# A few merges so common words become single tokens; everything else falls back to bytes.
MERGES = ("t h", "th e</w>", "a n", "c a", "ca t</w>", "d o", "do g</w>", "a r", "ar t</w>")


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table: a printable character for each of the 256 bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_vocab(folder: Path) -> dict[str, int]:
    """Hand-made CLIP BPE files (vocab.json, merges.txt): every byte character with and without
    the end-of-word marker, the merged tokens, and CLIP's start/end tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", "utf-8")
    return vocab


def _components(vocab_dir: Path) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = write_clip_vocab(vocab_dir)
    torch.manual_seed(SEED)
    # Shaped like SD 1.5 where cost matters: the VAE scales by 8 with no attention in its mid
    # block, and the UNet attends only below full latent size, so OpenAI's sizes (256 to 1024)
    # paint in seconds on a CPU. Native size: 8 latent pixels x 8 = 64.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=32, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3, latent_channels=4,
        norm_num_groups=32, sample_size=64, mid_block_add_attention=False,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=MAX_TEXT_POSITIONS, projection_dim=32,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    ))
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=MAX_TEXT_POSITIONS)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def is_built(target: Path) -> bool:
    """True when ``target`` holds a complete pipeline of this builder's version."""
    marker = Path(target) / MARKER
    if not (marker.is_file() and (Path(target) / "model_index.json").is_file()):
        return False
    return json.loads(marker.read_text()).get("version") == BUILD_VERSION


def build(target: Path) -> Path:
    """Build the tiny pipeline into ``target`` once; later calls return it as is."""
    from diffusers import StableDiffusionPipeline

    target = Path(target)
    if is_built(target):
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        **_components(staging / "_vocab"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(staging)
    shutil.rmtree(staging / "_vocab")
    (staging / MARKER).write_text(json.dumps({"version": BUILD_VERSION, "seed": SEED}))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # a crash mid-build never leaves a half pipeline under `target`
    return target
