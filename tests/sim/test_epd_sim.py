"""Multimodal requests in the simulator, on hand-checkable cases: where the encode cost lands
in each topology (an instance's step, an encoder, a decode instance's steps), the embedding
transfer, the encoder's cache, the instance's prefix cache on a repeated image, and the
per-step encode budget."""

from __future__ import annotations

import itertools

import pytest

from services.scheduler.cost_model import StepShape, load_model_config, step_time
from services.scheduler.policies import get_policy
from services.scheduler.sim.epd_choice import Topology, simulate
from services.scheduler.sim.epd_profile import EncodeCost, EpdProfile
from services.scheduler.sim.epd_sim import EpdSimulator, ImageSimRequest
from services.scheduler.sim.epd_workload import ImageRequest
from services.scheduler.sim.instance import InstanceSpec
from services.scheduler.sim.report import Slo
from services.scheduler.sim.simulator import ClusterSpec
from xllm.hardware import SPEC_PROFILES

MODEL = load_model_config("qwen3-0.6b")
HW = SPEC_PROFILES["a100"]
SPEC = InstanceSpec(num_kv_blocks=4096, block_size=16, max_num_batched_tokens=2048)
ENCODE = EncodeCost(((64, 0.020), (256, 0.080)), call_overhead=0.005, bytes_per_token=4096)
IMAGE = 256  # tokens: 5 + 80 = 85 ms a tower call of one image
PROMPT = IMAGE + 12


def run(requests, roles, encoders=0, encode_on="", max_encode_batch=0):
    sim = EpdSimulator(
        MODEL, HW, ClusterSpec(tuple(roles), SPEC), get_policy("round-robin"),
        encode=ENCODE, num_encoders=encoders, encode_on=encode_on,
        max_encode_batch=max_encode_batch,
    )  # fmt: skip
    return sim.run(requests), sim


def image_req(i, arrival=0.0, image_id=None, output=5):
    image_id = i if image_id is None else image_id
    return ImageSimRequest(f"r{i}", arrival, PROMPT, output, image_tokens=IMAGE,
                           image_id=image_id)  # fmt: skip


def prefill_seconds(tokens=PROMPT, ctx=0):
    shape = StepShape(prefill_chunks=((tokens, ctx),), num_prefill_samples=1)
    return step_time(MODEL, shape, HW)


def transfer_seconds(tokens=IMAGE):
    return HW.transfer_latency + tokens * ENCODE.bytes_per_token / HW.interconnect_bw


def test_colocated_the_prefill_step_also_runs_the_tower():
    (r,), _ = run([image_req(0)], ["both"])
    assert r.first_token_at == pytest.approx(prefill_seconds() + ENCODE.batch_seconds([IMAGE]))


def test_on_an_encoder_the_prefill_waits_for_the_tower_and_the_embeddings_transfer():
    (r,), sim = run([image_req(0)], ["both"], encoders=1)
    want = ENCODE.batch_seconds([IMAGE]) + transfer_seconds() + prefill_seconds()
    assert r.first_token_at == pytest.approx(want)
    assert sim.encoder_stats()["images_encoded"] == 1


def test_an_encoder_batches_waiting_images_and_its_cache_skips_a_repeated_one():
    reqs = [image_req(0), image_req(1), image_req(2), image_req(3, arrival=1.0, image_id=0)]
    done, sim = run(reqs, ["both", "both"], encoders=1)
    stats = sim.encoder_stats()
    # r0 alone in the first call; r1 and r2 queued meanwhile share the second
    assert stats["batches"] == 2 and stats["images_encoded"] == 3
    assert stats["cache_hit_rate"] == pytest.approx(1 / 4)
    first = ENCODE.batch_seconds([IMAGE])
    second = first + ENCODE.batch_seconds([IMAGE, IMAGE])
    assert done[2].first_token_at > second  # after the batched call, its transfer and prefill
    r3 = done[3]  # cached: only the transfer before its prefill
    assert r3.first_token_at - r3.arrival < first


