"""A fresh key prefix per test, so tests sharing the session's Valkey never see each other."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def key_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"
