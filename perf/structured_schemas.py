"""A fixed set of JSON schemas for perf/structured_bench.py and the structured-output tests: nested objects,
arrays, enums, bounded numbers, required fields, patterns, unions. Every string and array is bounded
(maxLength, maxItems, enum, pattern), so even the random-weight tiny model, whose masked distribution is
nearly uniform, finishes each one within a few hundred tokens: the grammar does all the work."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "maxLength": 8}
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 99}, "y": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
     "required": ["id"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"const": "done"}, "code": {"type": "integer", "minimum": 100,
                                                                             "maximum": 599}},
     "required": ["status", "code"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "boolean"}}, "required": ["c"], "additionalProperties": False}}, "required": ["b"],
        "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "boolean"}]}},
     "required": ["value"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "size": {"enum": [1, 2, 3]},
                                      "note": {"type": ["string", "null"], "maxLength": 4}},
     "required": ["kind", "size", "note"], "additionalProperties": False},
    {"type": "boolean"},
    {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["p"], "additionalProperties": False},
    {"type": "null"},
    {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["x", "y"]}],
     "items": False},
    {"type": "object", "properties": {"first": NAME, "last": NAME}, "required": ["first"],
     "additionalProperties": False},
    {"type": "object", "properties": {"grid": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 1}}}},
     "required": ["grid"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
                                      "count": {"type": "integer", "minimum": 0, "maximum": 1000}},
     "required": ["date", "count"], "additionalProperties": False},
    {"type": "object", "$defs": {"leaf": {"type": "object", "properties": {"v": {"enum": [0, 1]}}, "required": ["v"],
                                          "additionalProperties": False}},
     "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
     "required": ["left", "right"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"name": NAME, "roles": {
        "type": "array", "items": {"enum": ["admin", "dev", "ops"]}, "minItems": 1, "maxItems": 2}},
        "required": ["name", "roles"], "additionalProperties": False}, "active": {"type": "boolean"}},
     "required": ["user", "active"], "additionalProperties": False},
]
