"""The worker contract (messages, endpoint names, error kinds, a typed client)."""
