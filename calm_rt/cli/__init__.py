"""The ``calm-rt`` command line (also ``python -m calm_rt``).

Each subcommand is a function ``_cmd_<name>(args) -> int`` registered in
:data:`calm_rt.cli._registry.COMMANDS` with its parser. Errors that the user can fix are
:class:`~calm_rt.errors.CalmError`: printed as one line, exit status 1.
A feature missing on this install (the GUI without napari, say) raises
:class:`~calm_rt.errors.NotAvailableError`: exit status 69 (EX_UNAVAILABLE),
so scripts can tell it apart.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from calm_rt import __version__
from calm_rt.cli import data, live, model  # noqa: F401  (registers the commands)
from calm_rt.cli._registry import COMMANDS
from calm_rt.errors import CalmError, NotAvailableError

__all__ = ["EXIT_ERROR", "EXIT_UNAVAILABLE", "build_parser", "main"]

EXIT_ERROR = 1
EXIT_UNAVAILABLE = 69


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calm-rt",
        description="Run the CalM calcium-imaging foundation model live at the microscope.",
        epilog="Run `calm-rt COMMAND --help` for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"calm-rt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, example, setup, handler) in sorted(COMMANDS.items()):
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=textwrap.dedent(f"example:\n  {example}"),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        setup(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except NotAvailableError as exc:
        print(f"calm-rt {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except CalmError as exc:
        print(f"calm-rt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"calm-rt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
