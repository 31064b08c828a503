"""Subjects are '.'-separated tokens. Patterns add NATS wildcards: `*` is exactly one token, `>` is one
or more trailing tokens and may only be last. Every backend uses these rules (NATS natively)."""

from __future__ import annotations


def check_subject(subject: str) -> str:
    """A concrete subject to publish on: non-empty tokens, no wildcards, no whitespace."""
    tokens = subject.split(".")
    if not subject or any(not t or t in ("*", ">") or any(c.isspace() for c in t) for t in tokens):
        raise ValueError(f"invalid subject {subject!r}")
    return subject


def check_pattern(pattern: str) -> str:
    tokens = pattern.split(".")
    if not pattern or any(not t or any(c.isspace() for c in t) for t in tokens):
        raise ValueError(f"invalid subject pattern {pattern!r}")
    if any(t == ">" for t in tokens[:-1]) or any(t != "*" and "*" in t or t != ">" and ">" in t for t in tokens):
        raise ValueError(f"invalid subject pattern {pattern!r}: wildcards are whole tokens, '>' only last")
    return pattern


def matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def literal_prefix(pattern: str) -> str:
    """The longest literal prefix of a pattern (for prefix-filtering transports such as ZMQ SUB)."""
    out: list[str] = []
    for tok in pattern.split("."):
        if tok in ("*", ">"):
            return ".".join(out) + "." if out else ""
        out.append(tok)
    return ".".join(out)
