"""Helpers for engine tests: run prompts through our engine and through transformers."""

from __future__ import annotations

import pytest
import torch

from xllm.config import EngineConfig
from xllm.engine.engine import Engine
from xllm.protocol.types import SamplingParams

ARCHS = ("llama", "qwen2", "qwen3")
MOE_ARCHS = ("qwen2-moe", "qwen3-moe")


ENGINE_OPTIONS: dict[str, object] = {}
"""Options every `make_engine` of the running test gets, unless it passes its own (set by
the `overlap` fixture)."""


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def overlap(request):
    """Run the test twice: with synchronous steps and with --async-scheduling (a module
    takes it for all its tests with `pytestmark = pytest.mark.usefixtures("overlap")`)."""
    ENGINE_OPTIONS["async_scheduling"] = request.param
    yield request.param
    del ENGINE_OPTIONS["async_scheduling"]


def make_engine(model_dir, **options) -> Engine:
    options = {**ENGINE_OPTIONS, **options}
    options.setdefault("dtype", "float32")
    options.setdefault("num_kv_blocks", 256)
    return Engine(EngineConfig(model=str(model_dir), **options))


def run_engine(
    engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
):
    """Submit all prompts at once, step to completion; returns {request_id: [token ids]}
    (request ids are "0", "1", ... in prompt order; for n > 1, "i/k" per completion)."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
        engine.add_request(str(i), prompt, p)
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            key = delta.request_id if delta.index == 0 else f"{delta.request_id}/{delta.index}"
            outputs.setdefault(key, []).extend(delta.token_ids)
    return outputs


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def run_one(engine, request_id: str, prompt: list[int]) -> tuple[list[int], int]:
    """One request alone to completion, greedy, 4 tokens: (its tokens, its prompt tokens
    served from cache)."""
    engine.add_request(request_id, prompt, greedy(4))
    tokens, cached = [], 0
    while engine.has_unfinished():
        for delta in engine.step():
            tokens += delta.token_ids
            cached = delta.num_cached_tokens
    return tokens, cached


@pytest.fixture(scope="session")
def hf_model():
    """hf_model(model_dir) -> the transformers model on the same weights (float32), cached."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def load(model_dir):
        if model_dir not in cache:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            # Our runs use ignore_eos; generate() would otherwise stop at the config's EOS.
            model.generation_config.eos_token_id = None
            cache[model_dir] = model
        return cache[model_dir]

    return load


def hf_greedy(model, prompt: list[int], max_tokens: int, **generate_kwargs) -> list[int]:
    """transformers' greedy generate, EOS disabled (our runs use ignore_eos)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        **generate_kwargs,
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt) :].tolist()


def assert_greedy_matches(model, prompt: list[int], ours: list[int], max_tokens: int) -> None:
    """Our greedy tokens equal transformers' token for token.

    One exception, as in vLLM's comparison rule: where transformers' top two logits tie
    within float32 noise (|gap| < 1e-4), either choice is right, so the sequences must
    agree up to that position, differ only between the tied tokens, and are not compared
    after it (they continue from different prefixes).
    """
    theirs = hf_greedy(model, prompt, max_tokens)
    if ours == theirs:
        return
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    assert k is not None, f"lengths differ: {len(ours)} vs {len(theirs)}"
    with torch.no_grad():
        logits = model(torch.tensor([prompt + theirs[:k]])).logits[0, -1].float()
    gap = (logits[theirs[k]] - logits[ours[k]]).abs().item()
    assert gap < 1e-4, (
        f"diverged at token {k}: ours {ours[k]}, transformers {theirs[k]} (gap {gap:.3g})"
    )


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def handed_over(
    prefill: Engine, decode: Engine, prompt: list[int], params: SamplingParams, images=None
) -> tuple[object, list[int]]:
    """A PD handoff between two engines of one process: `prefill` computes the prompt and
    samples the first token, its KV is copied block by block into `decode`'s reservation
    (as Mooncake writes it between instances), and `decode` runs the rest. Returns what
    `commit_remote_prefill` said (the finish reason, if the first token ended it) and every
    output token. `images`: the prompt's images (both sides get them, as both get the
    request)."""
    prefill.add_request("r", prompt, params, prefill_only=True, images=images)
    (first,) = prefill.step()
    reservation = decode.reserve_remote_prefill("r", prompt, params, images=images)
    bs = prefill.config.block_size
    source, target = prefill.runner.kv_cache.tensor, decode.runner.kv_cache.tensor
    for src, dst in zip(prefill.prefilled_block_ids("r"), reservation.fill_block_ids, strict=True):
        target[:, :, dst * bs : (dst + 1) * bs] = source[:, :, src * bs : (src + 1) * bs]
    prefill.release_prefilled("r")
    committed = decode.commit_remote_prefill("r", first.token_ids[0])
    tokens = list(first.token_ids)
    while decode.has_unfinished():
        tokens += [t for out in decode.step() for t in out.token_ids]
    return committed, tokens
