"""ModelRunner: owns the model and the KV pool; turns a SchedulerOutput into sampled tokens.

Per step: lay the scheduled tokens out flat (decodes first, see models/attention.py),
build the attention metadata once, run the forward pass, copy forked blocks, take the
logits of the rows that sample and hand them to the Sampler.

A sequence verifying speculative drafts is laid out like a prefill chunk with context: its
last token and its d drafts are d + 1 query rows attending to its cached KV and causally to
each other (the chunk-with-context path of models/attention.py), so every draft of every
sequence is verified in the one forward pass of the step. All d + 1 rows' logits go to the
RejectionSampler.
"""

from __future__ import annotations

import logging

import torch

from xllm.config import EngineConfig
from xllm.engine.kv_cache import KVCache
from xllm.engine.multimodal import model_inputs
from xllm.engine.rejection_sampler import RejectionSampler
from xllm.engine.sampler import Sampler, SamplerOutput
from xllm.engine.scheduler import ScheduledSeq, SchedulerOutput
from xllm.engine.sequence import Sequence
from xllm.models.attention import AttentionMetadata, PagedAttention, PrefillChunk
from xllm.models.config import ModelConfig
from xllm.models.registry import load_model

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        num_blocks: int,
    ):
        self.device = device
        self.block_size = config.block_size
        self.model = load_model(config.model, model_config, dtype, device)
        self.multimodal = hasattr(self.model, "encode_images")
        """The model takes images (engine/multimodal.py); text-only steps never look."""
        self.kv_cache = KVCache(
            model_config.num_hidden_layers,
            num_blocks,
            config.block_size,
            model_config.num_key_value_heads,
            model_config.head_dim,
            dtype,
            device,
        )
        attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        for index, attn in enumerate(attention_layers):
            attn.k_cache, attn.v_cache = self.kv_cache.layer(index)
        self.sampler = Sampler(model_config.eos_token_ids)
        self.rejection_sampler = RejectionSampler()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[Sequence], SamplerOutput]:
        """Run one step; returns the sequences that sampled (forks included) and their tokens
        (those that verified drafts: in `SamplerOutput.verified` only)."""
        items = order_decodes_first(out.scheduled)
        input_ids, positions, meta = self._prepare(items)
        if self.multimodal and any(item.seq.mm is not None for item in items):
            positions, image_embeds = model_inputs(self.model, items, positions)
            hidden = self.model(input_ids, positions, meta, image_embeds)
        else:
            hidden = self.model(input_ids, positions, meta)  # [N, hidden]
        self.kv_cache.copy_blocks(out.block_copies)
        rows, seqs = sampling_rows(items, out.forks)
        verify_rows, verifying = verification_rows(items)
        if not seqs and not verifying:
            return [], SamplerOutput([], [])
        all_rows = torch.tensor(rows + verify_rows, device=self.device)
        logits = self.model.compute_logits(hidden[all_rows]).cpu()  # [R, V]
        sampled = self.sampler(logits[: len(rows)], seqs) if seqs else SamplerOutput([], [])
        if verifying:
            drafts = [item.draft_token_ids for item in verifying]
            verify_seqs = [item.seq for item in verifying]
            kept = self.rejection_sampler(logits[len(rows) :], verify_seqs, drafts)
            sampled.verified = {s.seq_id: t for s, t in zip(verify_seqs, kept, strict=True)}
        return seqs, sampled

    def _prepare(
        self, items: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        tokens: list[int] = []
        decodes: list[Sequence] = []
        prefills: list[PrefillChunk] = []
        position_runs: list[torch.Tensor] = []
        slot_runs: list[torch.Tensor] = []
        for item in items:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            drafts = item.draft_token_ids
            tokens.extend(seq.token_ids[start : start + n - len(drafts)])
            tokens.extend(drafts)
            if is_decode(item):
                decodes.append(seq)
                continue
            table = torch.tensor(seq.block_table, dtype=torch.long)
            chunk = PrefillChunk(start=len(tokens) - n, length=n, context_len=start)
            positions = torch.arange(start, start + n)
            slot_runs.append(slots_of(table, positions, self.block_size))
            position_runs.append(positions)
            if start:
                everything = torch.arange(start + n)
                chunk.slots = slots_of(table, everything, self.block_size).to(self.device)
                chunk.mask = (everything[None, :] <= positions[:, None]).to(self.device)
            prefills.append(chunk)
        meta = AttentionMetadata(torch.empty(0), self.block_size, prefills=prefills)
        decode_positions, decode_slots = self._prepare_decodes(decodes, meta)
        positions = torch.cat([decode_positions, *position_runs])
        meta.slot_mapping = torch.cat([decode_slots, *slot_runs]).to(self.device)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return input_ids, positions.to(self.device), meta

    def _prepare_decodes(
        self, decodes: list[Sequence], meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the decode part of `meta`; returns the decodes' positions and new slots."""
        if not decodes:
            empty = torch.empty(0, dtype=torch.long)
            return empty, empty
        bs = self.block_size
        positions = torch.tensor([s.num_computed_tokens for s in decodes])  # [B]
        max_blocks = max(len(s.block_table) for s in decodes)
        tables = torch.tensor(
            [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in decodes]
        )
        meta.num_decodes = len(decodes)
        meta.decode_block_tables = tables.to(self.device)
        meta.decode_context_lens = (positions + 1).to(self.device)
        new_slots = tables.gather(1, (positions // bs)[:, None]).squeeze(1) * bs + positions % bs
        return positions, new_slots


def is_decode(item: ScheduledSeq) -> bool:
    return item.num_new_tokens == 1 and item.seq.num_computed_tokens > 0


def order_decodes_first(items: list[ScheduledSeq]) -> list[ScheduledSeq]:
    return [i for i in items if is_decode(i)] + [i for i in items if not is_decode(i)]


def slots_of(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_table[positions // block_size] * block_size + positions % block_size


def sampling_rows(
    items: list[ScheduledSeq], forks: list[tuple[Sequence, Sequence]]
) -> tuple[list[int], list[Sequence]]:
    """Flat-batch row of the last token of each sequence that samples; forks reuse their
    parent's row."""
    rows: list[int] = []
    seqs: list[Sequence] = []
    row_of: dict[tuple[str, int], int] = {}
    end = 0
    for item in items:
        end += item.num_new_tokens
        if item.samples and not item.draft_token_ids:
            rows.append(end - 1)
            seqs.append(item.seq)
            row_of[item.seq.seq_id] = end - 1
    for parent, child in forks:
        rows.append(row_of[parent.seq_id])
        seqs.append(child)
    return rows, seqs


def verification_rows(items: list[ScheduledSeq]) -> tuple[list[int], list[ScheduledSeq]]:
    """Flat-batch rows of the last token and the drafts of each sequence verifying drafts,
    in order (the rows the RejectionSampler reads)."""
    rows: list[int] = []
    verifying: list[ScheduledSeq] = []
    end = 0
    for item in items:
        end += item.num_new_tokens
        if item.draft_token_ids:
            rows.extend(range(end - len(item.draft_token_ids) - 1, end))
            verifying.append(item)
    return rows, verifying
