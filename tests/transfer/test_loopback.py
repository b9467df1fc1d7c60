"""LoopbackTransport: the KV-transfer seam without Mooncake — bytes land exactly where the
layout says, and a transfer goes through the states `kv_transfer/base.py` promises."""

from __future__ import annotations

import pytest
import torch

from xllm.kv_transfer import KvTransferError, TransferState, open_transport
from xllm.kv_transfer.loopback import LoopbackTransport

L, BS, HKV, D = 3, 4, 2, 8


def pool(num_blocks: int, fill: bool = False) -> torch.Tensor:
    kv = torch.zeros(L, 2, num_blocks * BS, HKV, D, dtype=torch.bfloat16)
    if fill:
        kv.copy_(torch.randn_like(kv, dtype=torch.float32))
    return kv


def blocks(kv: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The KV of blocks `ids`: [L, 2, len(ids), BS, Hkv, D]."""
    return kv.view(L, 2, -1, BS, HKV, D)[:, :, ids]


@pytest.fixture
def pair():
    src = LoopbackTransport(pool(8, fill=True), BS, hold=True)
    dst = LoopbackTransport(pool(12), BS)
    yield src, dst
    src.close()
    dst.close()


def test_blocks_land_byte_exact_in_the_reserved_blocks_and_counts_agree(pair):
    src, dst = pair
    src_blocks, dst_blocks = [0, 1, 5, 6, 7, 3], [9, 10, 2, 3, 4, 0]
    transfer = src.submit(dst.peer, src_blocks, dst_blocks)
    assert src.finish() == 1 and transfer.poll() is TransferState.DONE
    assert torch.equal(blocks(dst.kv, dst_blocks), blocks(src.kv, src_blocks))
    untouched = [b for b in range(12) if b not in dst_blocks]
    assert not blocks(dst.kv, untouched).any()
    dst.record_received(len(dst_blocks))
    assert transfer.wait() == src.stats.bytes_sent == dst.stats.bytes_received
    assert src.stats.bytes_sent == len(src_blocks) * src.layout.block_bytes
    # merged runs: [0,1]->[9,10] | [5,6,7]->[2,3,4] | [3]->[0]: 3 runs x 2L planes
    assert src.stats.writes == 3 * 2 * L


def test_one_transfer_per_peer_at_a_time_and_only_a_waiting_one_can_be_aborted(pair):
    src, dst = pair
    first = src.submit(dst.peer, [0], [0])
    second = src.submit(dst.peer, [1], [1])
    third = src.submit(dst.peer, [2], [2])
    assert first.poll() is TransferState.TRANSFERRING
    assert second.poll() is third.poll() is TransferState.WAITING
    assert not first.abort()  # bytes in flight cannot be recalled
    assert second.abort()
    assert second.poll() is TransferState.FAILED and "aborted" in second.error
    assert src.finish(count=1) == 1
    assert first.poll() is TransferState.DONE and third.poll() is TransferState.TRANSFERRING
    assert src.finish() == 1 and third.poll() is TransferState.DONE
    assert not blocks(dst.kv, [1]).any()  # the aborted one wrote nothing
    assert src.in_flight() == 0 and src.stats.transfers == 2


def test_done_callbacks_run_once_when_the_transfer_ends_or_at_once_if_it_has(pair):
    src, dst = pair
    seen = []
    transfer = src.submit(dst.peer, [0], [0])
    transfer.add_done_callback(lambda t: seen.append(t.poll()))
    assert seen == []
    src.finish()
    transfer.add_done_callback(lambda t: seen.append(t.poll()))
    assert seen == [TransferState.DONE, TransferState.DONE]


def test_a_write_to_a_closed_pool_fails_like_one_to_a_dead_peer(pair):
    src, dst = pair
    peer = dst.peer
    dst.close()
    transfer = src.submit(peer, [0], [0])
    src.finish()
    assert transfer.poll() is TransferState.FAILED and "gone" in transfer.error
    with pytest.raises(KvTransferError, match="gone"):
        transfer.wait()
    assert src.stats.bytes_sent == 0


def test_closing_the_sender_ends_every_transfer_it_holds(pair):
    src, dst = pair
    writing, waiting = src.submit(dst.peer, [0], [0]), src.submit(dst.peer, [1], [1])
    src.close()
    assert writing.poll() is waiting.poll() is TransferState.FAILED


def test_incompatible_layouts_fail_the_transfer_not_the_caller():
    src = LoopbackTransport(pool(4, fill=True), BS)
    other = LoopbackTransport(torch.zeros(L, 2, 4 * 2 * BS, HKV, D), 2 * BS)  # bigger blocks
    try:
        transfer = src.submit(other.peer, [0], [0])
        assert transfer.poll() is TransferState.FAILED and "layouts" in transfer.error
    finally:
        src.close()
        other.close()


def test_the_backend_is_chosen_by_name():
    assert open_transport("loopback") is LoopbackTransport
    with pytest.raises(ValueError, match="mooncake, loopback"):
        open_transport("carrier-pigeon")
