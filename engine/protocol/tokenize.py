"""Pydantic schemas of POST /tokenize and /detokenize, in vLLM's shapes.

vLLM serves these beside /v1, at the server root (vllm/entrypoints/serve/tokenize/api_router.py),
with the bodies of vllm/entrypoints/serve/tokenize/protocol.py: ``TokenizeCompletionRequest``
(``prompt``), ``TokenizeChatRequest`` (``messages``), ``TokenizeResponse`` and the detokenize pair.
Clients that count tokens against vLLM (our bot among them) work against us unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.protocol.chat import ChatMessage


class TokenizeCompletionRequest(BaseModel):
    """``{"model", "prompt", "add_special_tokens", "return_token_strs"}``: raw text."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # vLLM: absent means the served model
    prompt: str
    add_special_tokens: bool = True  # vLLM's default for raw text (BOS and the like)
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    """``{"model", "messages", "add_generation_prompt", ...}``: a chat, through the chat template."""

    model_config = ConfigDict(extra="ignore")  # tools, chat_template... are not ours to honour

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # vLLM's default: the template adds what the model needs
    return_token_strs: bool = False

    @model_validator(mode="before")
    @classmethod
    def _one_ending(cls, data: Any) -> Any:
        # vLLM's own check, on what the client sent (add_generation_prompt defaults to true)
        if isinstance(data, dict) and data.get("continue_final_message") and data.get(
            "add_generation_prompt"
        ):
            raise ValueError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        return data

    def uses_chat_defaults(self) -> bool:
        """True when the prompt is exactly the one the chat route would build."""
        return (
            self.add_generation_prompt
            and not self.continue_final_message
            and not self.add_special_tokens
        )


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


def tokenize_body(
    tokens: list[int], max_model_len: int, token_strs: list[str] | None
) -> dict[str, Any]:
    """vLLM's ``TokenizeResponse``."""
    return {
        "count": len(tokens),
        "max_model_len": max_model_len,
        "tokens": tokens,
        "token_strs": token_strs,
    }


class DetokenizeRequest(BaseModel):
    """``{"model", "tokens"}``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def detokenize_body(prompt: str) -> dict[str, str]:
    """vLLM's ``DetokenizeResponse``."""
    return {"prompt": prompt}
