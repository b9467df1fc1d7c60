"""The native CPU kernels (xllm.ops) against plain torch, and the engine with and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy, make_engine, random_prompts, run_engine

import xllm.models.attention as attention
import xllm.models.layers as layers
from xllm.ops import fast_linear, kernels, pack_weight

native = kernels()
needs_native = pytest.mark.skipif(native is None, reason="native kernels could not be built here")
has_packed_linear = native is not None and (native.has_bf16_linear() or native.has_avx2_linear())
needs_packed_linear = pytest.mark.skipif(not has_packed_linear, reason="no AVX512-BF16 or AVX2")
needs_avx2_linear = pytest.mark.skipif(
    native is None or not native.has_avx2_linear(),
    reason="packed_bf16_linear is not the AVX2 kernel",
)


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
@pytest.mark.parametrize("batch", [1, 5, 16])
# Query heads per KV head even and odd (1 to 7); head dims on the vector paths (64, 128) and
# not (48).
@pytest.mark.parametrize(
    "heads, kv_heads, dim",
    [(8, 2, 64), (6, 2, 128), (4, 4, 48), (16, 8, 128), (6, 1, 64), (14, 2, 64)],
)
# 16 and 32: whole groups of 16 keys (the bf16 path's batched scores); 8: not.
@pytest.mark.parametrize("block", [16, 32, 8])
def test_paged_decode_attention_matches_sdpa(dtype, tol, batch, heads, kv_heads, dim, block):
    g = torch.Generator().manual_seed(batch)
    num_blocks = max(40, 7 * batch)
    k_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    lens = torch.randint(1, 7 * block, (batch,), generator=g)
    if batch > 1:  # contexts ending at, just past and just before a block's end
        lens[:4] = torch.tensor([block, 2 * block + 1, 3 * block - 1, 7 * block])
    tables = torch.randperm(num_blocks, generator=g)[: batch * 7].view(batch, 7)
    out = torch.empty_like(q)
    native.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, block, dim**-0.5)
    expected = reference_attention(q, k_cache, v_cache, tables, lens, block)
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@needs_native
@pytest.mark.parametrize("batch", [1, 16])
def test_paged_decode_attention_at_served_shape_matches_sdpa(batch):
    """Qwen3-0.6B's heads (16 q / 8 kv of 128, bf16) over contexts of ~576 tokens, at, just
    past and just before a block's end, in blocks scattered over the pool."""
    g = torch.Generator().manual_seed(576 + batch)
    block, per_seq = 16, 37
    num_blocks = batch * per_seq + 3
    k_cache = torch.randn(num_blocks * block, 8, 128, generator=g).bfloat16()
    v_cache = torch.randn(num_blocks * block, 8, 128, generator=g).bfloat16()
    q = torch.randn(batch, 16, 128, generator=g).bfloat16()
    lens = (576 + torch.arange(batch) % 3 - 1)[torch.randperm(batch, generator=g)]
    tables = torch.randperm(num_blocks, generator=g)[: batch * per_seq].view(batch, per_seq)
    out = torch.empty_like(q)
    native.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, block, 128**-0.5)
    expected = reference_attention(q, k_cache, v_cache, tables, lens, block)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@needs_packed_linear
@pytest.mark.parametrize("rows", [1, 2, 3, 12, 13, 40])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_bf16_linear_matches_float_reference(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 256, generator=g).bfloat16()
    # 304 columns = 19 blocks of 16: whole groups of column blocks and a ragged tail.
    w = (torch.randn(304, 256, generator=g) / 16).bfloat16()
    b = torch.randn(304, generator=g).bfloat16() if with_bias else None
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = native.packed_bf16_linear(x, pack_weight(w), 304, b).float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)


@needs_avx2_linear
# Rows: every micro-kernel (1, 2, 6 rows) and its tails; N: not a multiple of 16 (padded
# block) nor of 64 (the batch-1 kernel's groups); K: odd (padded pair), or one feature.
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 13, 64, 129])
@pytest.mark.parametrize("n, k", [(37, 33), (200, 1), (1040, 96)])
def test_avx2_linear_takes_odd_shapes(rows, n, k):
    g = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / 8).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    got = fast_linear(x, w, b, pack_weight(w))
    assert got is not None and got.shape == (rows, n)
    torch.testing.assert_close(
        got.float(), F.linear(x.float(), w.float(), b.float()), atol=2e-2, rtol=1e-2
    )


