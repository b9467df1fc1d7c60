"""The `xllm` command: one subcommand per tool, each registered by its own module.

A tool module exposes `add_parser(subparsers)`, which adds its subparser and sets
`func=callable(args) -> int | None` as the default; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand -> the module that registers it, in the order `xllm --help` lists them.
TOOL_MODULES = {
    "bench": "xllm.tools.bench",
    "generate": "xllm.tools.generate",
    "jobs": "xllm.tools.jobs",
    "make-model": "xllm.tools.make_model",
    "up": "xllm.tools.up",
    "sim": "services.scheduler.sim.tool",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` alone when it is a known subcommand (so running one tool
    never imports the others, nor what they depend on), else of every tool (for --help)."""
    parser = argparse.ArgumentParser(prog="xllm", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    names = [command] if command in TOOL_MODULES else list(TOOL_MODULES)
    for name in names:
        importlib.import_module(TOOL_MODULES[name]).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    args = build_parser(command).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
