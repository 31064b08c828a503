"""`kvrelay`: one console script, one subcommand per capability.

Each subcommand lives in its own module exposing `register(subparsers)`; the handler it sets as
`func` returns an exit status. Config errors exit 2 with one line naming the flag.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from kvrelay.cli import (
    bench_cmd,
    cache_cmd,
    frontend_cmd,
    model_cmd,
    planner_cmd,
    runtime_cmds,
    serve_cmd,
    worker_cmd,
)
from kvrelay.cli.parser import Parser
from kvrelay.runtime.config import ConfigError
from kvrelay.runtime.spawn import die_with_parent

COMMANDS = (serve_cmd, frontend_cmd, runtime_cmds, model_cmd, worker_cmd, bench_cmd, planner_cmd, cache_cmd)


def kvrelay_version() -> str:
    try:
        return version("kvrelay")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def build_parser() -> Parser:
    parser = Parser(prog="kvrelay", description="Disaggregated prefill/decode LLM serving.")
    parser.add_argument("--version", action="version", version=f"kvrelay {kvrelay_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # a child of `kvrelay serve`/`frontend` (runtime/fleet.py): not one moment without its parent
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        sys.stderr.write(f"kvrelay {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
