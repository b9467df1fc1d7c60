"""Graph mode (--graph-mode) off vs on: batch-1 decode ms/step and 16-stream tok/s.

    PYTHONPATH=shared:. .venv/bin/python benchmarks/graph_mode.py [--streams 16] [--rounds 2]

The `small` demo model (Qwen3-0.6B's shapes, bf16) with the native kernels, each variant
in its own process (native_kernels.py's engine run), alternated `--rounds` times: batch-1
decode ms/step (median of a 32 + 32 token request) and its share of the memory-bandwidth
roofline (bytes of weights a step reads / read bandwidth), and `--streams` streams' output
tok/s and decode ms/step. Prints one JSON line; the best round of each variant is kept
(the least disturbed by other load). `--size tiny` is a smoke run (seconds, no figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from common import demo_model, emit, run_variants
from native_kernels import engine_child, read_bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", default="small", choices=["small", "tiny"])
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(engine_child(True, args, graph_mode=args.child == "on")), flush=True)
        return
    demo_model("qwen3", args.size)  # made once, before the timed children
    bandwidth = read_bandwidth()
    result: dict = {"read_gbs": round(bandwidth, 1), "load_before": os.getloadavg()[0]}
    command = [sys.executable, __file__, *sys.argv[1:], "--child"]
    runs = run_variants(command, rounds=args.rounds)
    for variant, rounds in runs.items():
        result[f"graph_{variant}"] = {
            "b1_decode_ms": min(r["b1_decode_ms"] for r in rounds),
            "streams_tok_s": max(r["streams_tok_s"] for r in rounds),
            "streams_decode_ms": min(r["streams_decode_ms"] for r in rounds),
        }
    off, on = result["graph_off"], result["graph_on"]
    roofline_ms = runs["on"][0]["weight_bytes"] / (bandwidth * 1e9) * 1e3
    result["b1_roofline_ms"] = round(roofline_ms, 2)
    for variant in ("off", "on"):
        share = roofline_ms / result[f"graph_{variant}"]["b1_decode_ms"]
        result[f"b1_share_of_roofline_{variant}"] = round(share, 3)
    result["b1_steps_per_s_on"] = round(1e3 / on["b1_decode_ms"], 1)
    result["b1_speedup"] = round(off["b1_decode_ms"] / on["b1_decode_ms"], 3)
    result["streams_speedup"] = round(on["streams_tok_s"] / off["streams_tok_s"], 3)
    result["load_after"] = os.getloadavg()[0]
    emit(result)


if __name__ == "__main__":
    main()
