"""The ``earlyprop`` command line: ``earlyprop <command> [options]``.

Each command is a module ``earlyprop.commands.<name>`` exposing ``add_parser(subparsers)`` and
``run(args) -> int``. Adding a command means writing that module and adding its name to
:data:`COMMANDS`. Command modules import torch and friends inside ``run`` so that
``earlyprop --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback
from collections.abc import Sequence

from earlyprop.dynamics import DivergenceError

PROG = "earlyprop"
COMMANDS: tuple[str, ...] = ("align", "bench", "train")

# Failures a user can cause and fix (bad option values, a missing file, a diverging relaxation):
# reported as one line and exit code 2 unless --debug asks for the traceback. DataError is a ValueError.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, DivergenceError, OSError)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a process killed by a closed pipe


class UsageError(Exception):
    """A command-line parsing error, raised instead of argparse's print-usage-and-exit."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors that :func:`main` reports, and negative numbers in e notation
    (``--beta -1e-6``) accepted as option values rather than mistaken for options."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse's own pattern (Python < 3.13) only knows -1 and -.5; a private attribute, so if it
        # ever disappears this assignment is merely unused
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Early inference in energy-based models approximates "
                            "back-propagation (Bengio & Fischer 2015): experiments and training.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        _command_module(name).add_parser(subparsers)
    for sub in subparsers.choices.values():
        # SUPPRESS so that a subcommand without --debug does not overwrite a top-level --debug
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show full tracebacks on errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (0 success, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # known even when parsing fails
    try:
        args = build_parser().parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        return int(_command_module(args.command).run(args) or 0)
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BrokenPipeError:  # e.g. `earlyprop align --json | head`: the reader left, nothing to report
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, *EXPECTED_ERRORS) as exc:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


def _command_module(name: str):
    return importlib.import_module(f"earlyprop.commands.{name}")


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _version() -> str:
    from earlyprop import __version__

    return __version__
