"""`python -m services.kvstore`: the global KV cache index (report §3.4) over Redis."""

from __future__ import annotations

import argparse
import sys

from services.kvstore.config import KvStoreConfig
from xllm.config import LogConfig, NatsConfig, RedisConfig, add_arguments, from_args
from xllm.service.runtime import run_service


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="xLLM kvstore: global KV cache metadata")
    for cls in (KvStoreConfig, RedisConfig, NatsConfig, LogConfig):
        add_arguments(parser, cls)
    args = parser.parse_args(argv)
    config = from_args(KvStoreConfig, args)
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    redis_url = from_args(RedisConfig, args).redis_url

    async def serve(nc, stop) -> None:
        from redis.asyncio import Redis

        from services.kvstore.service import KvStoreService

        redis = Redis.from_url(redis_url)
        try:
            await KvStoreService(config, nc, redis).serve(stop)
        finally:
            await redis.aclose()

    return run_service("kvstore", serve, from_args(NatsConfig, args), from_args(LogConfig, args))


if __name__ == "__main__":
    sys.exit(main())
