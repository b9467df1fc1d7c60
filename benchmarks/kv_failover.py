"""Time to recover a killed instance's request: re-fetching its KV from the store vs
recomputing it.

Per setup, a fresh `xllm up` cluster of the tiny demo model, `--topology colocated` (2
PD-colocated instances, one killed) or `pd` (1 prefill + 2 decode instances, the decode
instance streaming the request killed):

* `recompute`: no KV tiers; the survivor recomputes the prompt and the tokens generated so far
  (in PD the prefill instance still holds the prompt in its device prefix cache, so only the
  generated tokens are recomputed, then sent to the other decode instance);
* `refetch`: `--kv-store` with `--host-kv-gb` and `--kv-store-replicas 2`; the survivor
  fetches every full block (prompt and decode) from Mooncake Store and recomputes the rest
  (in PD: the prefill instance fetches the dead instance's decoded blocks to serve the
  resumed prompt, the other decode instance's reservation fetches what it can, and the
  prefill side sends the rest; blocks whose first copy was in the dead instance's segment
  are read from their other replica).

`--size small` runs the `small` demo model instead (Qwen3-0.6B's shapes, bf16, made by
`common.demo_model`), where a prefill costs tens of ms a token on this CPU: its defaults (a
1024-token prompt, killed after 128 of 160 output tokens) make recomputing cost seconds, in
PD too, where the survivor's prefill instance recomputes only the 128 decoded tokens (the
prompt is still in its device prefix cache). `--size tiny` (the default) is the tiny demo
model, where recomputing 3000 tokens takes a fraction of a second.

One streamed request with a `--prompt-tokens` random prompt and `--max-tokens` output; after
`--kill-after` streamed chunks (time for the victim's puts to finish) the instance running
it is SIGKILLed. Time to recover = the stream's longest stall from the kill on (the gateway
notices the death (its supervisor, `xllm up`'s, reports the exit within 50 ms), resubmits,
the survivor prefills or loads); `recompute_over_refetch` is the ratio of the two setups'. The demo model is bfloat16:
recomputing the prompt and the generated tokens in one prefill may round differently from
the original decode steps and change the greedy text; re-fetched KV is the original's. Also reported: the survivor's blocks fetched from the store, and whether
the text equals the engine alone's (greedy, EOS ignored), and the surviving instances' store
loads that failed and blocks read from a second replica.

    cd benchmarks && PYTHONPATH=../shared:.. ../.venv/bin/python kv_failover.py \
        [--topology pd] [--size small]

Prints one JSON line. Timing figures mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from statistics import mean

import openai
from common import demo_model, emit
from prefix_routing import cluster_state

from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.cli.cluster.topology import demo_model as tiny_demo_model

SETUPS = ("recompute", "refetch")
TOPOLOGIES = {"colocated": dict(instances=2), "pd": dict(prefill=1, decode=2)}
"""`--topology`: the cluster's instances; the victim and the survivor are of the role that
streams (colocated: "both"; PD: "decode")."""
SIZE_DEFAULTS = {
    "tiny": dict(
        prompt_tokens=3000,
        max_tokens=300,
        kill_after=150,
        num_kv_blocks=512,
        host_kv_gb=0.25,
        max_num_batched_tokens=2048,
    ),
    "small": dict(
        prompt_tokens=1024,
        max_tokens=160,
        kill_after=128,
        num_kv_blocks=128,
        host_kv_gb=0.5,
        max_num_batched_tokens=128,
    ),
}
"""`--size`: the defaults of the flags below (an explicit flag still wins). The small model's
blocks are ~1.8 MB each: its pool holds the request (82 blocks) with room. 128-token prefill
chunks keep the killed instance's puts in step with its prefill (the store splits a larger
step's put into batches that fit its client's staging buffer)."""


def run_setup(setup: str, prompt: list[int], args: argparse.Namespace) -> dict:
    config = ClusterConfig(
        model=args.model,
        host="127.0.0.1",
        port=free_port(),
        policy="round-robin",
        kv_store=setup == "refetch",
        log_dir=tempfile.mkdtemp(prefix=f"xllm-kv-failover-{setup}-"),
        log_level="WARNING",
        max_restarts=0,
        **TOPOLOGIES[args.topology],
    )
    engine_args = ["--num-kv-blocks", str(args.num_kv_blocks), "--num-threads", "1"]
    engine_args += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if setup == "refetch":
        engine_args += ["--host-kv-gb", str(args.host_kv_gb), "--kv-store-replicas", "2"]
        engine_args += ["--kv-store-segment-gb", str(args.host_kv_gb)]
    with serving_cluster(config, engine_args) as cluster:
        cluster.wait_ready(600)
        client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        arrivals: list[float] = []
        texts: list[str] = []
        started = threading.Event()

        def stream() -> None:
            chunks = client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=args.max_tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for chunk in chunks:
                arrivals.append(time.monotonic())
                texts.append(chunk.choices[0].text)
                if len(arrivals) >= args.kill_after:
                    started.set()

        thread = threading.Thread(target=stream)
        thread.start()
        if not started.wait(600):
            raise RuntimeError(f"{setup}: the stream did not start")
        streaming_role = "decode" if args.topology == "pd" else "both"
        running = [
            i
            for i in cluster_state(config.base_url)["instances"]
            if i["load"]["num_running"] and i["role"] == streaming_role
        ]
        victim = running[0]["instance_id"]
        killed_at = time.monotonic()
        os.kill(cluster.processes[victim].pid, signal.SIGKILL)
        thread.join(timeout=600)
        time.sleep(1.0)  # a survivor heartbeat after the resume
        survivors = cluster_state(config.base_url)["instances"]
        survivor = next(i for i in survivors if i["role"] == streaming_role)
    # The stall the kill caused: the longest gap between tokens from the last one before it
    # (chunks already on their way when it struck may still arrive just after it).
    last_before = max(i for i, t in enumerate(arrivals) if t < killed_at)
    stall = max(b - a for a, b in itertools.pairwise(arrivals[last_before:]))
    steady = [b - a for a, b in itertools.pairwise(arrivals[1 : last_before + 1])]
    return {
        "time_to_recover_s": round(stall, 3),
        "steady_inter_token_s": round(mean(steady), 4) if steady else None,
        "chunks": len(arrivals),
        "store_blocks_fetched": survivor["tiers"]["store"]["hits"],
        # Every surviving instance's (in PD the prefill instance fetches blocks too).
        "store_failed_loads": sum(i["tiers"]["store"]["failed_loads"] for i in survivors),
        "store_replica_reads": sum(i["tiers"]["store"]["replica_reads"] for i in survivors),
        "text": "".join(texts),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--topology", choices=TOPOLOGIES, default="colocated")
    parser.add_argument("--size", choices=SIZE_DEFAULTS, default="tiny", help="demo model")
    parser.add_argument("--model", default="", help="model folder; default: the --size demo")
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--kill-after", type=int, help="streamed chunks")
    parser.add_argument("--num-kv-blocks", type=int)
    parser.add_argument("--host-kv-gb", type=float)
    parser.add_argument("--max-num-batched-tokens", type=int, help="prefill chunk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, value in SIZE_DEFAULTS[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.model:
        small = args.size == "small"
        args.model = str(demo_model("qwen3", "small") if small else tiny_demo_model())
    rng = random.Random(args.seed)
    prompt = [rng.randrange(100, 3000) for _ in range(args.prompt_tokens)]
    results = {setup: run_setup(setup, prompt, args) for setup in args.setups}

    from xllm.llm import LLM
    from xllm.protocol.types import SamplingParams

    # As the instances run it (one thread: more only spin against each other under load).
    llm = LLM(
        args.model,
        num_kv_blocks=args.num_kv_blocks,
        num_threads=1,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    expected = llm.tokenizer.decode(llm.generate([prompt], params)[0].outputs[0].token_ids)
    for result in results.values():
        result["text_equals_engine"] = result.pop("text") == expected
    print(json.dumps(results), file=sys.stderr)
    figures = {
        "benchmark": "kv_failover",
        "topology": args.topology,
        "size": args.size,
        "prompt_tokens": len(prompt),
        "setups": results,
    }
    if set(SETUPS) <= results.keys():  # the same-run baseline: recompute over re-fetch
        recovered = {setup: results[setup]["time_to_recover_s"] for setup in SETUPS}
        figures["recompute_over_refetch"] = round(recovered["recompute"] / recovered["refetch"], 2)
    emit(figures)


if __name__ == "__main__":
    main()
