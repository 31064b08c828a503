"""What the conformance suite (test_vllm_conformance.py) compares between two OpenAI servers' replies:
the shape of a body (its keys and value types, recursively; the ids, timestamps and vLLM's own
additions left out) and, for a streamed reply, the whole it assembles to."""

from __future__ import annotations

import json
from typing import Any

# Values that differ between any two servers (ids, clocks) or a server's build.
VOLATILE = frozenset({"id", "created", "created_at", "system_fingerprint"})
# Fields vLLM adds that OpenAI's API does not define: kvrelay need not have them.
VLLM_ONLY = frozenset({"stop_reason", "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
                       "ec_transfer_params", "reasoning_content", "reasoning", "token_ids", "routed_experts",
                       "metrics", "created_cache_tokens", "multimodal_tokens"})


def shape(value: Any, path: str = "") -> dict[str, set[str]]:
    """Each key path of a body (list elements as `[]`) -> the JSON types found there. A stream's shape is
    the union of its chunks' (how a server splits text into chunks is not its shape)."""
    if isinstance(value, list) and path == "" and value and isinstance(value[0], dict) and "object" in value[0]:
        out: dict[str, set[str]] = {}
        for chunk in value:
            for k, v in shape(chunk).items():
                out.setdefault(k, set()).update(v)
        return out
    if isinstance(value, dict):
        out = {path or ".": {"object"}}
        for k, v in value.items():
            if k not in VOLATILE | VLLM_ONLY:
                for p, t in shape(v, f"{path}.{k}").items():
                    out.setdefault(p, set()).update(t)
        return out
    if isinstance(value, list):
        out = {path: {"array"}}
        for v in value:
            for p, t in shape(v, f"{path}[]").items():
                out.setdefault(p, set()).update(t)
        return out
    if value is None:
        return {path: {"null"}}
    if isinstance(value, bool):
        return {path: {"boolean"}}
    if isinstance(value, (int, float)):
        return {path: {"number"}}
    if isinstance(value, str):
        return {path: {"string"}}
    raise TypeError(type(value))


def shape_diff(a: dict[str, set[str]], b: dict[str, set[str]]) -> list[str]:
    """Every key path whose types differ between shapes `a` and `b`, as 'path: a | b'."""
    return [f"{p}: {'|'.join(sorted(a.get(p, {'absent'})))} | {'|'.join(sorted(b.get(p, {'absent'})))}"
            for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]


def parse_sse(text: str) -> list[dict]:
    """The JSON events of an SSE body, `[DONE]` checked and dropped."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-500:]
    return [json.loads(e) for e in events[:-1]]


def assemble(chunks: list[dict]) -> dict:
    """A stream's choices joined per index (text, tool calls, logprobs, finish reason), and its usage."""
    choices: dict[int, dict] = {}
    usage = None
    for ch in chunks:
        usage = ch.get("usage") or usage
        for c in ch.get("choices", []):
            acc = choices.setdefault(c["index"], {"text": "", "tool_calls": {}, "logprobs": [], "finish": None})
            delta = c.get("delta", {})
            acc["text"] += delta.get("content") or c.get("text") or ""
            for call in delta.get("tool_calls") or []:
                slot = acc["tool_calls"].setdefault(call["index"], {"name": "", "arguments": ""})
                fn = call.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            lp = c.get("logprobs")
            if lp:
                acc["logprobs"] += lp.get("content") or [{"token": t, "logprob": p} for t, p in
                                                         zip(lp.get("tokens", []), lp.get("token_logprobs", []), strict=True)]
            acc["finish"] = c.get("finish_reason") or acc["finish"]
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}