def test_colocated_a_repeated_image_hits_the_prefix_cache_and_is_not_encoded_again():
    (a, b), _ = run([image_req(0), image_req(1, arrival=5.0, image_id=0)], ["both"])
    ttft_a, ttft_b = a.first_token_at - a.arrival, b.first_token_at - b.arrival
    assert b.num_cached_tokens == IMAGE  # the image's whole 16-token blocks
    assert ttft_b == pytest.approx(prefill_seconds(PROMPT - IMAGE, IMAGE))
    assert ttft_a - ttft_b > ENCODE.batch_seconds([IMAGE])


def test_ep_d_encodes_on_the_prefill_instance():
    (r,), sim = run([image_req(0)], ["prefill", "decode"])
    assert r.instance_id == "inst-000" and r.decode_instance_id == "inst-001"
    prefill = prefill_seconds() + ENCODE.batch_seconds([IMAGE])
    assert r.first_token_at == pytest.approx(prefill)
    assert sim.instances[1].busy_time < sim.instances[0].busy_time


def test_ed_p_encodes_in_the_decode_instances_steps_at_most_the_budget_per_step():
    done, sim = run([image_req(i) for i in range(4)], ["prefill", "decode"],
                    encode_on="decode", max_encode_batch=1)  # fmt: skip
    one = ENCODE.batch_seconds([IMAGE])
    # one image a step on the decode instance: the fourth is ready after four steps
    assert sim.encoder_stats()["batches"] == 4
    assert done[3].first_token_at > 4 * one
    batched, sim2 = run([image_req(i) for i in range(4)], ["prefill", "decode"],
                        encode_on="decode", max_encode_batch=4)  # fmt: skip
    assert sim2.encoder_stats()["batches"] == 2  # r0 alone (the others arrive after), then 3
    assert batched[3].first_token_at < done[3].first_token_at


def test_ed_p_encodes_lengthen_the_running_decodes():
    def reqs():  # the text one decodes on the decode instance while images arrive
        text = ImageSimRequest("t", 0.0, 64, 40)
        return [text, *(image_req(i, arrival=0.05 + 0.01 * i) for i in range(6))]

    (t, *_), _ = run(reqs(), ["prefill", "decode"], encode_on="decode", max_encode_batch=1)
    (t2, *_), _ = run(reqs(), ["prefill", "decode"])  # EP+D: encodes on the prefill side
    assert t.finished_at - t.first_token_at > t2.finished_at - t2.first_token_at + 5 * 0.08


def test_simulate_a_topology_from_a_profile():
    profile = EpdProfile(
        model="m", tpot_slo=0.05, decode_batch=8, decode_ctx=128, decode_step=0.01,
        image_tokens=IMAGE, max_encode_batch=2, max_encode_tokens=2 * IMAGE,
        max_prefill_tokens=900, encode=ENCODE,
    )  # fmt: skip
    workload = [ImageRequest(0.02 * i, 480, 640, i % 5, IMAGE, 8) for i in range(20)]
    slo = Slo(ttft=1.0, tpot=0.05)
    for top in (Topology("EPD", both=3), Topology("E+P+D", 1, 1, 1), Topology("ED+P", 0, 1, 2)):
        rep, enc = simulate(top, workload, "qwen3-0.6b", HW, profile, slo, SPEC)
        assert rep.num_requests == 20 and rep.num_rejected == 0 and rep.num_instances == 3
        assert rep.policy == top.label
        assert enc["encoders"] == top.encode + (2 if top.kind == "ED+P" else 0)


def test_closed_loop_sends_each_request_when_one_in_flight_is_done():
    reqs = [image_req(i, arrival=100.0 + i) for i in range(5)]  # arrivals ignored
    sim = EpdSimulator(MODEL, HW, ClusterSpec(("both",), SPEC), get_policy("round-robin"),
                       encode=ENCODE)  # fmt: skip
    done = sim.run_closed(reqs, concurrency=2)
    assert [r.arrival for r in done[:2]] == [0.0, 0.0]
    finishes = sorted(r.finished_at for r in done[:2])
    assert done[2].arrival == pytest.approx(finishes[0])  # the first one done frees a slot
    assert all(r.finished_at is not None for r in done)
    assert all(b.arrival >= a.arrival for a, b in itertools.pairwise(done))
