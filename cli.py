"""Command line for the pack: ``python cli.py <subcommand> --help``.

Subcommands are declared here and implemented in the package; the package is reached through
``_bootstrap`` so that none of its folders is ever imported under a top-level name.
"""

import argparse
import sys

import _bootstrap


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python cli.py", description=__doc__.splitlines()[0])
    parser.add_subparsers(dest="command", required=True, metavar="<subcommand>")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _bootstrap.load()
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
