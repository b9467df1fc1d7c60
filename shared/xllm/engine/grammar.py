"""Structured output with xgrammar: a request's spec as a grammar, compiled grammars per
engine, one matcher per sequence, and the batched token bitmask.

    grammars = GrammarCache(model_dir, vocab_size, eos_token_ids)  # one per engine, lazily
    seq.grammar = grammars.matcher(params.structured, prompt)      # replays resumed output
    mask_logits(logits, seqs)         # sampler: -inf on what each grammar forbids next
    accept_tokens(seqs, token_ids)    # sampler: every sampled token into its matcher

A sequence's matcher (`Sequence.grammar`, an `xgrammar.GrammarMatcher`) has accepted every
output token so far; a matcher that accepted a stop token (the model's EOS) is terminated,
and the scheduler then finishes the sequence with "stop". Rows without a grammar are never
touched, and a batch without one never reaches this module: xgrammar (and transformers,
which it imports) load with the first constrained request.

`grammar_of` needs no tokenizer: the gateway calls it to reject a bad schema, regex or
grammar with a 400 before the request travels. Engines compile its Grammar against their
tokenizer: `TokenizerInfo` from the model folder's tokenizer.json, with the model's vocab
size (the embedding may have more rows than the tokenizer has tokens: those ids are never
allowed).

NOTE: JSON (schema or object) is generated without free whitespace (`any_whitespace=False`:
`{"a": 1, "b": [2, 3]}`, as `json.dumps` writes it). With free whitespace a weak model can
emit newlines and spaces until max_tokens runs out, vLLM's known failure that its
`disable_any_whitespace` option exists for.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from pathlib import Path

import torch
import xgrammar as xgr

from xllm.engine.sequence import Sequence
from xllm.protocol.types import StructuredKind, StructuredOutput

GRAMMAR_CACHE_SIZE = 64
"""Compiled grammars an engine keeps (least recently used out): agents repeat a handful of
schemas, and compiling one costs far more than masking with it."""
_ANY_OBJECT = '{"type": "object"}'

log = logging.getLogger(__name__)


def grammar_of(structured: StructuredOutput) -> xgr.Grammar:
    """The grammar `structured` asks for; ValueError (a message fit for a user) if its spec
    does not parse."""
    kind, spec = structured.kind, structured.spec
    try:
        if kind is StructuredKind.JSON:
            return xgr.Grammar.from_json_schema(spec, any_whitespace=False)
        if kind is StructuredKind.JSON_OBJECT:  # any object: properties are not limited
            return xgr.Grammar.from_json_schema(
                _ANY_OBJECT, any_whitespace=False, strict_mode=False
            )
        if kind is StructuredKind.REGEX:
            return xgr.Grammar.from_regex(spec)
        if kind is StructuredKind.CHOICE:
            return xgr.Grammar.from_ebnf(choice_ebnf(spec))
        return xgr.Grammar.from_ebnf(spec)
    except RuntimeError as e:  # xgrammar's C++ errors, prefixed with time and source line
        raise ValueError(_xgrammar_message(e)) from None


def choice_ebnf(spec: str) -> str:
    """`root ::= "a" | "b"` for the JSON array of strings `spec`."""
    choices = json.loads(spec)
    if not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError("a choice must be a non-empty array of strings")
    # JSON string escapes (\", \\, \n, \u0001) are EBNF string escapes too.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _xgrammar_message(error: RuntimeError) -> str:
    text = re.sub(r"^\[[\d:.]+\] \S+:\d+: ", "", str(error).strip())
    return text.removeprefix("Check failed: (error.empty()) is false: ")


def tokenizer_info(model_dir: str | Path, vocab_size: int, stop_token_ids) -> xgr.TokenizerInfo:
    """xgrammar's view of the model's tokenizer.json: each token's bytes, and which ids end."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(model_dir) / "tokenizer.json"))
    return xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
    )


class GrammarCache:
    """One engine's grammar compiler and its compiled grammars, least recently used out."""

    def __init__(self, model_dir: str | Path, vocab_size: int, stop_token_ids, capacity: int = 0):
        info = tokenizer_info(model_dir, vocab_size, stop_token_ids)
        # Our own LRU below is the cache: xgrammar's would hold a second copy of each.
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.capacity = capacity or GRAMMAR_CACHE_SIZE
        self._compiled: OrderedDict[tuple[StructuredKind, str], xgr.CompiledGrammar] = OrderedDict()

    def compiled(self, structured: StructuredOutput) -> xgr.CompiledGrammar:
        key = structured.key
        grammar = self._compiled.get(key)
        if grammar is not None:
            self._compiled.move_to_end(key)
            return grammar
        grammar = self._compiled[key] = self.compiler.compile_grammar(grammar_of(structured))
        if len(self._compiled) > self.capacity:
            self._compiled.popitem(last=False)
        return grammar

    def matcher(
        self, structured: StructuredOutput, prompt_token_ids: list[int]
    ) -> xgr.GrammarMatcher:
        """A matcher at the start of the output: past the last `num_replayed_tokens` of the
        prompt, which a resumed request generated already. ValueError if they break the
        grammar (or the spec does not parse)."""
        matcher = xgr.GrammarMatcher(self.compiled(structured))
        num_replayed = structured.num_replayed_tokens
        if num_replayed >= len(prompt_token_ids):
            raise ValueError(
                f"structured.num_replayed_tokens ({num_replayed}) must be less than the "
                f"prompt's {len(prompt_token_ids)} tokens"
            )
        replayed = prompt_token_ids[len(prompt_token_ids) - num_replayed :]
        for i, token_id in enumerate(replayed):
            if not matcher.accept_token(token_id):
                raise ValueError(f"replayed output token {i} ({token_id}) breaks the grammar")
        return matcher


def mask_logits(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place, logits [R, V] float32 (one row per sequence in `seqs`): -inf on every token
    the grammar of a constrained row does not allow next. Rows without a grammar are
    untouched; a row whose allowed tokens min_tokens suppression took (the grammar can only
    end) gets them back: the grammar wins, and the completion stops."""
    rows = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
    bitmask = xgr.allocate_token_bitmask(len(seqs), logits.shape[-1])  # [R, ceil(V / 32)] int32
    for row in rows:
        seqs[row].grammar.fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    for row in rows:
        seq = seqs[row]
        if seq.num_output_tokens < seq.params.min_tokens and torch.isneginf(logits[row]).all():
            logits[row] = 0.0
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=[row])


def accept_tokens(seqs: list[Sequence], token_ids: list[int]) -> None:
    """Advance each constrained sequence's matcher past its sampled token."""
    for seq, token_id in zip(seqs, token_ids, strict=True):
        if seq.grammar is not None and not seq.grammar.accept_token(token_id):
            # The mask allows only tokens the matcher accepts: a bug, which must not take
            # the batch down; the matcher stays where it was.
            log.error("%s: sampled token %d, which its grammar rejects", seq, token_id)
