"""A whole xLLM cluster on one machine: embedded NATS and Valkey, every service a subprocess.

`embedded` runs nats-server and valkey-server from their PyPI packages; `launcher.Cluster`
supervises a set of processes (start in order, health wait, restarts with backoff or
crash detection, ordered stop);
`topology` says which services a serving cluster runs and with which flags. `xllm up` is a
thin command line over `serving_cluster()`; tests and benchmarks use the same pieces.
"""

from xllm.cli.cluster.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    free_port,
    start_nats,
    start_valkey,
)
from xllm.cli.cluster.launcher import ChildExited, Cluster, ProcessSpec, RestartPolicy
from xllm.cli.cluster.topology import ClusterConfig, demo_model, service_specs, serving_cluster

__all__ = [
    "ChildExited",
    "Cluster",
    "ClusterConfig",
    "EmbeddedServer",
    "EmbeddedServerError",
    "ProcessSpec",
    "RestartPolicy",
    "demo_model",
    "free_port",
    "service_specs",
    "serving_cluster",
    "start_nats",
    "start_valkey",
]
