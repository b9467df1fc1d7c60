"""Fixtures for the gateway tests: the tiny model's tokenizer (`nats_url`, a real nats-server,
comes from tests/conftest.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def model_info(model_dir):
    from services.gateway.model import ModelInfo

    return ModelInfo.load(str(model_dir), served_name="tiny")
