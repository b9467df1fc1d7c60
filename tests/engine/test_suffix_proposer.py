"""SuffixProposer: the likeliest continuation of the longest matched suffix, by counts kept
incrementally in a suffix trie — checked against the definition computed by brute force."""

from __future__ import annotations

import gc
import random

from xllm.engine.sequence import Sequence
from xllm.engine.suffix_proposer import SuffixProposer
from xllm.protocol import SamplingParams


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams())


def occurrence_ends(tokens: list[int], pattern: list[int]) -> list[int]:
    n = len(pattern)
    return [i + n for i in range(len(tokens) - n + 1) if tokens[i : i + n] == pattern]


def brute_force(tokens, max_match, min_match, max_tokens, min_probability) -> list[int]:
    """The definition: the longest suffix (max_match .. min_match) occurring earlier with a
    next token; then, while the product of p(next | text so far) >= min_probability, the
    most frequent next token (ties: the one that occurred last)."""
    for length in range(min(max_match, len(tokens)), min_match - 1, -1):
        text = tokens[-length:]
        if any(end < len(tokens) for end in occurrence_ends(tokens, text)):
            break
    else:
        return []
    draft: list[int] = []
    probability = 1.0
    while len(draft) < max_tokens:
        ends = [e for e in occurrence_ends(tokens, text) if e < len(tokens)]
        if not ends:
            break
        counts: dict[int, int] = {}
        last: dict[int, int] = {}
        for e in ends:
            counts[tokens[e]] = counts.get(tokens[e], 0) + 1
            last[tokens[e]] = e
        token = max(counts, key=lambda t: (counts[t], last[t]))
        probability *= counts[token] / len(ends)
        if probability < min_probability:
            break
        draft.append(token)
        text = text + [token]
    return draft


def test_proposes_the_most_frequent_continuation():
    proposer = SuffixProposer(max_tokens=4, max_match=3, min_probability=0.0)
    # After "1 2": x=7 twice then 8, y=9 once: 7 wins though 9 is the latest.
    tokens = [1, 2, 7, 8, 5, 1, 2, 7, 8, 6, 1, 2, 9, 0, 1, 2]
    assert proposer.propose(seq_of(tokens), 2) == [7, 8]


def test_the_draft_stops_where_its_chance_falls_below_the_threshold():
    tokens = [1, 2, 7, 8, 5, 1, 2, 7, 3, 6, 1, 2, 9, 0, 1, 2]
    # p(7 | 1 2) = 2/3, then p(3 | 1 2 7) = 1/2 (a tie with 8: the later one): 1/3 in all.
    assert SuffixProposer(4, 3, min_probability=0.5).propose(seq_of(tokens), 4) == [7]
    assert SuffixProposer(4, 3, min_probability=0.3).propose(seq_of(tokens), 4) == [7, 3, 6, 1]
    assert SuffixProposer(4, 3, min_probability=0.7).propose(seq_of(tokens), 4) == []


def test_prefers_the_longest_match():
    # "9 1 2" occurred once, followed by 4; "1 2" more often by 3.
    tokens = [1, 2, 3, 1, 2, 3, 9, 1, 2, 4, 9, 1, 2]
    assert SuffixProposer(2, 3, min_probability=0.0).propose(seq_of(tokens), 1) == [4]
    assert SuffixProposer(2, 2, min_probability=0.0).propose(seq_of(tokens), 1) == [3]


def test_no_match_no_draft_and_never_more_than_asked():
    proposer = SuffixProposer(max_tokens=4)
    assert proposer.propose(seq_of([1, 2, 3, 4, 5]), 4) == []
    assert proposer.propose(seq_of([1, 2, 3, 1, 2]), 0) == []
    assert proposer.propose(seq_of([1, 2, 3, 4, 1, 2]), 1) == [3]


def test_matches_the_definition_on_random_token_lists_grown_incrementally():
    rng = random.Random(0)
    for trial in range(30):
        k, max_match = rng.randint(1, 6), rng.randint(1, 6)
        min_probability = rng.choice([0.0, 0.1, 0.3, 0.6])
        proposer = SuffixProposer(k, max_match, min_probability=min_probability)
        vocab = rng.choice([3, 5, 20])  # small vocabularies repeat a lot
        seq = seq_of([rng.randrange(vocab) for _ in range(rng.randint(1, 20))])
        for _ in range(25):
            got = proposer.propose(seq, k)
            assert got == brute_force(seq.token_ids, max_match, 1, k, min_probability), trial
            # Tokens arrive one at a time or several at once (kept drafts).
            seq.token_ids.extend(rng.randrange(vocab) for _ in range(rng.randint(1, 4)))


def test_the_trie_is_dropped_with_its_sequence():
    proposer = SuffixProposer(max_tokens=4)
    seq = seq_of([1, 2, 3, 1, 2])
    proposer.propose(seq, 2)
    assert len(proposer._tries) == 1
    del seq
    gc.collect()
    assert len(proposer._tries) == 0


def output_seq(prompt: list[int], output: list[int]) -> Sequence:
    seq = seq_of(prompt)
    seq.token_ids.extend(output)
    return seq


def test_the_recent_outputs_trie_drafts_what_other_requests_generated():
    proposer = SuffixProposer(max_tokens=3, cache_nodes=1000)
    first = output_seq([1, 2, 3], [50, 51, 52, 53, 54])
    assert proposer.propose(first, 3) == []  # nothing repeats within it
    # Another request's output reaches 51: its own tokens never had it, the earlier did.
    second = output_seq([9, 8, 7], [40, 51])
    assert proposer.propose(second, 3) == [52, 53, 54]
    # Its own continuation comes first when it has one.
    third = output_seq([51, 60, 61, 51], [])
    assert proposer.propose(third, 2) == [60, 61]
    # Without the shared trie: nothing.
    assert SuffixProposer(max_tokens=3).propose(output_seq([9, 8, 7], [40, 51]), 3) == []


def test_the_recent_outputs_trie_is_replaced_when_full():
    proposer = SuffixProposer(max_tokens=2, max_match=2, cache_nodes=30)
    first = output_seq([1], list(range(100, 120)))  # ~4 nodes per token: fills it
    proposer.propose(first, 2)
    assert proposer.recent.num_nodes < 30
    second = output_seq([2], [105])  # 105 -> 106 was in the dropped trie
    assert proposer.propose(second, 2) == []
