"""Graph mode (`--graph-mode`, §4.2): decode-only steps without per-op Python and dispatch.

A decode-only step (every row one decoding sequence: no prefill chunk, no verification) is
the same few hundred small ops every time; only the batch size and the data change. Built
once at start-up, behind `--graph-mode`, per device:

  CPU      `CpuDecodeGraph`: the whole step as one native call (ops/csrc/decode_stack.cpp)
           over the weights and KV pool views bound once: the same ops and kernels as eager,
           so the same bits, and any batch size (nothing is captured, so nothing is padded).
  CUDA/NPU `AcceleratorDecodeGraphs`: one device graph captured per padded batch-size
           bucket (xllm.platform), over static input buffers; a batch of n rows replays the
           smallest bucket >= n, its pad rows writing a spare KV slot and ignored.

Any other step, a model graph mode does not cover, or a failure while building (logged)
runs eager. A graph that is built is checked once against eager on a probe decode.
"""

from __future__ import annotations

import bisect
import logging
from typing import Protocol

import torch
from torch import nn

from xllm import platform
from xllm.engine.kv_cache import KVCache
from xllm.models.attention import AttentionMetadata
from xllm.models.layers import GatedMLP, Linear
from xllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from xllm.models.qwen3 import Qwen3Attention

log = logging.getLogger(__name__)


