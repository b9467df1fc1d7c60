"""The EPD profiler's serving-CPU calibration on a real colocated cluster (`xllm up`'s
processes: nats-server, valkey, scheduler, one Qwen2-VL instance, gateway): it finds the
processes through the gateway's /cluster, and what it measures is there — the front spends
CPU on every request, the instance's loop on its requests and tokens."""

from __future__ import annotations

import math

import pytest

from services.scheduler.sim.epd_serving_cpu import calibrate_gateway
from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster

pytestmark = pytest.mark.slow


def test_calibration_measures_the_front_and_the_instance_loop(vl_model_dir, tmp_path):
    config = ClusterConfig(
        model=str(vl_model_dir), host="127.0.0.1", port=free_port(), instances=1,
        log_dir=str(tmp_path / "logs"), ready_timeout=180, stop_grace=5,
    )  # fmt: skip
    cluster = serving_cluster(config, ["--num-kv-blocks", "256", "--dtype", "float32"])
    lines = []
    try:
        cluster.start()
        cluster.wait_ready(config.ready_timeout)
        # 8 requests a burst: the front is read in 10 ms ticks, and 3 came within their noise
        cpu = calibrate_gateway(config.base_url, 60, 90, requests=8, log=lines.append)
    finally:
        cluster.stop()
    values = [getattr(cpu, f) for f in cpu.__slots__]
    assert all(math.isfinite(v) and v >= 0 for v in values), cpu
    assert cpu.front_request > 0  # gateway, scheduler, client: every request costs them
    assert cpu.instance_request + cpu.instance_token > 0  # the loop's main thread, to the ns
    assert cpu.encoder_request == cpu.instance_request  # no encoder: an instance's stands in
    assert any("short burst" in line for line in lines)
