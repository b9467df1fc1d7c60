"""`python -m services.scheduler`: the scheduler service."""

from __future__ import annotations

import argparse
import sys

from services.scheduler.config import SchedulerConfig
from services.scheduler.placement import decode_cost
from services.scheduler.policies import get_policy
from xllm.config import LogConfig, NatsConfig, add_arguments, from_args
from xllm.service.runtime import run_service


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="xLLM scheduler")
    for cls in (SchedulerConfig, NatsConfig, LogConfig):
        add_arguments(parser, cls)
    args = parser.parse_args(argv)
    config = from_args(SchedulerConfig, args)
    try:
        get_policy(config.policy)
        config.validate()
        decode_cost(config)  # an unknown profile or model config fails here, not later
    except ValueError as e:
        parser.error(str(e))

    async def serve(nc, stop) -> None:
        from services.scheduler.service import SchedulerService

        await SchedulerService(config, nc).serve(stop)

    return run_service("scheduler", serve, from_args(NatsConfig, args), from_args(LogConfig, args))


if __name__ == "__main__":
    sys.exit(main())
