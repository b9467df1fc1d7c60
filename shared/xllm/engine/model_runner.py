"""ModelRunner: owns the model and the KV pool; turns a SchedulerOutput into sampled tokens.

Per step: lay the scheduled tokens out flat (decodes first, see models/attention.py),
build the attention metadata once, run the forward pass, copy forked blocks, take the
logits of the rows that sample and hand them to the Sampler.

A sequence verifying speculative drafts is laid out right after the decodes: its last
token and its d drafts are d + 1 query rows attending to its paged KV and causally to each
other (`VerifyBatch`: one multi-token decode attention call per layer for every verifying
sequence, models/attention.py), so every draft of every sequence is verified in the one
forward pass of the step. All d + 1 rows' logits go to the RejectionSampler.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from xllm.config import EngineConfig
from xllm.engine.batch_layout import CHUNK, DECODE, VERIFY, Run, lay_out
from xllm.engine.graph_runner import DecodeGraph, build_decode_graph, is_decode_only, padding_blocks
from xllm.engine.kv_cache import KVCache
from xllm.engine.multimodal import model_inputs
from xllm.engine.rejection_sampler import RejectionSampler
from xllm.engine.sampler import Sampler, SamplerOutput
from xllm.engine.scheduler import ScheduledSeq, SchedulerOutput
from xllm.engine.sequence import Sequence
from xllm.models.attention import AttentionMetadata, PagedAttention
from xllm.models.config import ModelConfig
from xllm.models.registry import load_model
from xllm.protocol.stats import EncoderStats

if TYPE_CHECKING:
    from xllm.engine.draft_model import DraftModel

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
        self.tower_stats = EncoderStats()
        """The steps' vision-tower calls: `batches`, `images_encoded`, `encode_seconds`."""
        self.kv_cache = KVCache(
            model_config.num_hidden_layers,
            num_blocks + padding_blocks(config.graph_mode, device),
            config.block_size,
            model_config.num_key_value_heads,
            model_config.head_dim,
            dtype,
            device,
        )
        attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        for index, attn in enumerate(attention_layers):
            attn.k_cache, attn.v_cache = self.kv_cache.layer(index)
        self.draft: DraftModel | None = None
        if config.speculative == "draft":
            from xllm.engine.draft_model import DraftModel

            self.draft = DraftModel(
                config.draft_model, model_config, dtype, device, num_blocks, config.block_size
            )
        self.graph: DecodeGraph | None = None
        """Decode-only steps' fast path (--graph-mode), None = eager."""
        if config.graph_mode:
            self.graph = build_decode_graph(self.model, self.kv_cache, config.max_num_seqs, device)
        self.sampler = Sampler(model_config.eos_token_ids)
        self.rejection_sampler = RejectionSampler()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[Sequence], SamplerOutput]:
        """Run one step; returns the sequences that sampled (forks included) and their tokens
        (those that verified drafts: in `SamplerOutput.verified` only)."""
        items = order_for_attention(out.scheduled)
        if self.draft is not None and out.max_drafts:  # (off: the draft computes nothing)
            # Before _prepare: the drafts are filled in here.
            out.draft_catch_up_seconds = self.draft.propose([i for i in items if i.draft_token_ids])
            self.draft.mirror([i for i in items if run_kind(i) == CHUNK])
            out.draft_prefill_seconds, out.draft_prefill_tokens = self.draft.take_prefill()
        input_ids, positions, meta = self._prepare(items)
        hidden = self.forward(input_ids, positions, meta, items, out.encodes)  # [N, hidden]
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

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        items: list[ScheduledSeq] = (),  # type: ignore[assignment]
        encodes: list = (),  # type: ignore[assignment]
    ) -> torch.Tensor:
        """The model's hidden states [N, hidden] for laid-out inputs; `items` (in row order)
        and `encodes` matter only to a model that takes images."""
        if self.multimodal and (encodes or any(i.seq.mm is not None for i in items)):
            positions, image_embeds = model_inputs(
                self.model, items, positions, encodes, self.tower_stats
            )
            return self.model(input_ids, positions, meta, image_embeds)
        if self.graph is not None and is_decode_only(meta, len(input_ids)):
            return self.graph.run(input_ids, positions, meta)
        return self.model(input_ids, positions, meta)

    def _prepare(
        self, items: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        return lay_out([run_of(item) for item in items], self.block_size, self.device)


def run_of(item: ScheduledSeq) -> Run:
    """What a scheduled sequence feeds the model: its uncomputed tokens, then its drafts."""
    seq, start = item.seq, item.seq.num_computed_tokens
    drafts = item.draft_token_ids
    tokens = seq.token_ids[start : start + item.num_new_tokens - len(drafts)] + drafts
    return Run(seq.block_table, start, tokens, run_kind(item))  # (kind: see order_for_attention)


def run_kind(item: ScheduledSeq) -> str:
    return DECODE if is_decode(item) else VERIFY if is_verify(item) else CHUNK


def is_decode(item: ScheduledSeq) -> bool:
    return item.num_new_tokens == 1 and item.seq.num_computed_tokens > 0


def is_verify(item: ScheduledSeq) -> bool:
    """A decoding sequence with drafts (its last token and the drafts: rows of one query)."""
    return bool(item.draft_token_ids) and item.seq.num_computed_tokens > 0


def order_for_attention(items: list[ScheduledSeq]) -> list[ScheduledSeq]:
    """Decodes, then verifications, then prefill chunks (the layout of models/attention.py)."""
    decodes: list[ScheduledSeq] = []
    verifies: list[ScheduledSeq] = []
    rest: list[ScheduledSeq] = []
    for item in items:
        (decodes if is_decode(item) else verifies if is_verify(item) else rest).append(item)
    return decodes + verifies + rest


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
