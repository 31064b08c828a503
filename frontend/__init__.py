"""The OpenAI-compatible frontend: HTTP API, tokenization, chat templates, detokenization, routing."""
