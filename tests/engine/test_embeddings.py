"""Embeddings: the real all-MiniLM-L6-v2 offline behind /v1/embeddings, via the openai client."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import numpy as np
import openai
import pytest

from engine.settings import EngineSettings

MODEL = "text-embedding-3-small"  # an OpenAI name the server answers to
QUERY = "The knight rode his horse into the castle."
PARAPHRASE = "A soldier on horseback entered the fortress."
UNRELATED = "I like to bake chocolate cookies on Sundays."


def vectors(result: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    """The response's vectors as rows, in index order (base64 strings decoded as OpenAI's
    little-endian float32 bytes)."""
    ordered = sorted(result.data, key=lambda item: item.index)
    rows = [
        np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
        if isinstance(item.embedding, str) else item.embedding
        for item in ordered
    ]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_paraphrase_ranks_above_unrelated(openai_client: openai.OpenAI,
                                          encoding_format: str) -> None:
    # "float" gets JSON numbers; an explicit "base64" comes back as the raw strings.
    result = openai_client.embeddings.create(
        model=MODEL, input=[QUERY, PARAPHRASE, UNRELATED], encoding_format=encoding_format
    )
    matrix = vectors(result)
    assert matrix.shape == (3, 384)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)
    paraphrase, unrelated = matrix[0] @ matrix[1], matrix[0] @ matrix[2]
    assert paraphrase > unrelated + 0.2, (paraphrase, unrelated)
    assert result.model == MODEL and result.object == "list"


def test_default_client_call_and_usage(openai_client: openai.OpenAI) -> None:
    # Given no encoding_format, the client asks for base64 and decodes it to floats itself.
    single = openai_client.embeddings.create(model=MODEL, input=QUERY)
    assert len(single.data) == 1 and len(single.data[0].embedding) == 384
    # MiniLM's WordPiece: [CLS] + words and the full stop + [SEP].
    assert single.usage.prompt_tokens == single.usage.total_tokens == 11
    batch = openai_client.embeddings.create(model=MODEL, input=[UNRELATED, QUERY])
    assert np.allclose(vectors(batch)[1], vectors(single)[0], atol=1e-5)  # order kept
    assert batch.usage.prompt_tokens > single.usage.prompt_tokens


async def test_async_client_concurrent_requests(async_openai_client: openai.AsyncOpenAI) -> None:
    texts = [QUERY, PARAPHRASE, UNRELATED]
    singles = await asyncio.gather(
        *(async_openai_client.embeddings.create(model=MODEL, input=text) for text in texts)
    )
    batch = await async_openai_client.embeddings.create(model=MODEL, input=texts)
    together = np.vstack([vectors(single) for single in singles])
    assert np.allclose(together, vectors(batch), atol=1e-4)  # batching changes nothing


async def post_json(url: str, body: dict) -> tuple[int, dict]:
    """POST a JSON body; the status and the decoded answer."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/embeddings", json=body) as response:
            return response.status, await response.json(content_type=None)


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": MODEL, "input": ""}, 400, "input", "invalid_value"),
        ({"model": MODEL, "input": []}, 400, "input", "invalid_value"),
        ({"model": MODEL, "input": ["fine", "  "]}, 400, "input", "invalid_value"),
        ({"model": MODEL, "input": [101, 2023, 102]}, 400, "input", "invalid_value"),
        ({"model": MODEL}, 400, "input", "missing_required_parameter"),
        ({"input": "hello"}, 400, "model", "missing_required_parameter"),
        ({"model": "no-such-embedder", "input": "hello"}, 404, "model", "model_not_found"),
        ({"model": MODEL, "input": "hello", "dimensions": 64}, 400, "dimensions",
         "unsupported_value"),
        ({"model": MODEL, "input": "hello", "encoding_format": "int8"}, 400,
         "encoding_format", "invalid_value"),
        ({"model": MODEL, "input": "word " * 400}, 400, "input", "context_length_exceeded"),
    ],
)
async def test_embeddings_bad_input(engine_url: str, body: dict, status: int, param: str,
                                    code: str) -> None:
    got, answer = await post_json(engine_url, body)
    assert got == status, answer
    error = answer["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


async def test_too_many_inputs(engine_url: str, engine_settings: EngineSettings) -> None:
    texts = ["a short line"] * (engine_settings.embeddings.max_inputs + 1)
    got, answer = await post_json(engine_url, {"model": MODEL, "input": texts})
    assert got == 400
    assert answer["error"]["code"] == "too_many_inputs"


def test_bad_input_through_the_client(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.embeddings.create(model=MODEL, input="")
    assert info.value.body["param"] == "input"
