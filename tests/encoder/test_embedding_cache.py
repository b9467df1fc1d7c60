"""The encoder's embedding cache: LRU within its byte budget, registered while readable,
and an evicted entry stays readable (registered, alive) through its grace period."""

from __future__ import annotations

import torch

from xllm.encoder.cache import EmbeddingCache


def rows(n: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((n, 4), value)  # n * 16 bytes


def make(capacity: int, grace: float = 10.0):
    registered: dict[int, torch.Tensor] = {}
    cache = EmbeddingCache(
        capacity,
        lambda t: registered.__setitem__(t.data_ptr(), t),
        lambda t: registered.pop(t.data_ptr()),
        grace=grace,
    )
    return cache, registered


def test_least_recently_used_goes_first_and_stays_registered_through_its_grace():
    cache, registered = make(capacity=64)  # two entries of 32 bytes
    a, b = cache.put(1, rows(2, 1.0)), cache.put(2, rows(2, 2.0))
    assert cache.get(1) is a  # 1 is now the most recent
    c = cache.put(3, rows(2, 3.0))
    assert cache.get(2) is None and cache.get(1) is a and cache.get(3) is c
    assert cache.nbytes == 64
    assert b.data_ptr() in registered  # a reader holding its ref still reads it
    cache.sweep(now=float("inf"))
    assert b.data_ptr() not in registered and a.data_ptr() in registered
    assert set(registered) == {a.data_ptr(), c.data_ptr()}


def test_an_entry_over_the_budget_is_kept_for_its_reader_until_the_next():
    cache, registered = make(capacity=16)
    big = cache.put(1, rows(4))
    assert cache.get(1) is big and big.data_ptr() in registered
    cache.put(2, rows(4))
    assert cache.get(1) is None and len(cache.entries) == 1


def test_no_cache_never_hits_but_keeps_the_entry_readable():
    cache, registered = make(capacity=0)
    t = cache.put(1, rows(2))
    assert cache.get(1) is None and t.data_ptr() in registered
