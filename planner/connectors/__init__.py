"""Connectors: how a decision (desired worker counts per pool) becomes workers (one protocol, base.py)."""
