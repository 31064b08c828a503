"""The vLLM engine (`--engine vllm`): vLLM's AsyncLLM in the worker process behind `workers.protocol.Engine`.

Importing this package does not import vLLM; `engine.VllmEngine` does, when it starts. See README.md.
"""
