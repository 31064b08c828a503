"""vLLM users' spellings (issue 30): `--port`/`--host` for the HTTP listener and `kvrelay serve MODEL`
as `vllm serve MODEL`. kvrelay's own names stay the canonical ones (the worker's `--port`/`--host` are
its request-plane listener, so only the commands that run no worker flags of that name take them)."""

from __future__ import annotations

import argparse

from kvrelay.runtime.config import ConfigError

HTTP_ALIASES = {"--port": "--http-port", "--host": "--http-host"}


def add_http_aliases(parser: argparse.ArgumentParser) -> None:
    """`--port` and `--host` become other names of `--http-port` and `--http-host` (same dest, same
    help line, same env variable)."""
    for alias, flag in HTTP_ALIASES.items():
        action = parser._option_string_actions[flag]  # argparse has no public API to alias an option
        assert alias not in parser._option_string_actions, f"{alias} is taken in {parser.prog}"
        action.option_strings = [*action.option_strings, alias]
        parser._option_string_actions[alias] = action


def add_model_positional(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                        help="the model to serve, as `vllm serve MODEL`; the same as --model")


def apply_model_positional(args: argparse.Namespace) -> None:
    """MODEL given: it is `--model` (both given and different is an error)."""
    model = getattr(args, "model_positional", None)
    if model is None:
        return
    if args.model is not None and args.model != model:
        raise ConfigError(f"--model: given twice, as MODEL {model!r} and --model {args.model!r}")
    args.model = model
