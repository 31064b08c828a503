"""Why vLLM did not start, in one line.

vLLM builds its config in this process (a bad model path or flag fails here, with vLLM's message) but
allocates the KV cache in its engine-core process (spawned), which only logs the real reason ("... KV
cache is needed, which is larger than the available KV cache memory ...") and lets this process see
"Engine core initialization failed. See root cause above". So vLLM's logging is configured
(`VLLM_LOGGING_CONFIG_PATH`, read by every vLLM process at import) with its usual stream handler plus
one that appends ERROR records to a file; the last exception line found there is the reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")


class EngineStartError(RuntimeError):
    """vLLM could not start; the message is its reason, one line."""


class StartErrorLog:
    def __init__(self, directory: Path):
        self.path = directory / "vllm-errors.log"
        self.config_path = directory / "vllm-logging.json"

    def env(self, level: str = "INFO", stream: str = "ext://sys.stderr") -> dict[str, str]:
        """Environment for vLLM: its default console logging (to `stream`) plus the error file."""
        fmt = "(%(processName)s pid=%(process)d) %(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
        config = {
            "version": 1, "disable_existing_loggers": False,
            "formatters": {"vllm": {"format": fmt, "datefmt": "%m-%d %H:%M:%S"}, "plain": {"format": "%(message)s"}},
            "handlers": {
                "console": {"class": "logging.StreamHandler", "formatter": "vllm", "level": level, "stream": stream},
                "errors": {"class": "logging.FileHandler", "formatter": "plain", "level": "ERROR",
                           "filename": str(self.path), "delay": True},
            },
            "loggers": {"vllm": {"handlers": ["console", "errors"], "level": level, "propagate": False}},
        }
        self.config_path.write_text(json.dumps(config))
        return {"VLLM_LOGGING_CONFIG_PATH": str(self.config_path)}

    def reason(self, e: BaseException) -> str:
        """The root cause: the last exception line the engine processes logged, else `e` itself."""
        found = None
        if self.path.is_file():
            for line in self.path.read_text(errors="replace").splitlines():
                m = _EXC_LINE.match(line.strip())
                if m:
                    found = f"{m.group(1)}: {m.group(2)}"
        own = one_line(str(e)) or type(e).__name__
        if found and "initialization failed" in own.lower():
            return f"vLLM failed to start: {found}"
        return f"vLLM failed to start: {type(e).__name__}: {own}"


_MAX_CHARS = 400


def one_line(message: str) -> str:
    """A multi-line message (pydantic's "1 validation error for ModelConfig / Value error, ...") as one
    line: its informative lines joined, bounded."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if len(lines) > 1 and re.match(r"\d+ validation errors? for ", lines[0]):
        lines = lines[1:]
    text = "; ".join(lines)
    return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS - 3] + "..."


def model_shape(model_dir: str, dtype: str) -> tuple[int, int, int, int]:
    """(layers, kv heads, head dim, KV bytes per element) from config.json, to size the default KV pool."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise EngineStartError(f"vLLM failed to start: no config.json in {model_dir}")
    c = json.loads(path.read_text())
    heads = c.get("num_attention_heads", 1)
    head_dim = c.get("head_dim") or c.get("hidden_size", 0) // max(1, heads)
    kv_heads = c.get("num_key_value_heads", heads)
    torch_dtype = dtype if dtype != "auto" else str(c.get("torch_dtype") or c.get("dtype") or "bfloat16")
    return c.get("num_hidden_layers", 1), kv_heads, head_dim, 4 if "32" in torch_dtype else 2
