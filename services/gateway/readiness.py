"""Can the cluster serve? Readiness from the scheduler's view, and the supervisor's processes.

A request needs an instance that can prefill it and one that can decode it (the same one
when PD-colocated: role `both` does both). `/health` is 200 only when both exist, so a PD
deployment whose decode instances still load is not reported ready on its prefill instance
alone. `xllm up`'s supervisor writes what it knows of each process (state, restarts) to a
JSON file named by `XLLM_SUPERVISOR_STATE`; `/cluster` and `/metrics` show it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xllm.protocol import ClusterState

log = logging.getLogger(__name__)

NEEDED = {"prefill": ("prefill", "both"), "decode": ("decode", "both")}
"""What a request needs → the instance roles that provide it."""


def missing_roles(state: ClusterState) -> list[str]:
    """The capabilities no live instance provides ([] = ready to serve)."""
    roles = {hb.role for hb in state.instances}
    return [need for need, providers in NEEDED.items() if not roles.intersection(providers)]


def supervised_processes(path: str) -> list[dict]:
    """The supervisor's rows (name, pid, state, restarts, last_exit); [] without one."""
    if not path:
        return []
    try:
        return list(json.loads(Path(path).read_text())["processes"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("unreadable supervisor state %s: %s", path, e)
        return []
