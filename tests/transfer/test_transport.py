"""MooncakeTransport between two real processes: block bytes arrive exactly, counts agree."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from xllm.kv_transfer.layout import block_segments, pair_runs
from xllm.protocol import KvLayout, KvPeer

pytest.importorskip("mooncake.engine")

L, BS, HKV, D = 3, 4, 2, 8


def test_pair_runs_merge_only_where_both_sides_are_consecutive():
    assert pair_runs([4, 5, 6, 9], [0, 1, 7, 8]) == [(4, 0, 2), (6, 7, 1), (9, 8, 1)]
    assert pair_runs([], []) == []


def test_block_segments_cover_every_plane_of_every_block():
    src = KvLayout(num_layers=2, num_blocks=8, block_size=4, token_bytes=16)
    dst = KvLayout(num_layers=2, num_blocks=5, block_size=4, token_bytes=16)
    segments = block_segments(src, dst, [1, 2], [3, 4])
    assert len(segments) == 4  # one merged run, 2 layers x K/V
    assert sum(length for *_, length in segments) == 2 * src.block_bytes
    assert segments[1] == (src.plane_bytes + 64, dst.plane_bytes + 192, 128)
    with pytest.raises(ValueError):
        block_segments(src, KvLayout(2, 8, 8, 16), [0], [0])


def as_bytes(t: torch.Tensor) -> bytes:
    """By value: torch would share a tensor through a file descriptor that dies with the child."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_batches_cut_at_the_byte_limit():
    from xllm.kv_transfer.mooncake import batches

    out = batches([(0, 100, 6), (10, 200, 3)], 4)
    assert out == [[(0, 100, 4)], [(4, 104, 2), (10, 200, 2)], [(12, 202, 1)]]
    assert batches([], 4) == []


def test_a_dead_peer_is_an_error_not_a_hang():
    from xllm.kv_transfer.mooncake import KvTransferError, MooncakeTransport

    transport = MooncakeTransport(torch.zeros(L, 2, 8 * BS, HKV, D), BS)
    try:
        with pytest.raises(KvTransferError, match="failed"):
            transport.write_blocks(KvPeer("127.0.0.1:1", 4096, transport.layout), [0], [1])
        assert transport.stats.bytes_sent == 0
    finally:
        transport.close()


def _receiver(conn, num_blocks: int) -> None:
    from xllm.kv_transfer.mooncake import MooncakeTransport

    kv = torch.zeros(L, 2, num_blocks * BS, HKV, D, dtype=torch.bfloat16)
    transport = MooncakeTransport(kv, BS)
    conn.send(transport.peer)
    blocks = conn.recv()  # the sender is done writing into these
    transport.record_received(len(blocks))
    kv = kv.view(L, 2, num_blocks, BS, HKV, D)
    conn.send((as_bytes(kv[:, :, blocks]), transport.stats))
    transport.close()


def _sender(conn, num_blocks: int, src_blocks: list[int], dst_blocks: list[int]) -> None:
    from xllm.kv_transfer.mooncake import MooncakeTransport

    kv = torch.randn(L, 2, num_blocks * BS, HKV, D).to(torch.bfloat16)
    transport = MooncakeTransport(kv, BS)
    peer = conn.recv()
    transport.write_blocks(peer, src_blocks[:2], dst_blocks[:2])
    transport.submit(peer, src_blocks[2:], dst_blocks[2:]).wait()
    kv = kv.view(L, 2, num_blocks, BS, HKV, D)
    conn.send((as_bytes(kv[:, :, src_blocks]), transport.stats))
    transport.close()


def test_blocks_cross_between_processes_byte_exact():
    ctx = mp.get_context("spawn")
    src_blocks, dst_blocks = [0, 1, 5, 6, 7, 3], [9, 10, 2, 3, 4, 0]
    recv_end, recv_child = ctx.Pipe()
    send_end, send_child = ctx.Pipe()
    receiver = ctx.Process(target=_receiver, args=(recv_child, 12))
    sender = ctx.Process(target=_sender, args=(send_child, 8, src_blocks, dst_blocks))
    receiver.start()
    sender.start()
    try:
        assert recv_end.poll(60), "receiver did not start"
        send_end.send(recv_end.recv())
        assert send_end.poll(60), "sender did not finish"
        sent, send_stats = send_end.recv()
        recv_end.send(dst_blocks)
        assert recv_end.poll(60)
        received, recv_stats = recv_end.recv()
    finally:
        for p in (sender, receiver):
            p.join(30)
            if p.is_alive():
                p.kill()
    assert sent == received
    block_bytes = 2 * L * BS * HKV * D * 2
    assert send_stats.bytes_sent == recv_stats.bytes_received == len(src_blocks) * block_bytes
    assert send_stats.blocks_sent == recv_stats.blocks_received == len(src_blocks)
    assert send_stats.transfers == 2
    # merged runs: [0,1]->[9,10] | [5,6,7]->[2,3,4] + [3]->[0]: 3 runs x 2L planes
    assert send_stats.writes == 3 * 2 * L
    assert sender.exitcode == receiver.exitcode == 0
