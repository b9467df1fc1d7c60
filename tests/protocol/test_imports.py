"""The protocol is the bottom layer: it imports nothing of ours outside itself, so the engine,
the instance and the services can all import it (and the engine its value types)."""

from __future__ import annotations

import ast
from pathlib import Path

import xllm.protocol

PROTOCOL = Path(xllm.protocol.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_protocol_imports_only_itself_of_ours():
    upward = {
        f"{path.name} imports {name}"
        for path in sorted(PROTOCOL.glob("*.py"))
        for name in _imported_modules(path)
        if name.split(".")[0] in ("xllm", "services") and not name.startswith("xllm.protocol")
    }
    assert upward == set()
