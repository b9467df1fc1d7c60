"""`xllm generate`: run one prompt through the engine in this process and print the result."""

from __future__ import annotations

import argparse
import json
import sys

from xllm.protocol.types import SamplingParams


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text for one prompt, in-process")
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xllm.llm import LLM

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
        )
        params.validate()
        llm = LLM(args.model, dtype=args.dtype)
        prompt = args.prompt
        if args.chat:
            prompt = llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        result = llm.generate(prompt, params)[0]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    completion = result.outputs[0]
    if args.json:
        print(
            json.dumps(
                {
                    "text": completion.text,
                    "token_ids": completion.token_ids,
                    "finish_reason": completion.finish_reason,
                    "prompt_token_ids": result.prompt_token_ids,
                }
            )
        )
    else:
        print(completion.text)
    return 0
