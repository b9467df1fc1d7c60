"""`placement`: the decision the live scheduler and the simulator share, as pure functions
over hand-made cluster snapshots."""

from __future__ import annotations

from services.scheduler.cluster import ClusterSnapshot, InstanceView
from services.scheduler.placement import Note, Placement, Refusal, check, note, place
from services.scheduler.policies import PlacementRequest, least_load
from tests.scheduler.beats import heartbeat
from xllm.protocol import ErrorCode


def snapshot(*beats) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(InstanceView(b, 0.0) for b in beats))


def request(prompt: int = 100, max_tokens: int = 10, **fields) -> PlacementRequest:
    return PlacementRequest(
        request_id="r", num_prompt_tokens=prompt, max_tokens=max_tokens, **fields
    )


def test_check_names_what_is_missing():
    assert check("m", 100, snapshot(heartbeat("a"))) is None
    assert check("other", 100, snapshot(heartbeat("a"))) == Refusal(
        ErrorCode.NO_INSTANCE, "no live instance serves model 'other'"
    )
    too_long = check(None, 4096, snapshot(heartbeat("a", max_model_len=4096)))
    assert too_long is not None and too_long.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert not too_long.shed


def test_colocated_instances_take_the_whole_request():
    snap = snapshot(heartbeat("a", num_tokens_in_flight=50), heartbeat("b"))
    assert place(request(), snap, least_load) == Placement("b")


def test_without_colocated_instances_each_half_goes_to_its_role():
    snap = snapshot(heartbeat("p", "prefill"), heartbeat("d", "decode"))
    assert place(request(), snap, least_load) == Placement("d", prefill_instance_id="p")


def test_a_missing_half_refuses_the_request():
    decision = place(request(), snapshot(heartbeat("p", "prefill")), least_load)
    assert decision == Refusal(ErrorCode.NO_INSTANCE, "no instance can serve this request")


def test_slo_admission_sheds_online_work_only():
    busy = heartbeat(
        "a", num_prefill_backlog_tokens=50_000, prefill_tokens=10_000, prefill_seconds=10.0
    )
    targets = dict(slo_ttft=2.0, admission_margin=1.5)
    online = place(request(**targets), snapshot(busy), least_load)
    assert isinstance(online, Refusal) and online.shed
    assert place(request(priority=1, **targets), snapshot(busy), least_load) == Placement("a")


def test_the_note_counts_what_each_instance_computes():
    hits = {"p": 64, "d": 96}
    req = request(prompt=100, max_tokens=10, prefix_hits=hits)
    assert note(req, Placement("a")) == Note((("a", 100 + 10),), output_tokens=10)
    noted = note(req, Placement("d", prefill_instance_id="p"))
    assert noted == Note((("p", 36), ("d", 4 + 10)), output_tokens=10)
    assert noted.holders == ("p", "d")
    assert (noted.outputs_on("p"), noted.outputs_on("d")) == (0, 10)