class DecodeGraph(Protocol):
    steps: int
    """Steps run through the graph so far."""

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        """Final hidden states [N, hidden] of a decode-only step, as `model(...)` returns."""


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes graphs are captured for: 1, 2, 4, 8, then every multiple of 8,
    up to (and covering) `max_batch` (vLLM's sizes: pad rows cost little at decode)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    size = 8
    while size < max_batch:
        sizes.append(size)
        size += 8
    return sizes + [max_batch if max_batch < 8 else size]


def bucket_for(num_rows: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding `num_rows` rows, or None when none does (run eager)."""
    index = bisect.bisect_left(buckets, num_rows)
    return buckets[index] if index < len(buckets) else None


def is_decode_only(meta: AttentionMetadata, num_rows: int) -> bool:
    return meta.num_decodes == num_rows > 0 and meta.verify is None and not meta.prefills


def pad_rows(tensor: torch.Tensor, rows: int, value: int) -> torch.Tensor:
    """`tensor` with rows appended up to `rows`, filled with `value`."""
    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    pad = tensor.new_full((missing, *tensor.shape[1:]), value)
    return torch.cat([tensor, pad])


def padded_decode_inputs(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    rows: int,
    pad_slot: int,
) -> dict[str, torch.Tensor]:
    """A decode batch padded to `rows`: pad rows decode token 0 at position 0 with a context
    of one token, and write their K/V to `pad_slot` (a slot no sequence owns), so they
    touch nothing real; their outputs are dropped."""
    assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
    return {
        "input_ids": pad_rows(input_ids, rows, 0),
        "positions": pad_rows(positions, rows, 0),
        "slot_mapping": pad_rows(meta.slot_mapping, rows, pad_slot),
        "block_tables": pad_rows(meta.decode_block_tables, rows, 0),
        "context_lens": pad_rows(meta.decode_context_lens, rows, 1),
    }


def llama_family(model: nn.Module) -> bool:
    """Llama, Qwen2 and Qwen3 text models: the layers decode_stack.cpp implements (MoE
    and multimodal models run eager)."""
    if not isinstance(model, LlamaForCausalLM) or hasattr(model, "encode_images"):
        return False
    return all(
        isinstance(layer, LlamaDecoderLayer)
        and type(layer.mlp) is GatedMLP
        and type(layer.self_attn) in (LlamaAttention, Qwen3Attention)
        for layer in model.model.layers
    )


def padding_blocks(graph_mode: bool, device: torch.device) -> int:
    """KV blocks to allocate beyond the block manager's: one for the pad rows of captured
    graphs to write (accelerators in graph mode), else none."""
    return 1 if graph_mode and device.type in ("cuda", "npu") else 0


def build_decode_graph(
    model: nn.Module, kv_cache: KVCache, max_batch: int, device: torch.device
) -> DecodeGraph | None:
    """This device's decode graph for `model`, checked against eager; None (logged) where
    graph mode does not apply or building it fails: the engine then runs eager."""
    if not llama_family(model):
        log.warning("graph mode: %s is not supported; running eager", type(model).__name__)
        return None
    try:
        if device.type == "cpu":
            graph: DecodeGraph = CpuDecodeGraph(model, kv_cache)
        else:
            graph = AcceleratorDecodeGraphs(model, kv_cache, max_batch, device)
        check_against_eager(graph, model, kv_cache, device)
        graph.steps = 0  # (the probe is not a step)
    except Exception as e:  # graph mode is an optimisation: never a reason not to serve
        log.warning("graph mode unavailable (%s: %s); running eager", type(e).__name__, e)
        return None
    log.info("graph mode on (%s)", type(graph).__name__)
    return graph


def check_against_eager(
    graph: DecodeGraph, model: nn.Module, kv_cache: KVCache, device: torch.device
) -> None:
    """One probe decode (token 1 at position 0, slot 0, before any request owns a block)
    through both paths; raises if they differ."""
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(1, dtype=torch.long, device=device),
        block_size=kv_cache.block_size,
        num_decodes=1,
        decode_block_tables=torch.zeros(1, 1, dtype=torch.long, device=device),
        decode_context_lens=torch.ones(1, dtype=torch.long, device=device),
    )
    ids = torch.ones(1, dtype=torch.long, device=device)
    positions = torch.zeros(1, dtype=torch.long, device=device)
    with torch.inference_mode():
        expected = model(ids, positions, meta)
        got = graph.run(ids, positions, meta)
    if device.type == "cpu":  # the same ops and kernels: the same bits
        if not torch.equal(expected, got):
            raise RuntimeError("probe decode differs from eager")
    else:  # the captured attention reduces over the tables' full width, eager over the context
        torch.testing.assert_close(got, expected)


class CpuDecodeGraph:
    """A decode-only step as one native call (`DecodeStack`, ops/csrc/decode_stack.cpp)."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache):
        from xllm.ops import kernels, native_linear_choice

        native = kernels()
        if native is None:
            raise RuntimeError("the native CPU kernels are not available")
        config = model.config
        base = model.model
        first = base.layers[0].self_attn.attn
        kind, max_rows = native_linear_choice()
        self.stack = native.DecodeStack(
            base.embed_tokens.weight,
            base.rotary.cos,
            base.rotary.sin,
            base.norm.weight,
            base.norm.eps,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            first.scale,
            kv_cache.block_size,
            kind,
            max_rows,
        )
        for layer in base.layers:
            self._add_layer(layer)
        self.steps = 0

    def _add_layer(self, layer: LlamaDecoderLayer) -> None:
        attn = layer.self_attn
        linears: list[Linear] = [attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj]
        linears.append(layer.mlp.down_proj)
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        self.stack.add_layer(
            layer.input_layernorm.weight,
            layer.post_attention_layernorm.weight,
            None if q_norm is None else q_norm.weight,
            None if k_norm is None else k_norm.weight,
            [lin.weight for lin in linears],
            [lin.bias for lin in linears],
            [lin.packed_weight for lin in linears],
            attn.attn.k_cache,
            attn.attn.v_cache,
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        self.steps += 1
        return self.stack.run(
            input_ids,
            positions,
            meta.slot_mapping,
            meta.decode_block_tables,
            meta.decode_context_lens,
        )


class AcceleratorDecodeGraphs:
    """CUDA / NPU: one device graph per padded batch-size bucket, over static buffers.

    Each bucket's graph is captured from the eager model with the buckets' shared static
    inputs (sliced to the bucket); a step copies its (padded) inputs into them, replays,
    and reads its rows of the static output. Block tables are as wide as the longest
    sequence allowed, so one capture serves every context length.
    """

    def __init__(self, model: nn.Module, kv_cache: KVCache, max_batch: int, device: torch.device):
        self.model = model
        self.device = device
        self.block_size = kv_cache.block_size
        self.pad_slot = (kv_cache.num_blocks - 1) * kv_cache.block_size  # padding_blocks()
        self.buckets = batch_buckets(max_batch)
        rows = self.buckets[-1]
        # Tables as wide as the longest context possible (the pool's, at most the model's):
        # the in-graph gather is that wide, whatever the step's contexts.
        width = min(
            -(-model.config.max_position_embeddings // self.block_size), kv_cache.num_blocks
        )
        zeros = torch.zeros
        self.static = {
            "input_ids": zeros(rows, dtype=torch.long, device=device),
            "positions": zeros(rows, dtype=torch.long, device=device),
            "slot_mapping": torch.full((rows,), self.pad_slot, dtype=torch.long, device=device),
            "block_tables": zeros(rows, width, dtype=torch.long, device=device),
            "context_lens": torch.ones(rows, dtype=torch.long, device=device),
        }
        self.graphs: dict[int, tuple[object, torch.Tensor]] = {}
        self.steps = 0
        pool = None
        for bucket in reversed(self.buckets):  # largest first: the smaller ones share its pool
            graph, out = self._capture(bucket, pool)
            pool = platform.graph_pool(graph)
            self.graphs[bucket] = (graph, out)

    def _meta(self, rows: int) -> AttentionMetadata:
        s = self.static
        meta = AttentionMetadata(
            slot_mapping=s["slot_mapping"][:rows],
            block_size=self.block_size,
            num_decodes=rows,
            decode_block_tables=s["block_tables"][:rows],
            decode_context_lens=s["context_lens"][:rows],
        )
        # The gather of every table's full width, masked by length: no host sync (the
        # eager fallback sizes it by the longest context, which a graph cannot).
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        offsets = torch.arange(self.block_size, device=self.device)
        slots = (tables[:, :, None] * self.block_size + offsets).view(rows, -1)
        mask = torch.arange(slots.shape[1], device=self.device)[None, :] < lens[:, None]
        meta._gather = (slots, mask[:, None, None, :])
        return meta

    def _forward(self, rows: int) -> torch.Tensor:
        s = self.static
        return self.model(s["input_ids"][:rows], s["positions"][:rows], self._meta(rows))

    def _capture(self, rows: int, pool) -> tuple[object, torch.Tensor]:
        with torch.inference_mode():
            platform.warm_up(self.device, lambda: self._forward(rows))
            graph = platform.new_graph(self.device)
            with platform.capturing(graph, self.device, pool):
                out = self._forward(rows)
        return graph, out

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        n = input_ids.shape[0]
        bucket = bucket_for(n, self.buckets)
        if bucket is None:
            return self.model(input_ids, positions, meta)
        padded = padded_decode_inputs(input_ids, positions, meta, bucket, self.pad_slot)
        for name, value in padded.items():
            target = self.static[name][:bucket]
            if name == "block_tables":
                target[:, value.shape[1] :] = 0
                target = target[:, : value.shape[1]]
            target.copy_(value)
        graph, out = self.graphs[bucket]
        self.steps += 1
        graph.replay()  # type: ignore[attr-defined]
        return out[:n]
