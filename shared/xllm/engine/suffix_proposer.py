"""SuffixProposer: drafts from a suffix trie of the sequence's own tokens, by frequency.

Where the n-gram proposer copies what followed the latest match of the sequence's end, this
one counts everything that followed every earlier match (SuffixDecoding, Oliaro et al.
2024): a trie of all substrings of length <= `depth` of the tokens so far, each node
counting how often its substring occurred with a next token. For the longest suffix of the
sequence found in the trie (up to `max_match` tokens) with something after it, the draft
walks down the likeliest child at every step,

    p(child | node) = count(child) / sum of count(children of node)

and stops when the product of those probabilities — the estimated chance that the whole
draft is accepted — falls below `min_probability`, or at `max_tokens`. A sequence that
keeps copying one passage gets long drafts; where earlier continuations disagree, the draft
is short or empty, and the verification computes nothing that was unlikely to be kept.

    tokens:  a b c x ... a b c x ... a b c y ... a b c
    trie:    "a b c" -> x (2), y (1)       p(x) = 2/3: draft x, then x's likeliest child...

Where the sequence's own trie has no continuation, a trie of the recent outputs of every
sequence (`RecentOutputs`, shared by the proposer: repeated requests, templated answers)
is asked the same way. It grows with every output token and is dropped for a fresh one
when it holds `cache_nodes` nodes (0: no shared trie).

Cost, per sequence (`SuffixTrie`): appending a token extends the `depth` deepest nodes of
the sequence's suffixes by one child each — O(depth) per token, the prompt once, never a
rebuild — and the trie holds at most `depth` nodes per token. A proposal is a walk of at
most `max_match` + `max_tokens` nodes.
"""

from __future__ import annotations

import weakref

from xllm.engine.proposer import Proposer
from xllm.engine.sequence import Sequence


class Node:
    __slots__ = ("best", "best_token", "children", "count", "total")

    def __init__(self) -> None:
        self.children: dict[int, Node] = {}
        self.count = 0
        """Occurrences of this node's substring (ending anywhere in the tokens so far)."""
        self.total = 0
        """Sum of the children's counts: the occurrences that have a next token."""
        self.best: Node | None = None
        """The most frequent child (ties: the one seen last), kept as counts grow: a walk
        never scans the children (a one-token suffix may have thousands)."""
        self.best_token = -1


class SuffixTrie:
    """Every substring of length <= `depth` of one growing token list, with counts.

    Invariant: after `extend(tokens)`, `suffixes[l - 1]` is the node of tokens[-l:] for l in
    1 .. min(depth, len(tokens)), and each node's count is the number of its substring's
    occurrences in tokens.
    """

    def __init__(self, depth: int, root: Node | None = None, num_indexed: int = 0):
        assert depth >= 1
        self.depth = depth
        self.root = Node() if root is None else root
        """Its own, or one shared by several token lists (`RecentOutputs`)."""
        self.suffixes: list[Node] = []
        self.num_indexed = num_indexed
        """Tokens before this one are indexed (or, from the start, skipped)."""
        self.num_new_nodes = 0

    def extend(self, tokens: list[int]) -> None:
        """Add the tokens past those already indexed (tokens only grow)."""
        for token in tokens[self.num_indexed :]:
            parents = [self.root, *self.suffixes[: self.depth - 1]]
            suffixes = []
            for parent in parents:
                child = parent.children.get(token)
                if child is None:
                    child = parent.children[token] = Node()
                    self.num_new_nodes += 1
                child.count += 1
                parent.total += 1
                if parent.best is None or child.count >= parent.best.count:
                    parent.best, parent.best_token = child, token
                suffixes.append(child)
            self.suffixes = suffixes
        self.num_indexed = len(tokens)

    def propose(
        self, max_match: int, min_match: int, max_tokens: int, min_probability: float
    ) -> list[int]:
        """The likeliest continuation of the longest matched suffix that has one."""
        for length in range(min(max_match, len(self.suffixes)), min_match - 1, -1):
            node = self.suffixes[length - 1]
            if node.total:
                return likeliest_walk(node, max_tokens, min_probability)
        return []


def likeliest_walk(node: Node, max_tokens: int, min_probability: float) -> list[int]:
    """Down the most frequent child while the product of p(child | node) stays at least
    `min_probability` (ties: the continuation seen last)."""
    draft: list[int] = []
    probability = 1.0
    while node.best is not None and len(draft) < max_tokens:
        token, child = node.best_token, node.best
        probability *= child.count / node.total
        if probability < min_probability:
            break
        draft.append(token)
        node = child
    return draft


class RecentOutputs:
    """One trie over the outputs of every sequence, each indexed through its own cursor (a
    `SuffixTrie` on the shared root); replaced by an empty one at `max_nodes` nodes."""

    def __init__(self, depth: int, max_nodes: int):
        self.depth = depth
        self.max_nodes = max_nodes
        self.root = Node()
        self.num_nodes = 0
        self._cursors: weakref.WeakKeyDictionary[Sequence, SuffixTrie] = weakref.WeakKeyDictionary()

    def extend(self, seq: Sequence) -> SuffixTrie:
        """`seq`'s cursor, past its output tokens so far."""
        cursor = self._cursors.get(seq)
        if cursor is None or cursor.root is not self.root:  # new, or the trie was dropped
            start = seq.num_prompt_tokens if cursor is None else cursor.num_indexed
            cursor = self._cursors[seq] = SuffixTrie(self.depth, self.root, start)
        cursor.num_new_nodes = 0
        cursor.extend(seq.token_ids)
        self.num_nodes += cursor.num_new_nodes
        if self.num_nodes >= self.max_nodes:
            self.root, self.num_nodes = Node(), 0  # cursors on the old one restart lazily
        return cursor


class SuffixProposer(Proposer):
    def __init__(
        self,
        max_tokens: int,
        max_match: int = 8,
        min_match: int = 1,
        min_probability: float = 0.1,
        cache_nodes: int = 0,
    ):
        assert 1 <= min_match <= max_match
        self.max_match = max_match
        self.min_match = min_match
        self.min_probability = min_probability
        # Deep enough that a draft of max_tokens fits below the longest match.
        self.depth = max_match + max_tokens
        self._tries: weakref.WeakKeyDictionary[Sequence, SuffixTrie] = weakref.WeakKeyDictionary()
        self.recent = RecentOutputs(self.depth, cache_nodes) if cache_nodes > 0 else None

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        if max_tokens <= 0:
            return []
        trie = self._tries.get(seq)
        if trie is None:
            trie = self._tries[seq] = SuffixTrie(self.depth)
        trie.extend(seq.token_ids)
        args = (self.max_match, self.min_match, max_tokens, self.min_probability)
        draft = trie.propose(*args)
        if self.recent is not None:
            cursor = self.recent.extend(seq)  # (every step: the shared trie sees every token)
            if not draft and cursor.root is self.recent.root:
                draft = cursor.propose(*args)
        return draft
