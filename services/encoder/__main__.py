"""`python -m services.encoder`: an encoder instance (a Qwen2-VL vision tower, role encode)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.encoder.config import EncoderConfig
from xllm.config import LogConfig, NatsConfig, add_arguments, from_args
from xllm.encoder.config import EncodeRoleConfig
from xllm.service.runtime import run_service


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="xLLM encoder (vision tower)")
    for cls in (EncoderConfig, EncodeRoleConfig, NatsConfig, LogConfig):
        add_arguments(parser, cls)
    args = parser.parse_args(argv)
    config = from_args(EncoderConfig, args)
    role_config = from_args(EncodeRoleConfig, args)
    try:
        config.validate()
        role_config.validate()
    except ValueError as e:
        parser.error(str(e))

    async def serve(nc, stop: asyncio.Event) -> None:
        from services.encoder.service import EncoderService
        from services.encoder.tower import VisionTower

        tower = await asyncio.get_running_loop().run_in_executor(
            None, VisionTower, config.model, config.dtype
        )
        await EncoderService(config, role_config, nc, tower).serve(stop)

    name = f"encoder {config.instance_id}".strip()
    return run_service(name, serve, from_args(NatsConfig, args), from_args(LogConfig, args))


if __name__ == "__main__":
    sys.exit(main())
