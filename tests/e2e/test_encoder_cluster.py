"""Hybrid EPD on real processes, with the tiny Qwen2-VL (float32), driven with the `openai`
client, in every topology `xllm up` deploys:

    colocated  --instances 1                          the instance runs its own tower
    e_pd       --instances 1 --encode 1               an encoder service, one colocated instance
    ep_d       --prefill 1 --decode 1                 the prefill instance encodes its images
    ed_p       --prefill 1 --decode 1 --encode-on decode   the decode instance's tower encodes
    e_p_d      --prefill 1 --decode 1 --encode 1      an encoder service, prefill and decode apart

The same image chat gives the engine's own greedy tokens in each. Where an encode role
serves (an encoder service, or the decode instance's endpoint `decode-0-encode`): the
embeddings crossed Mooncake (bytes the encode role handed out == bytes each instance that
runs the prompt read == the images' tokens x hidden x 4); a second request with the same
images hits the encode role's cache and runs no tower batch; text requests never reach it;
and with an encoder service SIGKILLed mid-request the request completes all the same (the
instance encodes the file itself), as do image requests after it left the cluster view.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import openai
import pytest

from tests.e2e import image_chat
from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.engine.multimodal import random_image_bytes
from xllm.models.config import ModelConfig

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
SIZES = [(60, 90), (120, 50)]
"""6 and 8 image tokens with the tiny checkpoint's processor."""


@pytest.fixture(scope="module")
def model_dir(vl_model_dir):
    return vl_model_dir


TOPOLOGIES = {
    "colocated": {"instances": 1},
    "e_pd": {"instances": 1, "encode": 1},
    "ep_d": {"prefill": 1, "decode": 1},
    "ed_p": {"prefill": 1, "decode": 1, "encode_on": "decode"},
    "e_p_d": {"prefill": 1, "decode": 1, "encode": 1},
}
"""In E+P+D and ED+P the prefill and the decode instance each read the embeddings (the
decode side keeps them for a recompute)."""
ENCODE_ENDPOINT = {"e_pd": "encode-0", "ed_p": "decode-0-encode", "e_p_d": "encode-0"}
"""The instance id the encode role serves as, where one serves."""


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def cluster(request, model_dir, tmp_path_factory):
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        **TOPOLOGIES[request.param],
        log_dir=str(tmp_path_factory.mktemp("logs")),
        ready_timeout=180,
        stop_grace=5,
    )
    with serving_cluster(config, ["--num-kv-blocks", "256", "--dtype", "float32"]) as c:
        c.wait_ready(config.ready_timeout)
        yield c, config, request.param


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster[1].base_url, api_key="unused", max_retries=0)


def chat(client, parts):
    return image_chat.chat(client, parts, MAX_TOKENS)


def expected(engine, model_dir, parts, images):
    return image_chat.expected_text(engine, model_dir, parts, images, MAX_TOKENS)


def with_encoder(cluster, service_only: bool = False) -> str:
    """The encode endpoint of this topology's cluster (skip the test where none serves)."""
    topology = cluster[2]
    if topology not in ENCODE_ENDPOINT or (service_only and topology == "ed_p"):
        pytest.skip(f"{topology} has no {'encoder service' if service_only else 'encode role'}")
    return ENCODE_ENDPOINT[topology]


def stats(config) -> dict[str, dict]:
    url = config.base_url.removesuffix("/v1") + "/cluster"
    with urllib.request.urlopen(url) as r:
        instances = json.load(r)["instances"]
    return {i["role"]: i["encoder"] for i in instances}


def settled(config, **want) -> dict[str, dict]:
    """The stats once the heartbeats show `want` (role__field=value; role "prompt" = every
    instance that runs prompts), or fail with them."""
    deadline = time.monotonic() + 10
    seen = stats(config)
    while time.monotonic() < deadline:
        seen = stats(config)
        if all(
            all(s[field] == value for s in by_role(seen, role))
            for role, field, value in ((*k.split("__"), v) for k, v in want.items())
        ):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"stats never reached {want}: {seen}")


def by_role(seen: dict[str, dict], role: str) -> list[dict]:
    return [s for r, s in seen.items() if r != "encode"] if role == "prompt" else [seen[role]]


