"""Fixtures the image e2e tests share: the tiny Qwen2-VL checkpoint (float32) and our
engine on it in this process (what every cluster topology must equal)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def vl_model_dir(tiny_model_dir):
    return tiny_model_dir("qwen2-vl", "float32")


@pytest.fixture(scope="session")
def vl_engine(vl_model_dir):
    from xllm.config import EngineConfig
    from xllm.engine.engine import Engine

    return Engine(EngineConfig(model=str(vl_model_dir), dtype="float32", num_kv_blocks=256))