@needs_avx2_linear
def test_avx2_linear_rounds_like_torch():
    """Exact products (small integers) leave only the final bf16 rounding: it must be
    round-to-nearest-even, bit for bit what torch does to the float result."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-8, 8, (7, 64), generator=g).bfloat16()
    w = torch.randint(-8, 8, (48, 64), generator=g).bfloat16()
    expected = F.linear(x.float(), w.float()).bfloat16()
    assert torch.equal(native.packed_bf16_linear(x, pack_weight(w), 48, None), expected)


@needs_native
@pytest.mark.skipif(native is not None and not native.has_amx(), reason="no AMX-BF16")
@pytest.mark.parametrize("rows", [1, 16, 17, 40])
def test_amx_linear_over_packed_weights_matches_float_reference(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 256, generator=g).bfloat16()
    w = (torch.randn(96, 256, generator=g) / 16).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    got = native.amx_linear(x, pack_weight(w), 96, b).float()
    torch.testing.assert_close(got, F.linear(x.float(), w.float(), b.float()), atol=2e-2, rtol=1e-2)


@needs_native
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("dim", [64, 60, 48, 1024])  # on the vector paths (and tails) and not
def test_rms_norm_matches_reference(dtype, tol, dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, dim, generator=g).to(dtype)
    w = (1 + torch.randn(dim, generator=g) / 10).to(dtype)
    expected = F.rms_norm(x.float(), (dim,), w.float(), 1e-6)
    torch.testing.assert_close(native.rms_norm(x, w, 1e-6).float(), expected, atol=tol, rtol=tol)


needs_fused = pytest.mark.skipif(
    native is None or not native.has_fused_elementwise(), reason="no AVX-512F elementwise kernels"
)


def assert_rounds_like(got: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 results equal to the bit but for rare values one ulp apart (an exp or a sum of
    squares a float ulp off, next to a rounding tie)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    differ = got != expected
    assert differ.float().mean() < 1e-3, differ.float().mean()
    torch.testing.assert_close(got.float(), expected.float(), atol=0, rtol=2**-7)


@needs_fused
@pytest.mark.parametrize("rows, inter", [(1, 3072), (17, 48), (300, 1024)])
@pytest.mark.parametrize("strided", [False, True])
def test_silu_mul_rounds_like_torch(rows, inter, strided):
    g = torch.Generator().manual_seed(rows)
    wide = (torch.randn(rows, 2 * inter + 32, generator=g) * 4).bfloat16()
    x = wide[:, 16 : 16 + 2 * inter] if strided else wide[:, : 2 * inter].contiguous()
    gate, up = x.chunk(2, dim=-1)
    assert_rounds_like(layers.fast_silu_mul(x), F.silu(gate) * up)


def torch_norm_rotary(x, cos, sin, weight, eps):
    if weight is not None:
        x = native.rms_norm(x, weight, eps)  # the unfused path's norm (no fused kernel)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@needs_fused
@pytest.mark.parametrize("rows, heads, dim", [(1, 16, 128), (33, 8, 64), (300, 3, 128)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_norm_rotary_rounds_like_torch(rows, heads, dim, with_norm):
    g = torch.Generator().manual_seed(rows + dim)
    qkv = (torch.randn(rows, heads + 5, dim, generator=g) * 3).bfloat16()
    x = qkv[:, 2 : 2 + heads]  # a head slice of the fused projection: rows strided
    angles = torch.randn(rows, 1, dim // 2, generator=g).repeat(1, 1, 2) * 10
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    weight = (torch.rand(dim, generator=g) + 0.5).bfloat16() if with_norm else None
    got = layers.fast_norm_rotary(x, cos, sin, weight, 1e-6)
    assert got.is_contiguous()
    expected = torch_norm_rotary(x, cos, sin, weight, 1e-6)
    if with_norm:
        assert_rounds_like(got, expected)
    else:
        assert torch.equal(got, expected)  # no exp, no sum: exact


@needs_fused
def test_bf16_qwen3_engine_gives_the_same_tokens_with_and_without_fused_elementwise(
    tiny_model_dir, monkeypatch
):
    model_dir = tiny_model_dir("qwen3", "bfloat16")
    prompts = random_prompts([7, 40, 19], 4000, seed=13)
    fused = run_engine(make_engine(model_dir, dtype="bfloat16"), prompts, greedy(24))
    monkeypatch.setattr(layers, "fast_silu_mul", lambda *args: None)
    monkeypatch.setattr(layers, "fast_norm_rotary", lambda *args: None)
    unfused = run_engine(make_engine(model_dir, dtype="bfloat16"), prompts, greedy(24))
    assert fused == unfused


@needs_native
def test_engine_gives_the_same_tokens_with_and_without_native_kernels(tiny_model_dir, monkeypatch):
    model_dir = tiny_model_dir("qwen3")
    prompts = random_prompts([7, 40, 19], 4000, seed=11)
    with_native = run_engine(make_engine(model_dir), prompts, greedy(24))
    monkeypatch.setattr(attention, "kernels", lambda: None)
    monkeypatch.setattr(layers, "fast_linear", lambda *args: None)
    monkeypatch.setattr(layers, "fast_rms_norm", lambda *args: None)
    monkeypatch.setattr(layers, "fast_silu_mul", lambda *args: None)
    monkeypatch.setattr(layers, "fast_norm_rotary", lambda *args: None)
    without = run_engine(make_engine(model_dir), prompts, greedy(24))
    assert with_native == without


@needs_native
def test_bf16_engine_logits_with_native_kernels_are_as_close_to_fp32_as_torch_path(
    tiny_model_dir, monkeypatch
):
    """bfloat16 rounds differently per kernel, so neither path equals the other: each is
    measured against the same weights run in float32, and the native one must be no worse."""
    from test_engine_vs_hf import prompt_logits

    model_dir = tiny_model_dir("qwen2", "bfloat16")
    (prompt,) = random_prompts([33], 4000, seed=12)
    exact = prompt_logits(make_engine(model_dir, dtype="float32"), prompt).float()
    with_native = prompt_logits(make_engine(model_dir, dtype="bfloat16"), prompt).float()
    monkeypatch.setattr(attention, "kernels", lambda: None)
    monkeypatch.setattr(layers, "fast_linear", lambda *args: None)
    monkeypatch.setattr(layers, "fast_rms_norm", lambda *args: None)
    monkeypatch.setattr(layers, "fast_silu_mul", lambda *args: None)
    monkeypatch.setattr(layers, "fast_norm_rotary", lambda *args: None)
    without = prompt_logits(make_engine(model_dir, dtype="bfloat16"), prompt).float()
    native_error = (with_native - exact).abs().mean()
    torch_error = (without - exact).abs().mean()
    assert native_error < 1.2 * torch_error, (native_error, torch_error)
    assert (with_native.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


@needs_packed_linear  # prefill attention runs on the linear's micro-kernel
@pytest.mark.parametrize("length, context", [(1, 0), (13, 0), (40, 0), (7, 33), (30, 50)])
@pytest.mark.parametrize("heads, kv_heads, dim", [(8, 2, 64), (4, 4, 128)])
def test_prefill_attention_matches_causal_sdpa(length, context, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(length + context)
    total = context + length
    q = torch.randn(length, heads, dim, generator=g).bfloat16()
    # K/V as row views of a wider tensor, as the model hands them over (a fused qkv output).
    kv = torch.randn(total, 3, kv_heads, dim, generator=g).bfloat16()
    k, v = kv[:, 0], kv[:, 2]
    out = torch.empty_like(q)
    native.prefill_attention(out, q, k, v, context, dim**-0.5)
    allowed = torch.arange(total)[None, :] <= context + torch.arange(length)[:, None]
    expected = F.scaled_dot_product_attention(
        q.float().transpose(0, 1),
        k.float().transpose(0, 1),
        v.float().transpose(0, 1),
        attn_mask=allowed,
        enable_gqa=True,
    ).transpose(0, 1)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def reference_verify_attention(q, k_cache, v_cache, tables, lens, starts, block_size):
    """Per sequence: its rows attend to its context and causally to each other (SDPA, fp32)."""
    outs = []
    for b in range(len(lens)):
        n, total = int(starts[b + 1] - starts[b]), int(lens[b])
        slots = (tables[b][:, None] * block_size + torch.arange(block_size)).flatten()[:total]
        allowed = torch.arange(total)[None, :] <= total - n + torch.arange(n)[:, None]
        o = F.scaled_dot_product_attention(
            q[starts[b] : starts[b + 1]].float().transpose(0, 1),  # [H, n, D]
            k_cache[slots].float().transpose(0, 1),  # [Hkv, T, D]
            v_cache[slots].float().transpose(0, 1),
            attn_mask=allowed,
            enable_gqa=True,
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def verify_case(dtype, heads, kv_heads, dim, rows_per_seq, seed):
    """A random pool, block tables and, per sequence, `rows_per_seq[b]` rows ending its
    context (context lengths from one row up to a few blocks, some across block edges)."""
    g = torch.Generator().manual_seed(seed)
    block, num_blocks, width = 16, 48, 6
    k_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    lengths = torch.tensor(rows_per_seq)
    lens = lengths + torch.randint(
        0, width * block - int(lengths.max()), (len(lengths),), generator=g
    )
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    q = torch.randn(int(starts[-1]), heads, dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: len(lengths) * width].view(-1, width)
    return q, k_cache, v_cache, tables, lens, starts, block


@needs_native
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows_per_seq", [[5], [1, 5, 3], [2, 1, 8, 4, 5, 1]])
@pytest.mark.parametrize(
    "heads, kv_heads, dim", [(8, 2, 64), (6, 2, 128), (4, 4, 48), (16, 8, 128), (14, 2, 64)]
)
def test_paged_verify_attention_matches_causal_sdpa(dtype, tol, rows_per_seq, heads, kv_heads, dim):
    q, k_cache, v_cache, tables, lens, starts, block = verify_case(
        dtype, heads, kv_heads, dim, rows_per_seq, seed=len(rows_per_seq) + dim
    )
    out = torch.empty_like(q)
    native.paged_verify_attention(out, q, k_cache, v_cache, tables, lens, starts, block, dim**-0.5)
    expected = reference_verify_attention(q, k_cache, v_cache, tables, lens, starts, block)
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@needs_native
def test_paged_verify_attention_with_one_row_each_is_decode_attention():
    q, k_cache, v_cache, tables, lens, starts, block = verify_case(
        torch.bfloat16, 8, 2, 64, [1, 1, 1, 1], seed=3
    )
    verify, decode = torch.empty_like(q), torch.empty_like(q)
    native.paged_verify_attention(verify, q, k_cache, v_cache, tables, lens, starts, block, 0.125)
    native.paged_decode_attention(decode, q, k_cache, v_cache, tables, lens, block, 0.125)
    assert torch.equal(verify, decode)


@needs_native
def test_paged_verify_attention_rejects_rows_that_do_not_span_q():
    q, k_cache, v_cache, tables, lens, starts, block = verify_case(
        torch.float32, 4, 4, 48, [3, 2], seed=4
    )
    with pytest.raises(RuntimeError, match="query_starts"):
        native.paged_verify_attention(
            torch.empty_like(q), q, k_cache, v_cache, tables, lens, starts[:-1], block, 0.1
        )


def test_verify_attention_fallback_matches_causal_sdpa(monkeypatch):
    """The torch path PagedAttention takes where the native kernels are not built."""
    q, k_cache, v_cache, tables, lens, starts, block = verify_case(
        torch.float32, 8, 2, 64, [2, 1, 8, 4], seed=5
    )
    monkeypatch.setattr(attention, "kernels", lambda: None)
    layer = attention.PagedAttention(8, 2, 64)
    layer.k_cache, layer.v_cache = k_cache, v_cache
    out = layer._verify(q, attention.VerifyBatch(tables, lens, starts), block)
    expected = reference_verify_attention(q, k_cache, v_cache, tables, lens, starts, block)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@needs_native
def test_speculative_engine_verifies_the_same_with_and_without_native_kernels(
    loopy_model_dir, monkeypatch
):
    model_dir = loopy_model_dir("llama")
    options = {"speculative": "ngram", "speculative_adaptive": False}
    prompts = [random_prompts([12], 4000, seed=7)[0] * 3, *random_prompts([9, 30], 4000, seed=8)]
    with_native = make_engine(model_dir, **options)
    expected = run_engine(with_native, prompts, greedy(40))
    assert with_native.speculation_stats().num_accepted_draft_tokens > 0
    monkeypatch.setattr(attention, "kernels", lambda: None)
    assert run_engine(make_engine(model_dir, **options), prompts, greedy(40)) == expected
