"""LLM: the offline Python API — `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from xllm.config import EngineConfig
from xllm.engine.engine import Engine
from xllm.protocol.types import Logprob, SamplingParams
from xllm.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None
    """Beam search: the beam's summed logprob (outputs are its beams, best first)."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, model: str, **engine_options: Any):
        self.engine = Engine(EngineConfig(model=str(model), **engine_options))
        self.tokenizer = Tokenizer(model)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = (
            params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        results: dict[str, RequestOutput] = {}
        for prompt, p in zip(prompts, params_list, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, ids, dataclasses.replace(p))
            results[rid] = RequestOutput(rid, ids)
            results[rid].outputs = [CompletionOutput(i, "", [], None) for i in range(p.n)]
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                result = results[delta.request_id]
                completion = result.outputs[delta.index]
                completion.token_ids.extend(delta.token_ids)
                if delta.logprobs is not None:
                    completion.logprobs = (completion.logprobs or []) + delta.logprobs
                if delta.finish_reason is not None:
                    completion.cumulative_logprob = delta.cumulative_logprob
                    completion.finish_reason = delta.finish_reason.value
                    result.num_cached_tokens = delta.num_cached_tokens
        for result in results.values():
            for completion in result.outputs:
                completion.text = self.tokenizer.decode(completion.token_ids)
        return list(results.values())
