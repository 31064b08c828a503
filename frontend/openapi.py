"""The OpenAPI 3.1 document of the API the frontend serves (`GET /openapi.json`).

Request schemas are generated from the msgspec Structs that decode the bodies (`openai_schema.py`), so
the document cannot drift from what the server accepts: a body valid against it is decoded, anything
else is a 400 with OpenAI's error JSON. Response bodies are described by their envelope only (their
exact shape is pinned by tests against the `openai` client's types).
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvrelay.frontend.openai_schema import ChatCompletionRequest, CompletionRequest
from kvrelay.frontend.responses_api_request import ResponsesRequest

_REF = "#/components/schemas/{name}"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}

_ERRORS = {str(s): {"description": d, "content": {"application/json": {"schema": {"$ref": _REF.format(name="Error")}}}}
           for s, d in ((400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                        (413, "body too large"), (503, "no worker can serve the model now"))}


def _generate(request: str, response: str, stream: str = "chunks ending in `data: [DONE]`") -> dict[str, Any]:
    body = {"content": {"application/json": {"schema": {"$ref": _REF.format(name=request)}}}, "required": True}
    ok = {"description": f"a {response} object, or with stream=true a text/event-stream of {stream}",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "text/event-stream": {"schema": {"type": "string"}}}}
    return {"post": {"operationId": request, "requestBody": body, "responses": {"200": ok, **_ERRORS}}}


def _get(op: str, description: str, status: tuple[str, ...] = ()) -> dict[str, Any]:
    responses = {"200": {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}}
    responses.update({s: _ERRORS[s] if s in _ERRORS else {"description": "not ready"} for s in status})
    return {"get": {"operationId": op, "responses": responses}}


def openapi_document(version: str) -> dict[str, Any]:
    (chat, completion, responses), components = msgspec.json.schema_components(
        [ChatCompletionRequest, CompletionRequest, ResponsesRequest], ref_template=_REF)
    assert chat["$ref"].endswith("ChatCompletionRequest") and completion["$ref"].endswith("CompletionRequest")
    assert responses["$ref"].endswith("ResponsesRequest")
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvrelay OpenAI-compatible API", "version": version},
        "paths": {
            "/v1/chat/completions": _generate("ChatCompletionRequest", "chat.completion"),
            "/v1/completions": _generate("CompletionRequest", "text_completion"),
            "/v1/responses": _generate("ResponsesRequest", "response",
                                       "Responses events (`event: response.created` ... `response.completed`)"),
            "/v1/models": _get("listModels", "the served models", ("401",)),
            "/health": _get("health", "the process is up"),
            "/ready": _get("ready", "a request for every served model would be routed now", ("503",)),
        },
        "components": {"schemas": {**components, "Error": ERROR_SCHEMA}},
    }
