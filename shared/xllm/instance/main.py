"""The instance program: `python -m services.prefill` / `python -m services.decode` run this."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket

from xllm.config import EngineConfig, LogConfig, NatsConfig, add_arguments, from_args
from xllm.encoder.config import EncodeRoleConfig
from xllm.instance.config import InstanceConfig
from xllm.service.runtime import run_service


def main(default_role: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"xLLM instance (default role: {default_role})")
    for cls in (InstanceConfig, EngineConfig, EncodeRoleConfig, NatsConfig, LogConfig):
        add_arguments(parser, cls)
    args = parser.parse_args(argv)
    instance_config = from_args(InstanceConfig, args)
    if not instance_config.role:
        instance_config = dataclasses.replace(instance_config, role=default_role)
    engine_config = from_args(EngineConfig, args)
    encode_config = from_args(EncodeRoleConfig, args)
    if not engine_config.model:
        parser.error("--model (or XLLM_MODEL) is required")

    async def serve(nc, stop: asyncio.Event) -> None:
        from xllm.engine.engine import Engine
        from xllm.instance.instance import Instance, default_transport, engine_thread

        loop = asyncio.get_running_loop()
        # Loading weights takes seconds: off the loop, so NATS keeps its connection alive,
        # and on the thread that will run the steps.
        executor = engine_thread()
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
