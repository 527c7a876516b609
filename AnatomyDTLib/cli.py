"""The ``anatomydt`` command line.

Each sub-command lives in its own module in :mod:`AnatomyDTLib.commands` and is found there
automatically. A command module defines::

    NAME = "simulate"                       # the sub-command
    HELP = "one line for --help"
    def add_arguments(parser): ...           # argparse options
    def run(args) -> int: ...                # exit code

Errors caused by the user's input (:class:`~AnatomyDTLib.errors.AnatomyDTError`) are printed as
one clear message with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import __version__
from . import commands as _commands_pkg
from .errors import AnatomyDTError, Cancelled

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130


def _command_modules():
    """Every module in AnatomyDTLib.commands that defines a sub-command, sorted by name."""
    found = []
    for info in pkgutil.iter_modules(_commands_pkg.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_commands_pkg.__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            found.append(module)
    return sorted(found, key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anatomydt",
        description="AnatomyDT: predict future brain-tumour anatomy under treatment (Anatomy-DT cross-diffusion PDE).",
    )
    parser.add_argument("--version", action="version", version=f"anatomydt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except Cancelled as exc:
        print(f"anatomydt: cancelled: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except AnatomyDTError as exc:
        print(f"anatomydt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
