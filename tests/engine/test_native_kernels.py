"""The native CPU kernels (xllm.ops) against plain torch, and the engine with and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy, make_engine, random_prompts, run_engine

import xllm.models.attention as attention
import xllm.models.layers as layers
from xllm.ops import kernels

native = kernels()
needs_native = pytest.mark.skipif(native is None, reason="native kernels could not be built here")


def reference_attention(q, k_cache, v_cache, tables, lens, block_size):
    outs = []
    for b in range(q.shape[0]):
        slots = (tables[b][:, None] * block_size + torch.arange(block_size)).flatten()[: lens[b]]
        k = k_cache[slots].float().transpose(0, 1)  # [Hkv, T, D]
        v = v_cache[slots].float().transpose(0, 1)
        o = F.scaled_dot_product_attention(q[b].float()[:, None, :], k, v, enable_gqa=True)
        outs.append(o[:, 0])
    return torch.stack(outs)


@needs_native
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 5])
def test_paged_decode_attention_matches_sdpa(dtype, tol, batch):
    g = torch.Generator().manual_seed(batch)
    heads, kv_heads, dim, block = 8, 2, 64, 16
    num_blocks = 40
    k_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    lens = torch.randint(1, 7 * block, (batch,), generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: batch * 7].view(batch, 7)
    out = torch.empty_like(q)
    native.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, block, dim**-0.5)
    expected = reference_attention(q, k_cache, v_cache, tables, lens, block)
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@needs_native
@pytest.mark.skipif(native is not None and not native.has_bf16_linear(), reason="no AVX512-BF16")
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_bf16_linear_matches_float_reference(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 256, generator=g).bfloat16()
    w = (torch.randn(258, 256, generator=g) / 16).bfloat16()  # 258: a ragged last row tile
    b = torch.randn(258, generator=g).bfloat16()
    expected = F.linear(x.float(), w.float(), b.float())
    got = native.bf16_linear(x, w, b).float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)


@needs_native
def test_engine_gives_the_same_tokens_with_and_without_native_kernels(tiny_model_dir, monkeypatch):
    model_dir = tiny_model_dir("qwen3")
    prompts = random_prompts([7, 40, 19], 4000, seed=11)
    with_native = run_engine(make_engine(model_dir), prompts, greedy(24))
    monkeypatch.setattr(attention, "kernels", lambda: None)
    monkeypatch.setattr(layers, "fast_linear", lambda x, w, b: None)
    without = run_engine(make_engine(model_dir), prompts, greedy(24))
    assert with_native == without
