"""Chained block hashes: the identity of a block of KV by the whole prefix that produced it.

Block i's hash covers tokens [0, (i+1)*block_size): it hashes block i's tokens together
with block i-1's hash. Two sequences share block i's KV exactly when their hashes agree.
The engine's prefix cache, the KV events and the cluster-wide index (kvstore) all use this
one function, so a match anywhere means a real hit in the engine. It is stable across
processes and machines (no Python `hash()`), 63 bits so it fits msgpack and Redis integers.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = 0
"""The parent hash of block 0."""


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(parent_hash.to_bytes(8, "little"))
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def extend_block_hashes(hashes: list[int], token_ids: Sequence[int], block_size: int) -> list[int]:
    """Append the hashes of every full block of `token_ids` not yet in `hashes` (in place)."""
    parent = hashes[-1] if hashes else ROOT_HASH
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The hash chain of every full block of `token_ids`."""
    return extend_block_hashes([], token_ids, block_size)
