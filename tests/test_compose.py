"""docker-compose.yml and the Dockerfile: valid, and in step with the services in the repo.

The compose file must satisfy the Compose specification's JSON schema (kept in
../shared/schemas), every `python -m services.X` it runs must exist, and every service that
has an entry point must have a container (so a new service cannot be forgotten here).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"
INFRA = {"nats", "redis"}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the x- anchors and `<<` merges


def _service_module(service: dict) -> str | None:
    """X for a `python -m services.X ...` command, else None."""
    command = service.get("command")
    if not isinstance(command, list):
        return None
    for flag, module in itertools.pairwise(command):
        if flag == "-m" and module.startswith("services."):
            return module.removeprefix("services.")
    return None


def _xllm_services() -> dict[str, dict]:
    return {
        name: service
        for name, service in _compose()["services"].items()
        if _service_module(service) is not None
    }


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_compose_file_matches_the_compose_spec():
    if not SCHEMA.is_file():
        pytest.skip(f"the Compose JSON schema is not at {SCHEMA}")
    schema = json.loads(SCHEMA.read_text())
    # Its "$schema" is draft-07 spelled without the trailing '#', which jsonschema does not
    # recognize by name; say which draft explicitly.
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(_compose()), key=str)
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def test_the_cluster_is_complete():
    services = _compose()["services"]
    assert {"nats", "redis", "gateway", "scheduler", "prefill", "decode"} <= set(services)
    assert services["nats"]["image"].startswith("nats:2.10")
    assert "-js" in services["nats"]["command"]
    assert services["redis"]["image"].split(":")[0] in ("valkey/valkey", "redis")
    assert "8000:8000" in services["gateway"]["ports"]


@pytest.mark.parametrize("name", sorted(_xllm_services()))
def test_command_runs_an_existing_service(name):
    module = _service_module(_compose()["services"][name])
    entry = REPO / "services" / module / "__main__.py"
    assert entry.is_file(), (
        f"compose service {name!r} runs services.{module}, but {entry} is missing"
    )


def test_every_service_with_an_entry_point_has_a_container():
    runnable = {p.parent.name for p in (REPO / "services").glob("*/__main__.py")}
    in_compose = {_service_module(s) for s in _xllm_services().values()}
    assert runnable <= in_compose, f"add to docker-compose.yml: {sorted(runnable - in_compose)}"


@pytest.mark.parametrize("name", sorted(_xllm_services()))
def test_service_wiring(name):
    service = _compose()["services"][name]
    env = _environment(service)
    assert env["XLLM_NATS_URL"] == "nats://nats:4222"
    assert env["XLLM_REDIS_URL"] == "redis://redis:6379/0"
    assert env["XLLM_MODEL"].startswith("/models/")
    assert "./models:/models:ro" in service["volumes"]
    assert set(service["depends_on"]) >= INFRA
    assert service["build"] == "."
    assert service["command"][:2] == ["python", "-m"]


def test_decode_instances_take_the_expert_parallel_size():
    """The knob is an engine option's variable, off (1) unless set (each decode container
    is then one instance of that many rank processes)."""
    from xllm.config import EngineConfig, env_name

    assert "expert_parallel_size" in EngineConfig.__dataclass_fields__
    env = _environment(_compose()["services"]["decode"])
    assert env[env_name("expert_parallel_size")] == "${XLLM_EXPERT_PARALLEL_SIZE:-1}"


def test_dockerfile_pins_the_makefiles_torch():
    dockerfile = (REPO / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    [pinned] = re.findall(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M)
    [wanted] = re.findall(r"^TORCH_VERSION \?= (\S+)$", makefile, re.M)
    assert pinned == wanted
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert "download.pytorch.org/whl/cpu" in dockerfile
    assert "libibverbs1" in dockerfile
    assert '.[embedded,mooncake]"' in dockerfile
