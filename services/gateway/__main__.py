"""`python -m services.gateway`: the OpenAI-compatible HTTP gateway."""

from __future__ import annotations

import argparse
import sys

from services.gateway.config import GatewayConfig
from xllm.config import LogConfig, NatsConfig, add_arguments, from_args
from xllm.service.runtime import run_service


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway", description="xLLM gateway: OpenAI-compatible HTTP API"
    )
    for cls in (GatewayConfig, NatsConfig, LogConfig):
        add_arguments(parser, cls)
    args = parser.parse_args(argv)
    config = from_args(GatewayConfig, args)
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))

    async def serve(nc, stop) -> None:
        from services.gateway.app import serve_http

        await serve_http(config, nc, stop)

    return run_service("gateway", serve, from_args(NatsConfig, args), from_args(LogConfig, args))


if __name__ == "__main__":
    sys.exit(main())