def test_the_same_image_chat_gives_the_engines_tokens_in_every_topology(
    cluster, client, vl_engine, model_dir
):
    config, topology = cluster[1], cluster[2]
    images = [random_image_bytes(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    parts = image_chat.image_parts(["Compare", images[0], "with", images[1]])
    want = expected(vl_engine, model_dir, parts, images)
    first = chat(client, parts)
    assert first.choices[0].message.content == want
    assert first.usage.completion_tokens == MAX_TOKENS
    # Another image order is another answer: the images (or embeddings) are really used.
    swapped = [parts[0], parts[3], parts[2], parts[1]]
    assert chat(client, swapped).choices[0].message.content != want
    if topology not in ENCODE_ENDPOINT:  # the instance that prefills ran the tower itself
        deadline = time.monotonic() + 10
        while not any(s["images_encoded"] >= 2 and s["batches"] for s in stats(config).values()):
            assert time.monotonic() < deadline, stats(config)
            time.sleep(0.2)
        assert "encode" not in stats(config)  # nothing encoded elsewhere
        return

    hidden = ModelConfig.from_dir(model_dir).hidden_size
    image_bytes = (6 + 8) * hidden * 4  # float32 rows of both images
    seen = settled(config, encode__cache_hits=2, prompt__bytes_fetched=2 * image_bytes)
    encoder = seen["encode"]  # both images encoded once, in one batch, then cached
    assert encoder["batches"] == 1 and encoder["images_encoded"] == 2
    assert encoder["bytes_published"] == 2 * image_bytes and encoder["encode_seconds"] > 0
    for instance in by_role(seen, "prompt"):
        assert instance["images_fetched"] == 4

    # The same images again: the cache answers, no tower batch runs, and each instance
    # reads the same bytes again (its output is the same).
    again = chat(client, parts)
    assert again.choices[0].message.content == want
    seen = settled(config, encode__cache_hits=4, prompt__bytes_fetched=3 * image_bytes)
    assert seen["encode"]["batches"] == 1 and seen["encode"]["images_encoded"] == 2
    assert seen["encode"]["bytes_published"] == 3 * image_bytes

    # The same counters on the gateway's /metrics, per instance.
    with urllib.request.urlopen(config.base_url.removesuffix("/v1") + "/metrics") as r:
        lines = r.read().decode().splitlines()
    hits = [line for line in lines if line.startswith("xllm_encoder_cache_hits{")]
    endpoint = ENCODE_ENDPOINT[topology]
    assert any(f'"{endpoint}"' in line and line.endswith(" 4") for line in hits), hits


def test_text_requests_skip_the_encoder(cluster, client):
    with_encoder(cluster)
    before = stats(cluster[1])["encode"]["cache_queries"]
    ok = chat(client, [{"type": "text", "text": "Just text"}])
    assert ok.usage.completion_tokens == MAX_TOKENS
    time.sleep(1.0)  # a few heartbeats: a query the encoder got would show by now
    assert stats(cluster[1])["encode"]["cache_queries"] == before


def test_a_sigkilled_encoder_costs_no_request(cluster, client, vl_engine, model_dir):
    endpoint = with_encoder(cluster, service_only=True)
    c, config = cluster[:2]  # last in the module: it leaves the cluster without its encoder
    images = [random_image_bytes(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES)]
    parts = image_chat.image_parts(["Describe", *images])
    want = expected(vl_engine, model_dir, parts, images)
    encoder = c.processes[endpoint]
    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(chat(client, parts).choices[0]
                              .message.content))  # fmt: skip
    worker.start()
    os.kill(encoder.pid, signal.SIGKILL)  # while the request is encoded, read or prefilled
    worker.join(timeout=120)
    assert results == [want]
    assert chat(client, parts).choices[0].message.content == want  # meanwhile, too

    # Once its heartbeats stop, the scheduler sends image requests colocated.
    deadline = time.monotonic() + 30
    while "encode" in stats(config):
        assert time.monotonic() < deadline, "the dead encoder stayed in the cluster view"
        time.sleep(0.5)
    fresh = [random_image_bytes(40, 40, seed=99)]
    parts = image_chat.image_parts(["And this?", fresh[0]])
    assert chat(client, parts).choices[0].message.content == expected(
        vl_engine, model_dir, parts, fresh
    )
