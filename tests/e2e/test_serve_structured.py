"""Structured outputs through `kvrelay serve` (tiny model, native engine) with the official `openai`
client: `beta.chat.completions.parse` with a pydantic model, vLLM's fields on completions, streaming,
and bad constraints answered 400 naming the field (never a 5xx)."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import pydantic
import pytest

MODEL = "kvrelay-tiny"


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=30)
    kind: Literal["cat", "dog", "fish"]
    vaccinated: bool




def test_openai_parse_with_a_pydantic_model(client):
    for seed in range(3):
        done = client.beta.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "Describe a pet."}], response_format=Pet,
            temperature=1.0, seed=seed, max_tokens=300)
        choice = done.choices[0]
        assert choice.finish_reason == "stop"
        pet = choice.message.parsed
        assert isinstance(pet, Pet) and len(pet.name) <= 8 and 0 <= pet.age <= 30


def test_vllm_fields_on_completions_and_streaming(client):
    regex = r"[a-z]{2,5}-[0-9]{2}"
    for body in ({"guided_regex": regex}, {"structured_outputs": {"regex": regex}}):
        out = client.completions.create(model=MODEL, prompt="Code:", max_tokens=40, temperature=1.0, seed=3,
                                        extra_body=body)
        assert re.fullmatch(regex, out.choices[0].text) and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=40, temperature=1.0,
                                    extra_body={"guided_choice": ["left", "right"]})
    assert out.choices[0].text in ("left", "right")
    schema = Pet.model_json_schema()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A pet?"}], max_tokens=300, temperature=1.0, seed=7,
        stream=True, response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Pet.model_validate(json.loads(text))


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
    ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}}, "guided_json"),
])
def test_bad_constraints_are_400_naming_the_field(served, body, param):
    r = httpx.post(f"{served.base_url}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
