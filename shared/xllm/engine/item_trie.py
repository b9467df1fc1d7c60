"""ItemTrie: the token sequences a constrained beam search may produce (generative
recommendation's valid item ids), as a trie walked one token per step.

A beam sits at a node; the tokens it may take next are the node's children, plus the stop
tokens when the node completes an item (an item that is a prefix of a longer one may end
there). A beam that reaches a leaf has completed an item and finishes. On the last step
max_tokens allows, only tokens that complete an item are allowed, so every finished beam
is an item. Each node's allowed tokens are built once, as tensors, on first use: the
per-step mask is one scatter over the batch's beam rows (beam_search.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

ROOT = 0


class ItemTrie:
    def __init__(self, items: Iterable[Sequence[int]]):
        self.children: list[dict[int, int]] = [{}]
        self.terminal: list[bool] = [False]
        self.num_items = 0
        for item in items:
            self._insert(item)
        if self.num_items == 0:
            raise ValueError("an item trie needs at least one non-empty item")
        self._allowed: dict[tuple[int, bool, tuple[int, ...]], torch.Tensor] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> ItemTrie:
        """A JSON array of token-id arrays (`.json`), else one item a line as
        whitespace-separated token ids."""
        text = Path(path).read_text()
        if str(path).endswith(".json"):
            items = json.loads(text)
        else:
            items = [[int(t) for t in line.split()] for line in text.splitlines() if line.strip()]
        if not isinstance(items, list) or not all(
            isinstance(item, list) and all(type(t) is int for t in item) for item in items
        ):
            raise ValueError(f"{path}: expected a list of token id lists")
        return cls(items)

    def _insert(self, item: Sequence[int]) -> None:
        if not item:
            return
        node = ROOT
        for token in item:
            child = self.children[node].get(token)
            if child is None:
                child = len(self.children)
                self.children[node][token] = child
                self.children.append({})
                self.terminal.append(False)
            node = child
        if not self.terminal[node]:
            self.terminal[node] = True
            self.num_items += 1

    def next_node(self, node: int, token: int) -> int | None:
        """The node after `token`, None when `token` leaves the trie (a stop token)."""
        return self.children[node].get(token)

    def is_leaf(self, node: int) -> bool:
        return not self.children[node]

    def allowed(self, node: int, last: bool, stop_token_ids: tuple[int, ...]) -> torch.Tensor:
        """Token ids a beam at `node` may take next; `last`: the step max_tokens ends, when
        only tokens completing an item (or a stop at a completed one) are allowed."""
        key = (node, last, stop_token_ids)
        tokens = self._allowed.get(key)
        if tokens is None:
            children = self.children[node]
            ids = [t for t, c in children.items() if not last or self.terminal[c]]
            if self.terminal[node]:
                ids += stop_token_ids
            tokens = self._allowed[key] = torch.tensor(ids, dtype=torch.long)
        return tokens

    def contains(self, tokens: Sequence[int]) -> bool:
        node: int | None = ROOT
        for token in tokens:
            node = self.next_node(node, token)
            if node is None:
                return False
        return self.terminal[node]
