"""Speculative decoding through the whole cluster, colocated and PD-disaggregated.

Instances run with `--speculative ngram`, `suffix` or `draft` (always on, so the test is not
at the mercy of the adaptive switch) on the loop-prone tiny model, where prompt lookup and
the suffix trie find drafts the model keeps (the draft model: the same checkpoint, whose KV
the PD decode instance must catch up on, as it receives only the target's). Greedy outputs through the gateway equal the engine alone without speculation; the
decode instance of a PD pair is the one that speculates; kept drafts show in the usage and
in the heartbeat counters, and no KV block stays held afterwards.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request

import openai
import pytest

from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 2048
MAX_TOKENS = 48
# Each method under PD; ngram colocated too.
SETUPS = [("ngram", "colocated"), ("ngram", "1p1d"), ("suffix", "1p1d"), ("draft", "1p1d")]


@pytest.fixture(scope="module")
def model_dir(loopy_model_dir):
    return loopy_model_dir("qwen3")


@pytest.fixture(scope="module", params=SETUPS, ids=["-".join(s) for s in SETUPS])
def cluster(request, model_dir, tmp_path_factory):
    method, topology = request.param
    pd = topology == "1p1d"
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        prefill=1 if pd else 0,
        decode=1 if pd else 0,
        policy="round-robin",
        log_dir=str(tmp_path_factory.mktemp("logs")),
        ready_timeout=240,
        stop_grace=5,
    )
    speculative = ["--speculative", method, "--speculative-adaptive", "false"]
    if method == "draft":
        speculative += ["--draft-model", str(model_dir)]
    engine_args = ["--num-kv-blocks", "512", "--max-model-len", str(MAX_MODEL_LEN), *speculative]
    with serving_cluster(config, engine_args) as c:
        c.wait_ready(config.ready_timeout)
        yield config, pd, method


def instances(config) -> list[dict]:
    url = config.base_url.removesuffix("/v1") + "/cluster"
    with urllib.request.urlopen(url) as r:
        return json.load(r)["instances"]


def prompts(n: int) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(100, 3000) for _ in range(rng.randrange(5, 60))] for _ in range(n)]


def test_greedy_outputs_equal_the_engine_without_speculation(cluster, model_dir):
    from xllm.llm import LLM
    from xllm.protocol import SamplingParams

    config, pd, method = cluster
    batch = prompts(4)
    llm = LLM(str(model_dir), num_kv_blocks=512, max_model_len=MAX_MODEL_LEN)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    tokenizer = Tokenizer(model_dir)
    expected = [tokenizer.decode(r.outputs[0].token_ids) for r in llm.generate(batch, params)]
    client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    kept = 0
    for prompt, want in zip(batch, expected, strict=True):
        r = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert r.choices[0].text == want
        assert r.usage.completion_tokens == MAX_TOKENS
        details = r.usage.completion_tokens_details
        kept += details.accepted_prediction_tokens if details else 0
    assert kept > 0, "no draft was kept: the test compared nothing speculative"
    # Heartbeats are periodic: wait for ones sent after the last request finished.
    deadline = time.monotonic() + 15
    while True:
        seen = {i["role"]: i for i in instances(config)}
        speculated = seen["decode" if pd else "both"]
        settled = all(i["kv"]["blocks_used"] == 0 for i in seen.values())
        if (settled and speculated["speculation"]["num_accepted_draft_tokens"] > 0) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.3)
    assert settled, {role: i["kv"]["blocks_used"] for role, i in seen.items()}
    drafts = speculated["speculation"]
    assert drafts["num_accepted_draft_tokens"] > 0
    assert drafts["num_draft_tokens"] >= drafts["num_accepted_draft_tokens"]
    assert drafts["method"] == method
    if pd:
        assert (
            seen["prefill"]["speculation"]["num_draft_tokens"] == 0
        )  # prefill-only requests never draft
