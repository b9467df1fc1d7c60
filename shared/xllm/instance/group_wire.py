"""How an expert-parallel instance's rank 0 talks to its followers: one gloo broadcast of
a fixed `HEADER_BYTES` buffer per `ExpertGroupStep` (its msgpack inline, after its length),
a second broadcast only for a message that does not fit (a long prompt)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch

from xllm.protocol import ExpertGroupStep, decode_as, encode

HEADER_BYTES = 4096
"""Size of the one buffer broadcast per step: a step's commands up to this go inline."""
_LENGTH = 8  # bytes of the header that give the payload's length


def send(msg: ExpertGroupStep) -> None:
    """Rank 0: broadcast `msg` to the followers."""
    payload = encode(msg)
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    header[:_LENGTH] = torch.frombuffer(
        bytearray(len(payload).to_bytes(_LENGTH, "little")), dtype=torch.uint8
    )
    inline = len(payload) <= HEADER_BYTES - _LENGTH
    if inline:
        header[_LENGTH : _LENGTH + len(payload)] = torch.frombuffer(
            bytearray(payload), dtype=torch.uint8
        )
    torch.distributed.broadcast(header, src=0)
    if not inline:
        torch.distributed.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), 0)


def receive() -> ExpertGroupStep:
    """A follower: the next message rank 0 broadcasts."""
    header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
    torch.distributed.broadcast(header, src=0)
    size = int.from_bytes(header[:_LENGTH].numpy().tobytes(), "little")
    if size <= HEADER_BYTES - _LENGTH:
        return decode_as(header[_LENGTH : _LENGTH + size].numpy().tobytes(), ExpertGroupStep)
    payload = torch.empty(size, dtype=torch.uint8)
    torch.distributed.broadcast(payload, src=0)
    return decode_as(payload.numpy().tobytes(), ExpertGroupStep)


def outputs_digest(outputs: Sequence[Any]) -> int:
    """CRC32 of a step's outputs: which completions got which tokens."""
    crc = 0
    for out in outputs:
        crc = zlib.crc32(f"{out.request_id}/{out.index}:{out.token_ids}".encode(), crc)
    return crc
