"""Batch layout: the flat rows of one forward pass and their attention metadata.

A pass feeds each sequence a run of tokens at consecutive positions of its block table; runs
come ordered by kind, as models/attention.py lays rows out:

    decode  one token after a cached context (batched paged decode attention)
    verify  a few tokens after a cached context, causal among themselves (one multi-token
            paged attention call for every verify run: speculative verification)
    chunk   a prefill chunk, with or without cached context before it

The target's step (model_runner.py) and the draft model's passes (draft_model.py) lay out
their batches here, over the same block tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xllm.models.attention import AttentionMetadata, PrefillChunk, VerifyBatch

DECODE, VERIFY, CHUNK = "decode", "verify", "chunk"


@dataclass
class Run:
    block_table: list[int]
    start: int
    """Position of the first token (tokens before it are in the cache)."""
    token_ids: list[int]
    kind: str
    """DECODE (one token, start > 0), VERIFY (start > 0) or CHUNK."""


def lay_out(
    runs: list[Run], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """input_ids [N], positions [N] and the metadata of `runs` (ordered decode, verify,
    chunk); run i's rows are consecutive, in order."""
    tokens = [t for run in runs for t in run.token_ids]
    decodes = [r for r in runs if r.kind == DECODE]
    verifies = [r for r in runs if r.kind == VERIFY]
    meta = AttentionMetadata(torch.empty(0), block_size)
    decode_positions, decode_slots = _decodes(decodes, meta, block_size, device)
    position_runs: list[torch.Tensor] = [decode_positions]
    slot_runs: list[torch.Tensor] = [decode_slots]
    if verifies:  # (a plain step concatenates no more than it did before verify runs)
        verify_positions, verify_slots = _verifies(verifies, meta, block_size, device)
        position_runs.append(verify_positions)
        slot_runs.append(verify_slots)
    row = len(decodes) + sum(len(r.token_ids) for r in verifies)
    for run in runs[len(decodes) + len(verifies) :]:
        start, n = run.start, len(run.token_ids)
        table = torch.tensor(run.block_table, dtype=torch.long)
        chunk = PrefillChunk(start=row, length=n, context_len=start)
        positions = torch.arange(start, start + n)
        slot_runs.append(slots_of(table, positions, block_size))
        position_runs.append(positions)
        if start:
            everything = torch.arange(start + n)
            chunk.slots = slots_of(table, everything, block_size).to(device)
            chunk.mask = (everything[None, :] <= positions[:, None]).to(device)
        meta.prefills.append(chunk)
        row += n
    positions = torch.cat(position_runs) if len(position_runs) > 1 else position_runs[0]
    meta.slot_mapping = (torch.cat(slot_runs) if len(slot_runs) > 1 else slot_runs[0]).to(device)
    input_ids = torch.tensor(tokens, dtype=torch.long, device=device)
    return input_ids, positions.to(device), meta


def slots_of(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_table[positions // block_size] * block_size + positions % block_size


def padded_tables(runs: list[Run]) -> torch.Tensor:
    """[B, max_blocks] block tables, padded with 0."""
    width = max(len(r.block_table) for r in runs)
    return torch.tensor([r.block_table + [0] * (width - len(r.block_table)) for r in runs])


_EMPTY = torch.empty(0, dtype=torch.long)


def _decodes(
    decodes: list[Run], meta: AttentionMetadata, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the decode part of `meta`; returns the decodes' positions and new slots.

    In plain Python, then one tensor each: a handful of torch calls a step instead of a dozen
    small ops (with --async-scheduling each is a GIL hand-off with the running forward)."""
    if not decodes:
        return _EMPTY, _EMPTY
    bs = block_size
    positions = [r.start for r in decodes]
    width = max(len(r.block_table) for r in decodes)
    tables = [r.block_table + [0] * (width - len(r.block_table)) for r in decodes]
    new_slots = [r.block_table[r.start // bs] * bs + r.start % bs for r in decodes]
    meta.num_decodes = len(decodes)
    meta.decode_block_tables = torch.tensor(tables, device=device)
    meta.decode_context_lens = torch.tensor([p + 1 for p in positions], device=device)
    return torch.tensor(positions), torch.tensor(new_slots)


def _verifies(
    verifies: list[Run], meta: AttentionMetadata, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill `meta.verify`; returns the verifying rows' positions and new slots."""
    tables = padded_tables(verifies)
    starts = torch.tensor([r.start for r in verifies])
    lengths = torch.tensor([len(r.token_ids) for r in verifies])
    ends = starts + lengths
    positions = torch.cat(
        [torch.arange(a, b) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    )
    owner = torch.repeat_interleave(torch.arange(len(verifies)), lengths)
    slots = tables[owner, positions // block_size] * block_size + positions % block_size
    query_starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    meta.verify = VerifyBatch(tables.to(device), ends.to(device), query_starts.to(device))
    return positions, slots
