"""argparse with kvrelay's error contract: a bad flag or unknown subcommand prints one line and exits 2.

An unrecognized flag is reported by the (sub)command it was given to, with the closest flag that
command knows and a pointer to that command's `--help` (issue 30: `--port` got "see kvrelay --help").
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        parsed, extras = self.parse_known_args(argv, namespace)
        if extras:
            target = self.command_parser(argv)
            target.error(f"unrecognized arguments: {' '.join(extras)}{target.suggestion(extras)}")
        return parsed

    def command_parser(self, argv: list[str]) -> Parser:
        """The deepest (sub)command parser `argv` names (`kvrelay discovery list ...` -> its parser)."""
        parser: Parser = self
        for token in argv:
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if subs and token in subs[0].choices:
                parser = subs[0].choices[token]
        return parser

    def suggestion(self, extras: list[str]) -> str:
        flags = [f for f in self._option_string_actions if f.startswith("--")]
        hints = []
        for token in extras:
            name = token.split("=", 1)[0]
            if name.startswith("-"):
                close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
                if close:
                    hints.append(f"{name}: did you mean {close[0]}?")
        return f" ({'; '.join(hints)})" if hints else ""
