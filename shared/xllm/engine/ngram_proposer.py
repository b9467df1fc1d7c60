"""NgramProposer: prompt lookup decoding — drafts copied from the sequence's own past.

For a sequence whose tokens end in the n-gram g (n from `n_max` down to `n_min`, longest
first), find the latest earlier place where g occurred and propose the tokens that followed
it there. Outputs that copy their prompt (code edits, quoting, extraction) or repeat
themselves are guessed many tokens at a time; elsewhere there is usually no match and no
draft, which costs the step nothing.

    tokens:  a b c d x y b c d ... a b c d
                          ^---^ latest earlier "b c d" (n = 3); it ended at e
    draft:   tokens[e], tokens[e + 1], ...  (continuing into the draft itself when the copy
             reaches the end: a loop of period p keeps being proposed)

Cost: an incremental index per sequence (`NgramIndex`), a dict from each n-gram to where it
last ended, extended by the tokens added since the previous call — O(new tokens x sizes)
per step, plus the prompt once — and a lookup of `n_max - n_min + 1` suffixes. Never a
rescan of the history.
"""

from __future__ import annotations

import weakref

from xllm.engine.proposer import Proposer
from xllm.engine.sequence import Sequence


class NgramIndex:
    """Where each n-gram (n in [n_min, n_max]) of one token list last ended.

    Invariant: `ends[gram] = e` for the largest e <= `num_indexed` with tokens[e - n : e] ==
    gram (n = len(gram)). Ends reach at most len(tokens) - 1, so the sequence's own suffix
    is never its own match and tokens[e] — the first token to copy — always exists.
    """

    def __init__(self, n_min: int, n_max: int):
        assert 1 <= n_min <= n_max
        self.n_min = n_min
        self.n_max = n_max
        self.ends: dict[tuple[int, ...], int] = {}
        self.num_indexed = 0

    def extend(self, tokens: list[int]) -> None:
        """Index the n-grams ending at positions up to len(tokens) - 1 (tokens only grow)."""
        ends = self.ends
        for e in range(self.num_indexed + 1, len(tokens)):
            for n in range(self.n_min, min(self.n_max, e) + 1):
                ends[tuple(tokens[e - n : e])] = e
        self.num_indexed = max(self.num_indexed, len(tokens) - 1)

    def match(self, tokens: list[int]) -> int | None:
        """End of the latest earlier occurrence of the longest matching suffix, if any."""
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            e = self.ends.get(tuple(tokens[-n:]))
            if e is not None:
                return e
        return None


def copy_from(tokens: list[int], start: int, num_tokens: int) -> list[int]:
    """`num_tokens` tokens copied from `tokens[start:]`, running on into the copy itself
    past the end (start < len(tokens), so every source position exists when read)."""
    draft: list[int] = []
    for src in range(start, start + num_tokens):
        draft.append(tokens[src] if src < len(tokens) else draft[src - len(tokens)])
    return draft


class NgramProposer(Proposer):
    def __init__(self, n_min: int = 2, n_max: int = 4):
        self.n_min = n_min
        self.n_max = n_max
        # One index per live sequence; dropped with the sequence (no forget() to miss).
        self._indexes: weakref.WeakKeyDictionary[Sequence, NgramIndex] = weakref.WeakKeyDictionary()

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        if max_tokens <= 0:
            return []
        index = self._indexes.get(seq)
        if index is None:
            index = self._indexes[seq] = NgramIndex(self.n_min, self.n_max)
        tokens = seq.token_ids
        index.extend(tokens)
        end = index.match(tokens)
        return [] if end is None else copy_from(tokens, end, max_tokens)
