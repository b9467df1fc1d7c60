"""NgramProposer: the longest recent n-gram match, and its index kept incrementally."""

from __future__ import annotations

import gc
import random

from xllm.engine.ngram_proposer import NgramProposer, copy_from
from xllm.engine.sequence import Sequence
from xllm.protocol import SamplingParams


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams())


def rescan(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """The definition, by brute force: longest suffix first, its latest earlier end."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[-n:]
        for end in range(len(tokens) - 1, n - 1, -1):
            if tokens[end - n : end] == suffix:
                return copy_from(tokens, end, k)
    return []


def test_proposes_what_followed_the_latest_longest_match():
    proposer = NgramProposer(n_min=1, n_max=3)
    # "7 8 9" occurs at 0 and at 5 (latest); the suffix "7 8 9" matches both: take 5's.
    tokens = [7, 8, 9, 1, 2, 7, 8, 9, 3, 4, 5, 7, 8, 9]
    assert proposer.propose(seq_of(tokens), 3) == [3, 4, 5]


def test_prefers_a_longer_match_over_a_later_shorter_one():
    proposer = NgramProposer(n_min=1, n_max=3)
    # "8 9" then 1 at the start (a 3-gram "7 8 9" with it); "9" alone later is followed by 6.
    tokens = [7, 8, 9, 1, 2, 9, 6, 0, 7, 8, 9]
    assert proposer.propose(seq_of(tokens), 2) == [1, 2]


def test_a_loop_is_proposed_past_the_end_of_the_history():
    proposer = NgramProposer(n_min=2, n_max=2)
    assert proposer.propose(seq_of([5, 1, 2, 1, 2]), 5) == [1, 2, 1, 2, 1]


def test_no_match_no_draft_and_never_more_than_asked():
    proposer = NgramProposer(n_min=2, n_max=4)
    assert proposer.propose(seq_of([1, 2, 3, 4, 5]), 4) == []
    assert proposer.propose(seq_of([1, 2, 3, 1, 2]), 0) == []
    assert len(proposer.propose(seq_of([1, 2, 3, 1, 2]), 1)) == 1


def test_the_incremental_index_agrees_with_a_rescan_as_tokens_arrive():
    rng = random.Random(0)
    for trial in range(30):
        n_min, n_max = rng.choice([(1, 1), (1, 3), (2, 4), (3, 5)])
        proposer = NgramProposer(n_min, n_max)
        seq = seq_of([rng.randrange(4) for _ in range(rng.randrange(1, 30))])
        for _ in range(40):
            k = rng.randrange(1, 6)
            want = rescan(seq.token_ids, n_min, n_max, k)
            assert proposer.propose(seq, k) == want, (trial, seq.token_ids)
            # Several tokens may arrive between calls (accepted drafts): 1 to 4 here.
            seq.token_ids.extend(rng.randrange(4) for _ in range(rng.randrange(1, 5)))


def test_the_index_goes_with_its_sequence():
    proposer = NgramProposer()
    seq = seq_of([1, 2, 3, 1, 2])
    proposer.propose(seq, 2)
    assert len(proposer._indexes) == 1
    del seq
    gc.collect()
    assert len(proposer._indexes) == 0
