"""Embedded NATS/Valkey servers, the process supervisor and the `xllm up` topology.

The servers are real (nats-py and redis clients talk to them); the supervised children are
small `python -c` programs, so no service needs to exist for these tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nats
import pytest
import redis

from xllm.cli import main as cli_main
from xllm.cli.cluster import (
    ChildExited,
    Cluster,
    ClusterConfig,
    EmbeddedServerError,
    ProcessSpec,
    RestartPolicy,
    demo_model,
    free_port,
    service_specs,
    serving_cluster,
    start_nats,
    start_valkey,
)
from xllm.cli.cluster.topology import has_service


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except OSError:
        return True
    return False


# --------------------------------------------------------------------------------------------
# Embedded servers


async def test_nats_pubsub_and_jetstream(nats_url):
    assert not nats_url.endswith(":4222")  # a system nats-server may own the default port
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.subscribe("embedded.ping")
        await nc.publish("embedded.ping", b"hello")
        assert (await sub.next_msg(timeout=2)).data == b"hello"

        js = nc.jetstream()
        await js.add_stream(name="EMBEDDED_TEST", subjects=["embedded.js.>"])
        try:
            ack = await js.publish("embedded.js.one", b"durable")
            assert ack.stream == "EMBEDDED_TEST"
            psub = await js.pull_subscribe("embedded.js.>", durable="reader")
            [msg] = await psub.fetch(1, timeout=2)
            assert msg.data == b"durable"
            await msg.ack()
        finally:
            await js.delete_stream("EMBEDDED_TEST")
    finally:
        await nc.close()


def test_valkey_set_get(redis_url):
    assert redis_url.startswith("redis://127.0.0.1:") and redis_url.endswith("/0")
    assert not redis_url.endswith(":6379/0")
    client = redis.Redis.from_url(redis_url)
    try:
        client.set("embedded:key", "value")
        assert client.get("embedded:key") == b"value"
        assert client.config_get("save") == {"save": ""}  # nothing persisted
        assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        client.close()


def test_stop_really_stops():
    nats_server, valkey = start_nats(), start_valkey()
    for server in (nats_server, valkey):
        assert server.is_running() and not _refuses(server.port)
        server.stop()
        server.stop()  # idempotent
        assert server.process.returncode is not None
        assert _refuses(server.port)
        assert not server.workdir.exists()


def test_start_failure_shows_the_server_log():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match=r"(?i)address already in use"):
            start_nats(port=port)


def _alive(pid: int) -> bool:
    """Running, not just a zombie nobody reaped yet (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_with_its_starter():
    starter = subprocess.Popen([sys.executable, "-c", _STARTER], stdout=subprocess.PIPE, text=True)
    try:
        pid, workdir = starter.stdout.readline().split()
        assert _alive(int(pid))
    finally:
        starter.kill()  # no chance to stop anything
        starter.wait()
    deadline = time.monotonic() + 10
    while _alive(int(pid)):
        assert time.monotonic() < deadline, "nats-server outlived the process that started it"
        time.sleep(0.05)
    shutil.rmtree(workdir)  # what stop() would have removed


_STARTER = (
    "import time; from xllm.cli.cluster import start_nats; s = start_nats(); "
    "print(s.process.pid, s.workdir, flush=True); time.sleep(60)"
)


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# --------------------------------------------------------------------------------------------
# Cluster supervision, with harmless children

# Records, when SIGTERMed, its name and whether NATS still answered at that moment.
_RECORDER = textwrap.dedent(
    """
    import os, signal, socket, sys, time
    from urllib.parse import urlparse
    name, record = sys.argv[1], sys.argv[2]
    def on_term(*_):
        url = urlparse(os.environ["XLLM_NATS_URL"])
        try:
            socket.create_connection((url.hostname, url.port), timeout=1).close()
            state = "nats-up"
        except OSError:
            state = "nats-down"
        with open(record, "a") as f:
            f.write(f"{name} {state}\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("started", name, os.environ["XLLM_REDIS_URL"], os.environ.get("EXTRA"), flush=True)
    time.sleep(60)
    """
)


def _python(name: str, code: str, *args: str, **env: str) -> ProcessSpec:
    return ProcessSpec(name, [sys.executable, "-c", code, *args], env)


def _sleeper(name: str) -> ProcessSpec:
    return _python(name, "import time; print('started', flush=True); time.sleep(60)")


def _wait_for_log(cluster: Cluster, name: str, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in cluster.log_path(name).read_text():
        assert time.monotonic() < deadline, f"{name} never logged {text!r}"
        time.sleep(0.02)


def test_cluster_env_logs_and_stop_order(tmp_path):
    record = tmp_path / "stopped.txt"
    specs = [
        _python("first", _RECORDER, "first", str(record)),
        _python("second", _RECORDER, "second", str(record), EXTRA="per-child"),
    ]
    cluster = Cluster(specs, log_dir=tmp_path / "logs", env={"XLLM_MODEL": "m"})
    with cluster:
        servers = cluster.servers
        for name in ("first", "second"):
            _wait_for_log(cluster, name, "started")
        cluster.wait_ready(timeout=5)  # no health URL: ready while all children run
        cluster.wait(timeout=0.2)  # nothing exits
        assert cluster.redis_url in cluster.log_path("first").read_text()
        assert "per-child" in cluster.log_path("second").read_text()
    # Newest child first, and NATS still up while the children stop.
    assert record.read_text().splitlines() == ["second nats-up", "first nats-up"]
    assert all(p.returncode == 0 for p in cluster.processes.values())
    assert [s.name for s in servers] == ["nats-server", "valkey"]
    assert all(not s.is_running() for s in servers)
    assert (tmp_path / "logs" / "nats-server.log").is_file()


def test_child_exit_is_reported_with_its_log(tmp_path):
    crash = _python("crasher", "import sys, time; time.sleep(0.3); print('boom'); sys.exit(3)")
    cluster = Cluster([_sleeper("steady"), crash], log_dir=tmp_path, embedded_servers=False)
    with cluster, pytest.raises(ChildExited) as info:
        cluster.wait(timeout=20)
    assert (info.value.name, info.value.returncode) == ("crasher", 3)
    assert "boom" in info.value.log_tail and "code 3" in str(info.value)
    assert cluster.processes["steady"].returncode is not None  # stopped along with the rest


def test_wait_ready_polls_health(tmp_path):
    port = free_port()
    (tmp_path / "www").mkdir()
    # GET /health answers 200 with this body, as the gateway's does with one live instance.
    (tmp_path / "www" / "health").write_text('{"status": "ok", "instances": 1}')
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    server = ProcessSpec("http", [*argv, "--directory", str(tmp_path / "www")])
    health = f"http://127.0.0.1:{port}/health"
    cluster = Cluster(
        [server], log_dir=tmp_path / "logs", health_url=health, instances=1, embedded_servers=False
    )
    with cluster:
        cluster.wait_ready(timeout=20)
        cluster.instances = 2  # one instance is still loading: not ready
        with pytest.raises(TimeoutError, match="with 2 instances"):
            cluster.wait_ready(timeout=0.5)


def test_wait_ready_timeout_names_the_logs(tmp_path):
    health = f"http://127.0.0.1:{free_port()}/health"  # nobody listens there
    cluster = Cluster(
        [_sleeper("idle")], log_dir=tmp_path, health_url=health, embedded_servers=False
    )
    with cluster, pytest.raises(TimeoutError, match=str(tmp_path)):
        cluster.wait_ready(timeout=0.5)


def test_wait_ready_reports_a_crash_not_a_timeout(tmp_path):
    health = f"http://127.0.0.1:{free_port()}/health"
    crash = _python("bad", "raise SystemExit('cannot load model')")
    cluster = Cluster([crash], log_dir=tmp_path, health_url=health, embedded_servers=False)
    with cluster, pytest.raises(ChildExited, match="cannot load model"):
        cluster.wait_ready(timeout=30)


_STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('started', flush=True); time.sleep(60)"


def test_stop_kills_what_ignores_sigterm(tmp_path):
    cluster = Cluster([_python("stubborn", _STUBBORN)], log_dir=tmp_path, embedded_servers=False)
    cluster.start()
    _wait_for_log(cluster, "stubborn", "started")
    start = time.monotonic()
    cluster.stop(grace=0.5)
    assert cluster.processes["stubborn"].returncode == -9
    assert time.monotonic() - start < 5


def test_hurry_skips_the_grace_period(tmp_path):
    cluster = Cluster([_python("stubborn", _STUBBORN)], log_dir=tmp_path, embedded_servers=False)
    cluster.start()
    _wait_for_log(cluster, "stubborn", "started")
    cluster.hurry()
    start = time.monotonic()
    cluster.stop(grace=60)
    assert time.monotonic() - start < 5


def test_failed_start_leaves_nothing_running(tmp_path):
    specs = [_sleeper("ok"), ProcessSpec("missing", [str(tmp_path / "no-such-binary")])]
    cluster = Cluster(specs, log_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        cluster.start()
    assert cluster.processes["ok"].returncode is not None
    assert all(not s.is_running() for s in cluster.servers)


FAST_RESTARTS = RestartPolicy(backoff=0.1, max_backoff=0.4, max_restarts=3, window=30.0)


def _supervise_until(cluster: Cluster, done, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the supervisor did not get there in time"
        cluster.wait(timeout=0.05)


def test_supervised_child_is_restarted_and_counted(tmp_path):
    reports: list[str] = []
    cluster = Cluster(
        [_sleeper("steady"), _sleeper("victim")],
        log_dir=tmp_path,
        embedded_servers=False,
        restart=FAST_RESTARTS,
        report=reports.append,
    )
    with cluster:
        _wait_for_log(cluster, "victim", "started")
        first_pid, steady_pid = cluster.processes["victim"].pid, cluster.processes["steady"].pid
        os.kill(first_pid, signal.SIGKILL)
        _supervise_until(cluster, lambda: cluster.processes["victim"].pid != first_pid)
        rows = {r["name"]: r for r in json.loads(cluster.state_path.read_text())["processes"]}
        assert rows["victim"]["restarts"] == 1 and rows["victim"]["state"] == "running"
        assert rows["victim"]["last_exit"] == "signal SIGKILL"
        assert rows["steady"]["restarts"] == 0 and cluster.processes["steady"].pid == steady_pid
        assert any("victim exited with signal SIGKILL" in r for r in reports)
        log = cluster.log_path("victim")  # appended to: the first run's lines stay
        _supervise_until(cluster, lambda: log.read_text().count("started") == 2)


def test_a_crash_looping_child_is_given_up_on_and_the_rest_keep_running(tmp_path):
    crash = _python("crasher", "print('boom', flush=True); raise SystemExit(3)")
    reports: list[str] = []
    cluster = Cluster(
        [_sleeper("steady"), crash],
        log_dir=tmp_path,
        embedded_servers=False,
        restart=FAST_RESTARTS,
        report=reports.append,
    )
    with cluster:
        _supervise_until(cluster, lambda: any("giving up" in r for r in reports))
        cluster.wait(timeout=0.3)  # no ChildExited: supervised, the cluster keeps running
        assert cluster.processes["steady"].poll() is None
        rows = {r["name"]: r for r in cluster.process_states()}
        assert rows["crasher"] == rows["crasher"] | {"state": "failed", "restarts": 3}
        with pytest.raises(ChildExited, match="boom"):  # before ready, it is an error
            cluster.wait_ready(timeout=1)


def test_supervised_nats_and_valkey_come_back_on_their_port_with_their_data(tmp_path):
    cluster = Cluster([_sleeper("steady")], log_dir=tmp_path, restart=FAST_RESTARTS)
    with cluster:
        nats_server, valkey = cluster.servers
        with socket.create_connection(("127.0.0.1", valkey.port)) as sock:
            sock.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
            assert sock.recv(16).startswith(b"+OK")
            sock.sendall(b"*1\r\n$5\r\nBGREWRITEAOF\r\n")  # the append-only file, now
            sock.recv(64)
        time.sleep(1.5)  # appendfsync everysec
        for server in (nats_server, valkey):
            server.process.kill()

        def both_back() -> bool:
            rows = [r for r in cluster.process_states() if r["name"] in ("nats-server", "valkey")]
            return all(r["restarts"] == 1 and r["state"] == "running" for r in rows)

        _supervise_until(cluster, both_back)
        with socket.create_connection(("127.0.0.1", valkey.port)) as sock:
            sock.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
            assert sock.recv(16) == b"$1\r\nv\r\n"
        rows = {r["name"]: r for r in cluster.process_states()}
        assert rows["nats-server"]["restarts"] == 1 and rows["valkey"]["restarts"] == 1
        assert cluster.processes["steady"].poll() is None


def test_process_names_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        Cluster([_sleeper("a"), _sleeper("a")])


# --------------------------------------------------------------------------------------------
# The serving topology and `xllm up`


def _modules(specs: list[ProcessSpec]) -> list[tuple[str, list[str]]]:
    return [(s.name, list(s.argv[1:])) for s in specs]


def test_colocated_topology():
    config = ClusterConfig(instances=2, policy="round-robin", host="127.0.0.1", port=9000)
    specs = service_specs(config, "/m", ["--dtype", "float32"])
    kvstore = [("kvstore", ["-m", "services.kvstore"])] if has_service("kvstore") else []
    assert _modules(specs) == [
        *kvstore,
        ("scheduler", ["-m", "services.scheduler", "--policy", "round-robin"]),
        ("inst-0", ["-m", "services.decode", "--instance-id", "inst-0", "--role", "both", "--dtype", "float32"]),
        ("inst-1", ["-m", "services.decode", "--instance-id", "inst-1", "--role", "both", "--dtype", "float32"]),
        ("gateway", ["-m", "services.gateway", "--model", "/m", "--host", "127.0.0.1", "--port", "9000"]),
    ]  # fmt: skip
    assert all(s.argv[0] == sys.executable for s in specs)
    assert config.base_url == "http://127.0.0.1:9000/v1"
    assert config.health_url == "http://127.0.0.1:9000/health"


def test_encoder_instances_join_either_topology():
    config = ClusterConfig(prefill=1, decode=1, encode=2)
    specs = {
        s.name: s
        for s in service_specs(config, "/m", ["--dtype", "float32", "--max-model-len", "64"])
    }
    assert specs["encode-1"].argv[1:] == [
        "-m",
        "services.encoder",
        "--instance-id",
        "encode-1",
        "--dtype",
        "float32",
    ]
    assert config.num_instances == 4  # /health waits for the encoders' heartbeats too
    assert ClusterConfig(encode=1).num_instances == 2
    with pytest.raises(ValueError, match="--encode"):
        ClusterConfig(encode=-1).validate()  # fmt: skip


def test_encode_on_decode_gives_the_decode_instances_an_encode_endpoint():
    config = ClusterConfig(prefill=1, decode=2, encode_on="decode")
    specs = {s.name: s for s in service_specs(config, "/m", ["--dtype", "float32"])}
    for name in ("decode-0", "decode-1"):
        assert "--serve-encode" in specs[name].argv
    assert "--serve-encode" not in specs["prefill-0"].argv
    assert not any(name.startswith("encode-") for name in specs)  # no encoder service
    assert config.num_instances == 5  # /health waits for the two encode endpoints too
    for bad in (ClusterConfig(encode_on="decode"), ClusterConfig(prefill=1, decode=1,
                                                                encode_on="gateway")):  # fmt: skip
        with pytest.raises(ValueError, match="--encode-on"):
            bad.validate()


def test_disaggregated_topology_and_api_key():
    config = ClusterConfig(model="/m", prefill=1, decode=2, api_key="secret")
    specs = {s.name: s for s in service_specs(config, "/m", ["--max-model-len", "512"])}
    prefill, decode = specs["prefill-0"].argv[1:], specs["decode-1"].argv[1:]
    assert prefill == [
        "-m",
        "services.prefill",
        "--instance-id",
        "prefill-0",
        "--max-model-len",
        "512",
    ]
    assert decode == [
        "-m",
        "services.decode",
        "--instance-id",
        "decode-1",
        "--max-model-len",
        "512",
    ]
    assert "inst-0" not in specs
    assert specs["gateway"].argv[-2:] == ["--max-model-len", "512"]  # same context length
    assert "secret" not in specs["gateway"].argv  # not visible in ps
    assert specs["gateway"].env == {"XLLM_API_KEY": "secret"}
    assert config.base_url == "http://127.0.0.1:8000/v1"  # 0.0.0.0 is not a client address
    assert serving_cluster(config).instances == 3  # ready once /health counts all of them


def test_demo_model_is_made_once(tmp_path):
    first = demo_model(tmp_path)
    assert first == tmp_path / "models" / "qwen3-tiny"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert demo_model(tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["qwen3-tiny"]


@pytest.mark.parametrize(
    "argv",
    [["--prefill", "1"], ["--instances", "0"], ["--port", "70000"]],
)
def test_up_rejects_bad_options(argv, capsys):
    assert cli_main(["up", *argv]) == 2
    assert "xllm up:" in capsys.readouterr().err


def test_up_refuses_a_busy_port(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["up", "--host", "127.0.0.1", "--port", str(port)]) == 2
    assert "in use" in capsys.readouterr().err


def test_engine_flags_are_forwarded_only_when_given():
    from xllm.cli import build_parser
    from xllm.cli.commands.up import engine_args

    args = build_parser().parse_args(["up", "--max-num-seqs", "8", "--kv-cache-gb", "0.5"])
    assert engine_args(args) == ["--kv-cache-gb", "0.5", "--max-num-seqs", "8"]
    assert engine_args(build_parser().parse_args(["up"])) == []
    spec = ["--speculative", "ngram", "--num-speculative-tokens", "3"]
    assert engine_args(build_parser().parse_args(["up", *spec])) == spec


def test_log_dir_defaults_to_a_kept_temp_dir():
    cluster = Cluster([_python("quick", "print('hi')")], embedded_servers=False)
    cluster.start()
    _wait_for_log(cluster, "quick", "hi")
    cluster.stop()
    try:
        assert cluster.log_path("quick").read_text() == "hi\n"  # logs outlive the cluster
    finally:
        shutil.rmtree(cluster.log_dir)


# --------------------------------------------------------------------------------------------
# `xllm up` end to end, with stand-in services first on PYTHONPATH

_STAND_IN = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    name = Path(__file__).parent.name
    env = {k: v for k, v in os.environ.items() if k.startswith("XLLM_")}
    record = Path(os.environ["STAND_IN_RECORD"]) / f"{name}-{os.getpid()}.json"
    record.write_text(json.dumps({"argv": sys.argv[1:], "env": env}))
    if name == "decode" and os.environ.get("STAND_IN_CRASH"):
        time.sleep(0.2)
        sys.exit(3)
    if name == "gateway":
        from http.server import BaseHTTPRequestHandler, HTTPServer
        class Health(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404)
                self.end_headers()
        port = int(sys.argv[sys.argv.index("--port") + 1])
        HTTPServer(("127.0.0.1", port), Health).serve_forever()
    time.sleep(120)
    """
)


def _stand_in_services(root: Path) -> None:
    (root / "services").mkdir(parents=True)
    (root / "services" / "__init__.py").write_text("")
    for name in ("scheduler", "decode", "gateway"):
        (root / "services" / name).mkdir()
        (root / "services" / name / "__init__.py").write_text("")
        (root / "services" / name / "__main__.py").write_text(_STAND_IN)


def _run_up(
    tmp_path: Path, crash: bool, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, Path, Path]:
    _stand_in_services(tmp_path / "src")
    records, logs = tmp_path / "records", tmp_path / "logs"
    records.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "src"),  # ahead of the editable install's finder
        "STAND_IN_RECORD": str(records),
        **({"STAND_IN_CRASH": "1"} if crash else {}),
    }
    argv = [sys.executable, "-m", "xllm.cli", "up", "--model", str(tmp_path), "--host"]
    argv += ["127.0.0.1", "--port", str(free_port()), "--log-dir", str(logs), "--policy", "rr"]
    argv += ["--instances", "2", "--max-num-seqs", "4", "--api-key", "k", "--stop-grace", "3"]
    argv += ["--ready-timeout", "30", *extra]
    # cwd: `python -m` puts it first on sys.path, and the repo's own services/ must not win.
    process = subprocess.Popen(
        argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return process, records, logs


def _pids_gone(records: Path) -> bool:
    return not any(_alive(int(r.stem.rsplit("-", 1)[1])) for r in records.iterdir())


@pytest.mark.slow
def test_up_runs_until_interrupted_then_stops_everything(tmp_path):
    process, records, logs = _run_up(tmp_path, crash=False)
    try:
        for line in process.stdout:
            if line.startswith("ready"):
                break
        else:
            pytest.fail(f"xllm up never got ready: {process.wait()} {process.stderr.read()}")
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGTERM)  # as when `timeout` forwards a second signal
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "Traceback" not in err
    seen = {p.name.split("-")[0]: json.loads(p.read_text()) for p in records.iterdir()}
    assert sorted(p.name.split("-")[0] for p in records.iterdir()) == [
        "decode", "decode", "gateway", "scheduler"
    ]  # fmt: skip
    assert seen["scheduler"]["argv"] == ["--policy", "rr"]
    assert seen["decode"]["argv"][2:] == ["--role", "both", "--max-num-seqs", "4"]
    assert seen["gateway"]["env"]["XLLM_API_KEY"] == "k"
    for record in seen.values():
        assert record["env"]["XLLM_MODEL"] == str(tmp_path)
        assert record["env"]["XLLM_NATS_URL"].startswith("nats://127.0.0.1:")
        assert record["env"]["XLLM_REDIS_URL"].startswith("redis://127.0.0.1:")
    assert _pids_gone(records)
    assert {"gateway.log", "inst-0.log", "nats-server.log"} <= {p.name for p in logs.iterdir()}


@pytest.mark.slow
def test_up_without_restarts_exits_nonzero_when_a_service_dies(tmp_path):
    process, records, _ = _run_up(tmp_path, crash=True, extra=("--max-restarts", "0"))
    try:
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1
    assert "exited with code 3" in err and "inst-" in err
    assert _pids_gone(records)


@pytest.mark.slow
def test_up_restarts_a_dead_service_and_gives_up_on_a_crash_loop(tmp_path):
    extra = ("--max-restarts", "2", "--restart-window", "60")
    process, records, _ = _run_up(tmp_path, crash=True, extra=extra)
    try:
        err_lines = []
        for line in process.stderr:
            err_lines.append(line)
            if "giving up" in line:
                break
        else:
            pytest.fail(f"xllm up never gave up on the crash loop: {''.join(err_lines)}")
        assert process.poll() is None  # the rest keep serving
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    err = "".join(err_lines) + err
    assert process.returncode == 0, err
    assert err.count("exited with code 3; restarting it in") == 4  # 2 instances x 2 restarts
    crashed = [r for r in records.iterdir() if r.name.startswith("decode")]
    assert len(crashed) == 6  # each instance ran 3 times
    assert _pids_gone(records)


def test_kv_store_cluster_starts_a_mooncake_master_every_child_can_reach(tmp_path):
    reach = (
        "import os, socket; host, port = os.environ['XLLM_KV_STORE_MASTER'].split(':'); "
        "socket.create_connection((host, int(port)), timeout=2).close(); "
        "print('reached', host, port, flush=True); import time; time.sleep(60)"
    )
    cluster = Cluster([_python("inst", reach)], log_dir=tmp_path, kv_store=True)
    with cluster:
        _wait_for_log(cluster, "inst", "reached")
        names = [s.name for s in cluster.servers]
        master = cluster.servers[-1]
        assert names == ["nats-server", "valkey", "mooncake-master"]
        assert cluster.kv_store_master == master.url
    assert not master.is_running()


def test_kv_store_needs_a_host_tier_for_the_instances(monkeypatch):
    monkeypatch.delenv("XLLM_HOST_KV_GB", raising=False)
    with pytest.raises(ValueError, match="host-kv-gb"):
        serving_cluster(ClusterConfig(model="/m", kv_store=True))
    cluster = serving_cluster(ClusterConfig(model="/m", kv_store=True), ["--host-kv-gb", "1"])
    assert cluster.kv_store and cluster.kv_store_master is None  # embedded, at start


def test_expert_parallel_instances_are_colocated_and_one_process_each(capsys):
    ep = ["--expert-parallel-size", "2"]
    with pytest.raises(ValueError, match="PD-colocated"):
        serving_cluster(ClusterConfig(model="/m", prefill=1, decode=1), ep)
    assert cli_main(["up", "--model", "/m", "--prefill", "1", "--decode", "1", *ep]) == 2
    assert "PD-colocated" in capsys.readouterr().err
    cluster = serving_cluster(ClusterConfig(model="/m", instances=2), ep)
    instances = [s for s in cluster.specs if s.name.startswith("inst-")]
    assert len(instances) == 2  # rank 0 starts its follower: one process to supervise each
    assert all(list(s.argv[-2:]) == ep for s in instances)
