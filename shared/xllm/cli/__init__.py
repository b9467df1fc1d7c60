"""The `xllm` command: one subcommand per tool, each registered by its own module.

A tool module exposes `add_parser(subparsers)`, which adds its subparser and sets
`func=callable(args) -> int | None` as the default; this file only wires them together.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

COMMANDS = ("bench", "generate", "jobs", "make-model", "up", "sim")
"""The subcommands, in the order `xllm --help` lists them."""


def _tool(command: str) -> ModuleType:
    """The module that registers `command`, imported only when it is run (or for --help):
    imports written out, so the layering test sees every edge."""
    match command:
        case "bench":
            from xllm.cli.commands import bench as tool
        case "generate":
            from xllm.cli.commands import generate as tool
        case "jobs":
            from xllm.cli.commands import jobs as tool
        case "make-model":
            from xllm.cli.commands import make_model as tool
        case "up":
            from xllm.cli.commands import up as tool
        case "sim":  # the simulator lives beside the scheduler whose policies it runs
            from services.scheduler.sim import tool
        case _:
            raise KeyError(command)
    return tool


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` alone when it is a known subcommand (so running one tool
    never imports the others, nor what they depend on), else of every tool (for --help)."""
    parser = argparse.ArgumentParser(prog="xllm", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    names = [command] if command in COMMANDS else list(COMMANDS)
    for name in names:
        _tool(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    args = build_parser(command).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
