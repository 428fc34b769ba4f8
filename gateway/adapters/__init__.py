"""Wire-format adapters: one module per API (the only sub-package, because this is where kgate grows).

``ROUTES`` maps each client-facing path (aiohttp route syntax) to its adapter.
"""

from __future__ import annotations

from gateway.adapters.anthropic_messages import AnthropicMessages
from gateway.adapters.base import Adapter, StreamMeter
from gateway.adapters.gemini import GeminiGenerateContent
from gateway.adapters.openai_chat import ChatCompletions
from gateway.adapters.openai_completions import Completions
from gateway.adapters.openai_responses import Responses
from gateway.adapters.sse import SSEEvent, SSEParser

ADAPTERS: dict[str, Adapter] = {
    a.api: a
    for a in (ChatCompletions(), Completions(), Responses(), AnthropicMessages(), GeminiGenerateContent())
}

ROUTES: dict[str, Adapter] = {
    "/v1/chat/completions": ADAPTERS["openai.chat"],
    "/v1/completions": ADAPTERS["openai.completions"],
    "/v1/responses": ADAPTERS["openai.responses"],
    "/v1/messages": ADAPTERS["anthropic.messages"],
    "/v1beta/models/{model}:generateContent": ADAPTERS["gemini"],
    "/v1beta/models/{model}:streamGenerateContent": ADAPTERS["gemini"],
}


def adapter_for_path(path: str) -> tuple[Adapter, dict[str, str]] | None:
    """The adapter for a concrete request path and its path parameters (None: not an API path)."""
    if path in ROUTES:
        return ROUTES[path], {}
    prefix = "/v1beta/models/"
    if path.startswith(prefix) and ":" in path[len(prefix):]:
        model, _, method = path[len(prefix):].rpartition(":")
        if model and method in ("generateContent", "streamGenerateContent"):
            return ADAPTERS["gemini"], {"model": model, "method": method}
    return None


__all__ = ["ADAPTERS", "ROUTES", "Adapter", "SSEEvent", "SSEParser", "StreamMeter", "adapter_for_path"]
