"""`xllm up` (what `make run` runs): the whole cluster on this machine, until Ctrl-C.

Starts an embedded nats-server (JetStream) and Valkey unless `--nats-url`/`--redis-url` are
given, then the scheduler, the instances and the gateway, each a subprocess logging to
`<log-dir>/<name>.log` (see `xllm.cli.cluster.topology` for the exact command lines). Prints the
API address and an example request, waits until the gateway's `/health` says the cluster can
serve and every instance it started is live, then runs until Ctrl-C, SIGTERM or SIGHUP
(exit 0). A process that exits meanwhile (NATS and Valkey included) is reported with its
log tail and restarted with backoff; one that keeps exiting (`--max-restarts` times within
`--restart-window`) is given up on while the rest keep serving (`--max-restarts 0`: any exit
stops everything, exit 1). Stopping: services first (SIGTERM, `--stop-grace` seconds, then
SIGKILL; a second Ctrl-C skips the wait), NATS and Valkey last.

Engine flags (`--dtype`, `--kv-cache-gb`, `--max-num-seqs`, `--max-model-len`,
`--num-threads`, `--swap-space-gb`, `--speculative`, `--num-speculative-tokens`, `--ngram-max`,
`--ngram-min`, `--suffix-max-match`, `--suffix-min-probability`, `--suffix-cache-nodes`,
`--draft-model`, `--speculative-adaptive`, `--expert-parallel-size`, `--num-redundant-experts`,
`--eplb-interval`) are forwarded to every instance when given. With `--expert-parallel-size
N` each instance is N processes (its rank 0 starts the others and is the one supervised:
the group is restarted whole).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path

from xllm.cli.cluster.launcher import ChildExited, Cluster
from xllm.cli.cluster.topology import ClusterConfig, serving_cluster
from xllm.config import add_arguments, from_args

# (flag, type, help): engine options `xllm up` passes on to the instances when given.
ENGINE_FLAGS = (
    ("--dtype", str, "weights and KV dtype: auto, bfloat16, float16, float32"),
    ("--kv-cache-gb", float, "memory for each instance's KV pool, in GiB"),
    ("--max-num-seqs", int, "most sequences in one batch"),
    ("--max-model-len", int, "longest prompt + output"),
    ("--num-threads", int, "torch CPU threads per instance"),
    ("--swap-space-gb", float, "host memory per instance for preempted offline requests' KV"),
    ("--speculative", str, "speculative decoding: ngram (prompt lookup), suffix, draft, or ''"),
    ("--num-speculative-tokens", int, "most draft tokens verified per sequence per step"),
    ("--ngram-max", int, "longest n-gram the ngram proposer matches"),
    ("--ngram-min", int, "shortest n-gram the ngram proposer matches"),
    ("--suffix-max-match", int, "longest suffix the suffix proposer matches"),
    ("--suffix-min-probability", float, "where the suffix proposer's draft stops"),
    ("--suffix-cache-nodes", int, "size of the suffix proposer's trie of recent outputs"),
    ("--draft-model", str, "draft model folder for --speculative draft (same vocabulary)"),
    ("--speculative-adaptive", str, "true: speculate only when it pays (default); false: always"),
    ("--expert-parallel-size", int, "MoE: rank processes per instance, the experts split over"),
    ("--num-redundant-experts", int, "MoE: extra expert slots per layer for hot experts (EPLB)"),
    ("--eplb-interval", int, "MoE: steps per expert-load window (EPLB re-placement)"),
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run the whole cluster locally (embedded NATS + Valkey, every service)",
        description=__doc__.splitlines()[0],
    )
    add_arguments(parser, ClusterConfig)
    engine = parser.add_argument_group("engine options forwarded to the instances")
    for flag, type_, help_text in ENGINE_FLAGS:
        engine.add_argument(flag, type=type_, default=None, help=help_text)
    parser.set_defaults(func=_run)


def engine_args(args: argparse.Namespace) -> list[str]:
    """The engine flags that were given, as command-line arguments for the instances."""
    out: list[str] = []
    for flag, _, _ in ENGINE_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            out += [flag, str(value)]
    return out


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _example(config: ClusterConfig, model: str) -> str:
    auth = ' -H "Authorization: Bearer $XLLM_API_KEY"' if config.api_key else ""
    body = (
        f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], '
        '"max_tokens": 32}'
    )
    return (
        f"  curl {config.base_url}/chat/completions{auth} \\\n"
        f"    -H 'Content-Type: application/json' -d '{body}'"
    )


# Stop like Ctrl-C does on these too; SIGHUP is a closed terminal.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_stop_signals(handler) -> None:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, handler)


def _stop_handler(cluster: Cluster):
    """The first stop signal interrupts the wait; later ones (a second Ctrl-C, or a SIGTERM
    that arrives along with it) only make the shutdown skip its grace period, instead of
    interrupting the cleanup halfway."""

    def first(signum, frame) -> None:
        _on_stop_signals(lambda *_: cluster.hurry())
        raise KeyboardInterrupt

    return first


def _serve(cluster: Cluster, config: ClusterConfig) -> int:
    cluster.start()
    model = Path(cluster.env["XLLM_MODEL"])
    print(f"xllm up: model {model}")
    print(f"  nats  {cluster.nats_url}\n  redis {cluster.redis_url}")
    print(f"  processes: {', '.join(cluster.processes)}; logs in {cluster.log_dir}")
    print(f"OpenAI-compatible API at {config.base_url}, for example:")
    print(_example(config, model.name))
    print(f"waiting for {config.health_url} ...", flush=True)
    cluster.wait_ready(config.ready_timeout)
    print("ready. Ctrl-C stops everything.", flush=True)
    cluster.wait()  # returns only by raising: a signal, or ChildExited when unsupervised
    return 1


def _problem(config: ClusterConfig) -> str | None:
    """Why `config` cannot run here, if it cannot."""
    try:
        config.validate()
    except ValueError as e:
        return str(e)
    if not _port_free(config.host, config.port):
        return f"{config.host}:{config.port} is in use; pick another --port"
    return None


def _run(args: argparse.Namespace) -> int:
    config = from_args(ClusterConfig, args)
    problem = _problem(config)
    if problem:
        print(f"xllm up: {problem}", file=sys.stderr)
        return 2
    if not config.model:
        print("xllm up: no --model, using the tiny demo model (made on first use)", flush=True)
    try:
        cluster = serving_cluster(config, engine_args(args))
    except KeyboardInterrupt:  # while making the demo model: nothing runs yet
        return 130
    except ValueError as e:  # options that do not go together (engine flags included)
        print(f"xllm up: {e}", file=sys.stderr)
        return 2
    _on_stop_signals(_stop_handler(cluster))
    try:
        return _serve(cluster, config)
    except KeyboardInterrupt:
        print("\nxllm up: stopping (Ctrl-C again to kill at once) ...", file=sys.stderr)
        return 0
    except (ChildExited, TimeoutError) as e:
        print(f"xllm up: {e}\nxllm up: stopping everything", file=sys.stderr)
        return 1
    finally:
        _on_stop_signals(lambda *_: cluster.hurry())  # also when no signal came
        cluster.stop()
        print(f"xllm up: stopped; logs are in {cluster.log_dir}", file=sys.stderr)
