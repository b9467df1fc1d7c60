"""The instance program: `python -m services.prefill` / `python -m services.decode` run this.

With `--expert-parallel-size N` > 1 this process is rank 0 of an instance made of N
processes: it starts the other ranks itself (xllm.instance.expert_group) and serves them
in lockstep; the instance fails (exit 1) when the group does.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket
import sys

from xllm.config import EngineConfig, LogConfig, NatsConfig, add_arguments, from_args
from xllm.encoder.config import EncodeRoleConfig
from xllm.instance.config import InstanceConfig
from xllm.service.runtime import run_service


def instance_parser(default_role: str) -> argparse.ArgumentParser:
    """The instance's command line (expert-parallel followers parse the same one)."""
    parser = argparse.ArgumentParser(description=f"xLLM instance (default role: {default_role})")
    for cls in (InstanceConfig, EngineConfig, EncodeRoleConfig, NatsConfig, LogConfig):
        add_arguments(parser, cls)
    return parser


def main(default_role: str, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = instance_parser(default_role)
    args = parser.parse_args(argv)
    instance_config = from_args(InstanceConfig, args)
    if not instance_config.role:
        instance_config = dataclasses.replace(instance_config, role=default_role)
    engine_config = from_args(EngineConfig, args)
    encode_config = from_args(EncodeRoleConfig, args)
    if not engine_config.model:
        parser.error("--model (or XLLM_MODEL) is required")
    if engine_config.expert_parallel_size > 1:
        from xllm.instance.expert_group import check_supported

        try:
            check_supported(instance_config.role, instance_config.serve_encode, engine_config)
        except ValueError as e:
            parser.error(str(e))

    async def serve(nc, stop: asyncio.Event) -> None:
        from xllm.engine.engine import Engine
        from xllm.instance.instance import Instance, default_transport, engine_thread

        loop = asyncio.get_running_loop()
        # Loading weights takes seconds: off the loop, so NATS keeps its connection alive,
        # and on the thread that will run the steps.
        executor = engine_thread()
        if engine_config.expert_parallel_size > 1:
            from xllm.instance.expert_group import serve_group

            transport = default_transport(instance_config)

            def instance_of(engine) -> Instance:
                return Instance(instance_config, engine, nc, executor, transport, encode_config)

            await serve_group(engine_config, argv, executor, stop, instance_of)
            return
        engine = await loop.run_in_executor(executor, Engine, engine_config)
        read_store_replicas(engine)
        transport = default_transport(instance_config)  # opened once a PD role needs it
        instance = Instance(instance_config, engine, nc, executor, transport, encode_config)
        await instance.serve(stop)

    name = f"instance {instance_config.instance_id or ''}".strip()
    return run_service(name, serve, from_args(NatsConfig, args), from_args(LogConfig, args))


def read_store_replicas(engine) -> None:
    """Give the engine's store tier, if any, a reader of a block's other replicas for when
    the first one's segment is gone (`xllm.engine.kv_store`): a Mooncake Transfer Engine,
    which only this layer may build."""
    store = engine.tiers.store if engine.tiers is not None else None
    if store is None:
        return
    from xllm.kv_transfer.replica_reader import MooncakeReplicaReader

    host = engine.config.kv_store_host or socket.gethostbyname(socket.gethostname())
    store.read_replica = MooncakeReplicaReader(host)
