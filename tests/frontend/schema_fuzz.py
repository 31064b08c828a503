"""Hypothesis strategies for request bodies, generated from the JSON schema the frontend publishes
(`/openapi.json`): mostly valid values (integers biased to small ones so generations stay short), and
a share of wrong types, out-of-range integers (past 64 bits too) and deep nesting, since the point is
that nothing a client sends is a 5xx."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=8)


def _integer(schema: dict[str, Any]) -> st.SearchStrategy:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    near = st.integers(lo, lo + 40 if lo is not None and hi is not None and hi - lo > 40 else hi)
    wild = [st.integers(lo, hi)]
    if hi is not None:
        wild.append(st.integers(hi + 1, hi + 2**70))
    if lo is not None:
        wild.append(st.integers(lo - 2**70, lo - 1))
    return near | near | near | st.one_of(wild)


def _number(schema: dict[str, Any]) -> st.SearchStrategy:
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    inside = st.floats(lo, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema, allow_nan=False)
    return inside | inside | st.floats(allow_nan=False, allow_infinity=False) | st.just(1e-300)


def from_schema(schema: dict[str, Any], components: dict[str, Any],
                overrides: dict[str, st.SearchStrategy] | None = None, top: bool = True) -> st.SearchStrategy:
    """A strategy for values of `schema`; `overrides` replaces the strategy of top-level properties.
    Only the top-level object gets broken (a missing required field, a wrong type): nested ones stay
    well-formed so that some bodies pass validation whole."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: from_schema(components[name], components, top=False))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components, top=False) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "integer":
        return _integer(schema)
    if kind == "number":
        return _number(schema)
    if kind == "string":
        return st.text(max_size=24)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), components, top=False), max_size=5)
    if kind == "object" and "properties" in schema:
        return _object(schema, components, overrides or {}, top)
    if kind == "object":
        return st.dictionaries(st.text(max_size=6), JSON, max_size=3)
    return JSON


def _object(schema: dict[str, Any], components: dict[str, Any],
            overrides: dict[str, st.SearchStrategy], top: bool) -> st.SearchStrategy:
    props = schema["properties"]
    values = {k: overrides[k] if k in overrides else from_schema(v, components, top=False) for k, v in props.items()}
    required = set(schema.get("required", []))
    optional = sorted(set(props) - required)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        keys = [k for k in sorted(required) if not top or draw(st.integers(0, 19))]  # now and then one is missing
        keys += draw(st.lists(st.sampled_from(optional), max_size=4 if top else 1, unique=True)) if optional else []
        body = {k: draw(values[k]) for k in keys}
        if top and keys and not draw(st.integers(0, 7)):  # a wrong type in one field
            body[draw(st.sampled_from(keys))] = draw(JSON)
        return body

    return build()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth
