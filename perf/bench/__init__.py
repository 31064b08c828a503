"""`kvrelay bench`: an async load generator and report for any OpenAI-compatible endpoint.

config (what a run does) -> workloads (requests as token ids) -> tokens (request bodies) ->
arrivals (when) -> runner (warm-up, measured run, progress) -> client (one timed SSE stream) ->
metrics (summary, goodput) -> report (JSON, Markdown, PNG) ; compare (two runs side by side).
"""
