"""xLLM: LLM inference serving over NATS — the shared library (engine, models, protocol)."""

import os

# Back large CPU tensors (weights, the KV pool) with transparent huge pages: decode streams
# every weight once per step, and with 4 KiB pages the TLB misses cost ~20% of a step.
# torch reads this once, at its first CPU allocation, so it is set here, before any of ours.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
