"""The `xllm` command: one subcommand per tool, each registered by its own module.

A tool module exposes `add_parser(subparsers)`, which adds its subparser and sets
`func=callable(args) -> int | None` as the default; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that register a subcommand, in the order `xllm --help` lists them.
TOOL_MODULES = (
    "xllm.tools.bench",
    "xllm.tools.generate",
    "xllm.tools.make_model",
    "xllm.tools.up",
    "services.scheduler.sim.tool",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xllm", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in TOOL_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
