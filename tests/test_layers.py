"""The code is layered, and no module imports from a layer above its own.

    tooling    xllm.cli (the `xllm` command, bench, cluster), services.scheduler.sim
    services   services.gateway, .scheduler, .kvstore, .prefill, .decode, .encoder
    programs   xllm.instance (an engine behind NATS), xllm.llm (an engine in-process)
    runtime    xllm.kv_transfer, xllm.service (a service's NATS lifecycle)
    engine     xllm.engine
    model      xllm.models, xllm.ops, xllm.tokenizer
    base       xllm.protocol, xllm.config, xllm.platform

A request's path reads upward through them: HTTP → services.gateway → services.scheduler →
an instance (xllm.instance) → the engine → the model, and the tokens back, every hop a
protocol message. Services never import one another: what two of them need lives in
`shared/xllm`. Imports inside functions count too (a lazy import is still an edge).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("base", ("xllm.protocol", "xllm.config", "xllm.platform", "xllm")),
    ("model", ("xllm.models", "xllm.ops", "xllm.tokenizer")),
    ("engine", ("xllm.engine",)),
    ("runtime", ("xllm.kv_transfer", "xllm.service", "xllm.encoder")),
    ("programs", ("xllm.instance", "xllm.llm")),
    ("services", ("services",)),
    ("tooling", ("xllm.cli", "services.scheduler.sim")),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest package prefix of `module`."""
    best, best_len = -1, -1
    for index, (_, packages) in enumerate(LAYERS):
        for package in packages:
            matches = module == package or module.startswith(package + ".")
            if matches and len(package) > best_len:
                best, best_len = index, len(package)
    return best


def service_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "services" and len(parts) > 1 else None


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT / "shared" if path.is_relative_to(ROOT / "shared") else ROOT)
    parts = list(relative.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Our modules `path` imports, anywhere in it (absolute imports only: we use no other)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {n for n in names if n.split(".")[0] in ("xllm", "services")}


SOURCES = sorted([*(ROOT / "shared" / "xllm").rglob("*.py"), *(ROOT / "services").rglob("*.py")])


def upward_edges(module: str, imported: set[str]) -> list[str]:
    """The imports of `module` that break the layering."""
    own = layer_of(module)
    edges = []
    for target in sorted(imported):
        layer = layer_of(target)
        if layer > own:
            edges.append(f"{module} ({LAYERS[own][0]}) imports {target} ({LAYERS[layer][0]})")
        elif (
            LAYERS[own][0] == "services"
            and LAYERS[layer][0] == "services"
            and service_of(target) != service_of(module)
        ):
            edges.append(f"{module} imports another service's {target}")
    return edges


def test_every_module_has_a_layer():
    assert [p for p in SOURCES if layer_of(module_name(p)) < 0] == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_from_a_layer_above(path):
    assert upward_edges(module_name(path), imports(path)) == []


def test_the_rule_catches_what_it_should():
    assert module_name(ROOT / "shared" / "xllm" / "engine" / "engine.py") == "xllm.engine.engine"
    assert upward_edges("xllm.engine.engine", {"xllm.instance.instance"}) != []
    assert upward_edges("xllm.protocol.types", {"xllm.engine.sequence"}) != []
    assert upward_edges("services.scheduler.placement", {"services.scheduler.sim.run"}) != []
    assert upward_edges("services.gateway.app", {"services.scheduler.cluster"}) != []
    assert upward_edges("services.scheduler.sim.run", {"xllm.cli.bench.traces"}) == []
    assert upward_edges("xllm.engine.engine", {"xllm.protocol.types", "xllm.ops"}) == []
