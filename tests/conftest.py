"""Fixtures shared by every test directory."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(arch, dtype="float32") -> Path`: the tiny random model of `arch` (seed 0),
    made on first use and shared by the whole session."""
    from xllm.cli.commands.make_model import make_model

    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, dtype: str = "float32") -> Path:
        if (arch, dtype) not in made:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-{dtype}")
            made[arch, dtype] = make_model(arch, "tiny", out, dtype=dtype)
        return made[arch, dtype]

    return get


@pytest.fixture(scope="session")
def loopy_model_dir(tmp_path_factory):
    """`loopy_model_dir(arch) -> Path`: the tiny float32 model of `arch` with near-uniform
    attention (QK gain 1; see make_model's notes), whose greedy output falls into loops —
    something for prompt-lookup speculation to copy. Made on first use."""
    import xllm.cli.commands.make_model as make_model

    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            saved, make_model.QK_GAIN = make_model.QK_GAIN, 1.0
            try:
                out = tmp_path_factory.mktemp(f"loopy-{arch}")
                made[arch] = make_model.make_model(arch, "tiny", out, dtype="float32")
            finally:
                make_model.QK_GAIN = saved
        return made[arch]

    return get


@pytest.fixture(scope="session")
def nats_url():
    """URL of a nats-server with JetStream, started on a free port for the session."""
    from xllm.cli.cluster.embedded import start_nats

    with start_nats() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_url():
    """URL (`redis://127.0.0.1:<port>/0`) of a Valkey server started for the session."""
    from xllm.cli.cluster.embedded import start_valkey

    with start_valkey() as server:
        yield server.url
