"""Hybrid EPD on real processes: `xllm up --instances 1 --encode 1` (E+PD) and `xllm up
--prefill 1 --decode 1 --encode 1` (E+P+D) with the tiny Qwen2-VL (float32), driven with
the `openai` client.

The same image chat gives the engine's own greedy tokens (the colocated path: the engine
alone runs its vision tower; `test_image_cluster` shows the colocated cluster equals it);
the embeddings crossed Mooncake (bytes the encoder handed out == bytes the instance read ==
the images' tokens x hidden x 4, on every instance that read them); a second request with the same images hits the encoder's
cache and runs no tower batch; text requests never reach the encoder; and with the encoder
SIGKILLed mid-request the request completes all the same (the instance encodes the file
itself), as do image requests after it left the cluster view.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
import urllib.request

import openai
import pytest

from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.engine.multimodal import random_image_bytes
from xllm.models.config import ModelConfig

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
SIZES = [(60, 90), (120, 50)]
"""6 and 8 image tokens with the tiny checkpoint's processor."""


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen2-vl", "float32")


TOPOLOGIES = {"e_pd": {"instances": 1}, "e_p_d": {"prefill": 1, "decode": 1}}
"""E+PD: one colocated instance; E+P+D: the prefill and the decode instance each read the
embeddings (the decode side keeps them for a recompute)."""


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def cluster(request, model_dir, tmp_path_factory):
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        encode=1,
        **TOPOLOGIES[request.param],
        log_dir=str(tmp_path_factory.mktemp("logs")),
        ready_timeout=180,
        stop_grace=5,
    )
    with serving_cluster(config, ["--num-kv-blocks", "256", "--dtype", "float32"]) as c:
        c.wait_ready(config.ready_timeout)
        yield c, config


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster[1].base_url, api_key="unused", max_retries=0)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(client, parts):
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": parts}], max_tokens=MAX_TOKENS,
        temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip


def engine_alone(model_dir, parts, images: list[bytes]) -> list[int]:
    """Greedy tokens of our Engine in this process (vision tower included) for the chat."""
    from xllm.config import EngineConfig
    from xllm.engine.engine import Engine
    from xllm.engine.multimodal import ImageInput
    from xllm.protocol.types import SamplingParams
    from xllm.tokenizer import Tokenizer

    engine = Engine(EngineConfig(model=str(model_dir), dtype="float32", num_kv_blocks=256))
    tokenizer = Tokenizer(model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    inputs = [ImageInput.from_bytes(data, engine.image_processor) for data in images]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    engine.add_request("alone", prompt, params, images=inputs)
    tokens: list[int] = []
    while engine.has_unfinished():
        for delta in engine.step():
            tokens.extend(delta.token_ids)
    return tokens


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


def test_encoded_elsewhere_equals_colocated_and_reuses_cached_embeddings(
    cluster, client, model_dir
):
    config = cluster[1]
    images = [random_image_bytes(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    parts = [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": data_url(images[0])}},
        {"type": "text", "text": "with"},
        {"type": "image_url", "image_url": {"url": data_url(images[1])}},
    ]
    from xllm.tokenizer import Tokenizer

    expected = Tokenizer(model_dir).decode(engine_alone(model_dir, parts, images))
    first = chat(client, parts)
    assert first.choices[0].message.content == expected
    assert first.usage.completion_tokens == MAX_TOKENS

    hidden = ModelConfig.from_dir(model_dir).hidden_size
    image_bytes = (6 + 8) * hidden * 4  # float32 rows of both images
    seen = settled(config, encode__batches=1, prompt__bytes_fetched=image_bytes)
    encoder = seen["encode"]
    assert encoder["images_encoded"] == 2 and encoder["cache_hits"] == 0
    assert encoder["bytes_published"] == image_bytes
    for instance in by_role(seen, "prompt"):
        assert instance["bytes_fetched"] == image_bytes and instance["images_fetched"] == 2
    assert encoder["encode_seconds"] > 0

    # The same images again: the encoder's cache answers, no tower batch runs, and the
    # instance reads the same bytes again (its output is the same).
    again = chat(client, parts)
    assert again.choices[0].message.content == expected
    seen = settled(config, encode__cache_hits=2, prompt__bytes_fetched=2 * image_bytes)
    assert seen["encode"]["batches"] == 1 and seen["encode"]["images_encoded"] == 2
    assert seen["encode"]["bytes_published"] == 2 * image_bytes

    # Another image order is another answer: the embeddings are really used.
    swapped = [parts[0], parts[3], parts[2], parts[1]]
    assert chat(client, swapped).choices[0].message.content != expected
    settled(config, encode__cache_hits=4)  # both images cached by now

    # The same counters on the gateway's /metrics, per instance.
    with urllib.request.urlopen(config.base_url.removesuffix("/v1") + "/metrics") as r:
        lines = r.read().decode().splitlines()
    hits = [line for line in lines if line.startswith("xllm_encoder_cache_hits{")]
    assert any('"encode-0"' in line and line.endswith(" 4") for line in hits), hits


def test_text_requests_skip_the_encoder(cluster, client):
    before = stats(cluster[1])["encode"]["cache_queries"]
    ok = chat(client, [{"type": "text", "text": "Just text"}])
    assert ok.usage.completion_tokens == MAX_TOKENS
    time.sleep(1.0)  # a few heartbeats: a query the encoder got would show by now
    assert stats(cluster[1])["encode"]["cache_queries"] == before


def test_a_sigkilled_encoder_costs_no_request(cluster, client, model_dir):
    c, config = cluster  # last in the module: it leaves the cluster without its encoder
    images = [random_image_bytes(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES)]
    parts = [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": data_url(images[0])}},
        {"type": "image_url", "image_url": {"url": data_url(images[1])}},
    ]
    from xllm.tokenizer import Tokenizer

    expected = Tokenizer(model_dir).decode(engine_alone(model_dir, parts, images))
    encoder = c.processes["encode-0"]
    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(chat(client, parts).choices[0]
                              .message.content))  # fmt: skip
    worker.start()
    os.kill(encoder.pid, signal.SIGKILL)  # while the request is encoded, read or prefilled
    worker.join(timeout=120)
    assert results == [expected]
    assert chat(client, parts).choices[0].message.content == expected  # meanwhile, too

    # Once its heartbeats stop, the scheduler sends image requests colocated.
    deadline = time.monotonic() + 30
    while "encode" in stats(config):
        assert time.monotonic() < deadline, "the dead encoder stayed in the cluster view"
        time.sleep(0.5)
    fresh = [random_image_bytes(40, 40, seed=99)]
    parts = [{"type": "text", "text": "And this?"},
             {"type": "image_url", "image_url": {"url": data_url(fresh[0])}}]  # fmt: skip
    expected = Tokenizer(model_dir).decode(engine_alone(model_dir, parts, fresh))
    assert chat(client, parts).choices[0].message.content == expected
