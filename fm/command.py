"""How one parsed command runs, for `fm` and for a step run on its own (``python -m data_prep.convert``): logging,
then the command, whose bad input ends in one line naming the field and exit code 2 (``-v``: the traceback).

    python -m data_prep.validate corpus/          # the same as `fm prep validate corpus/`

Every subcommand registers itself with an ``add_parser(subparsers)`` that sets ``func``; :func:`run_step` builds
that one subcommand's parser alone, so a step module run as ``__main__`` is not imported a second time through
fm.cli.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence


def run(args: argparse.Namespace, prog: str = "fm") -> int:
    """Set up logging (debug with ``args.verbose``) and call ``args.func(args)``; return its exit code."""
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        # bad input (a field, file or gene named in the message): one clear line, not a traceback; -v shows it
        if verbose:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def run_step(add_parser: Callable[[argparse._SubParsersAction], argparse.ArgumentParser], prog: str,
             argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) with the one subcommand ``add_parser`` registers, and :func:`run` it."""
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    parser.prog = prog
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return run(parser.parse_args(sys.argv[1:] if argv is None else list(argv)), prog)
