"""Speculative decoding's drafting side in isolation (llm/drafting.py): the n-gram lookup, the cost model, the
acceptance estimates and each step's plan. The scheduler's verify step runs on the real model in
test_speculative.py."""
from __future__ import annotations

import pytest
from polargrid import errors as sdk

from polargrid_local.llm.drafting import (
    FIRST_CAP,
    Acceptance,
    Drafting,
    PromptLookup,
    StepCosts,
    check_mode,
    split_speculative,
)


def test_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2], min_match=3)
    assert lookup.propose(4) == ([], 0)            # [1, 2] is too short a match for a 3-gram index
    lookup.extend([3])
    draft, match = lookup.propose(4)
    assert draft == [7, 8, 1, 2] and match == 3     # the latest occurrence of 1 2 3 wins over the first one


def test_lookup_prefers_the_occurrence_that_matches_longest():
    lookup = PromptLookup([7, 1, 2, 3, 4, 9, 2, 3, 5, 8, 7, 1, 2, 3])
    draft, match = lookup.propose(2)
    assert draft == [4, 9] and match == 4           # 7 1 2 3 matched, not the later 9 2 3


def test_lookup_measures_the_match_and_repeats_a_period_past_the_end():
    lookup = PromptLookup([5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7])
    draft, match = lookup.propose(7)
    assert draft == [8, 5, 6, 7, 8, 5, 6]            # runs off the end: continues its own period
    assert match == 7                                # 6 7 8 5 6 7 (and 5 before) match back to the start


def test_lookup_needs_a_min_match_gram_and_a_limit():
    assert PromptLookup([1, 2, 3, 1, 2], min_match=3).propose(3) == ([], 0)
    assert PromptLookup([1, 2, 3, 4, 1, 2, 3]).propose(0) == ([], 0)
    assert PromptLookup([1, 2, 1, 2]).propose(2) == ([1, 2], 2)
    assert PromptLookup([1, 2, 3, 4, 5]).propose(2) == ([], 0)


def test_step_costs_are_learned_and_drift_back_to_the_prior_when_not_timed():
    costs = StepCosts()
    assert costs.cost(1) is None
    costs.record(1, 0.010)
    assert costs.cost(1) == pytest.approx(0.010)
    assert costs.cost(5) == pytest.approx(0.010 * (1 + 0.3 * 4))   # the prior slope, from the size timed
    costs.record(5, 0.050)                                          # a slow spell while drafting
    assert costs.cost(5) == pytest.approx(0.050)
    for _ in range(300):
        costs.record(1, 0.010)                                      # no drafts for a while
    assert costs.cost(5) == pytest.approx(0.022, rel=0.1)            # so drafts get tried again
    for _ in range(50):
        costs.record(1, 0.020)                                      # learned online: the machine got slower
    assert costs.cost(1) == pytest.approx(0.020, rel=0.01)


def test_one_slow_step_moves_the_estimate_only_a_little():
    costs = StepCosts()
    costs.record(2, 0.010)
    costs.record(2, 10.0)   # another process took the CPU for a while
    assert costs.cost(2) < 0.015


def test_acceptance_learns_first_tokens_per_match_length_and_later_ones_apart_and_drifts_back():
    acceptance = Acceptance()
    start, later = acceptance.rate(3), acceptance.next_rate()
    for _ in range(40):
        acceptance.learn(3, 0, 4)          # wrong at once: says nothing of later tokens
    assert acceptance.rate(3) < 0.1 < start
    assert acceptance.next_rate() == pytest.approx(later)
    assert acceptance.rate(8) == pytest.approx(Acceptance.FIRST_PRIOR[8], abs=0.01)
    for _ in range(40):
        acceptance.learn(8, 8, 8)          # copying: whole drafts kept
    assert acceptance.next_rate() > 0.9 and acceptance.rate(8) > 0.9
    for _ in range(2000):
        acceptance.learn(8, 4, 4)          # other evidence, long after: the 3-gram estimate returns toward its prior
    assert acceptance.rate(3) > 0.4


def plan_for(drafting: Drafting, lookups: list[list[int]], most: int = 16) -> list[list[int]]:
    states = [drafting.start(tokens) for tokens in lookups]
    drafting.plan([(s, most) for s in states], generating=len(states), room=512)
    return [s.draft for s in states]


COPYING = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3]


def test_no_draft_before_a_step_was_timed():
    assert plan_for(Drafting(), [COPYING]) == [[]]


def test_a_cheap_step_and_a_likely_draft_give_a_draft():
    drafting = Drafting()
    drafting.costs.record(1, 0.010)
    (draft,) = plan_for(drafting, [COPYING])
    assert draft[:1] == [4] and len(draft) <= FIRST_CAP


def test_a_full_batch_makes_drafting_back_off():
    drafting = Drafting()
    for n in range(1, 40):   # a compute-bound machine: every token costs the same
        drafting.costs.record(n, 0.010 * n)
    assert plan_for(drafting, [COPYING] * 8) == [[]] * 8


def test_drafts_stop_where_they_stop_paying():
    drafting = Drafting()
    drafting.costs.record(1, 0.010)
    state = drafting.start(COPYING)
    state.cap = 16
    for rate, longest in ((0.99, 16), (0.5, 1)):
        state.first, state.next = [1000 * rate, 1000], [1000 * rate, 1000]
        drafting.plan([(state, 16)], generating=1, room=512)
        assert len(state.draft) >= longest if rate > 0.9 else len(state.draft) <= longest


QWEN_COSTS = {1: 0.036, 2: 0.046, 3: 0.055, 4: 0.057, 5: 0.080, 8: 0.088, 12: 0.112, 16: 0.135}   # measured


def test_a_sequence_whose_drafts_miss_at_once_soon_stops_though_others_copy():
    """A list reformatted: each item's 2-gram proposes what followed it in the prompt (a comma), never right. The
    model-wide estimates, learned from sequences that copy, must not keep it drafting."""
    drafting = Drafting()
    for n, seconds in QWEN_COSTS.items():
        drafting.costs.record(n, seconds)
    for _ in range(60):
        drafting.acceptance.learn(2, 15, 15)
    items = [[100 + 2 * i, 101 + 2 * i] for i in range(30)]            # two-token items
    prompt = [token for item in items for token in (*item, 7)]         # "a b, c d, ..." (7: the comma)
    state = drafting.start(prompt)
    wasted = 0
    for item in items:
        state.extend([8, 9, *item])                                     # "\n- a b": a new 2-gram each time
        drafting.plan([(state, 16)], generating=1, room=512)
        if state.draft:
            assert state.draft[0] == 7
            wasted += len(state.draft)
            drafting.learn(state, 0)
    assert wasted <= 12, wasted


def test_a_tail_that_missed_before_is_drafted_from_less_eagerly():
    drafting = Drafting()
    drafting.costs.record(1, 0.010)
    state = drafting.start(COPYING)
    drafting.plan([(state, 16)], generating=1, room=512)
    assert state.draft
    drafting.learn(state, 0)
    assert state.missed((2, 3)) == 1
    state.first = [50.0, 50.0]                       # its other drafts were right
    drafting.plan([(state, 16)], generating=1, room=512)
    assert state.draft == []                          # but this tail's was not
    state.lookup.tokens[:0] = [0] * 300               # long after (as if 300 tokens were generated)
    assert state.missed((2, 3)) < 0.1
    drafting.plan([(state, 16)], generating=1, room=512)
    assert state.draft                                # the miss has faded: the tail is tried again


def test_a_draft_respects_the_room_the_budget_gives():
    drafting = Drafting()
    drafting.costs.record(1, 0.010)
    state = drafting.start(COPYING)
    drafting.plan([(state, 1)], generating=1, room=512)
    assert len(state.draft) == 1


def test_learning_moves_the_cap_and_the_counts():
    drafting = Drafting()
    drafting.costs.record(1, 0.010)
    state = drafting.start(COPYING)
    state.draft, state.match = [4, 5, 6, 7], 3
    drafting.learn(state, 4)
    assert state.cap == 2 * FIRST_CAP and (state.drafted, state.accepted) == (4, 4)
    state.draft, state.match = [1, 2, 3, 4, 5, 6, 7, 8], 3
    drafting.learn(state, 1)                          # wrong past its start: an edit, the copy goes on
    assert state.cap == 2 * FIRST_CAP and (state.drafted, state.accepted) == (12, 5)
    state.draft = [1, 2, 3]
    drafting.learn(state, 0)                          # wrong at once
    assert state.cap == FIRST_CAP
    assert state.first == [2, 3] and state.next == [3 + 0, 3 + 1 + 0]
    assert drafting.stats() == {"mode": "prompt-lookup", "drafted_tokens": 15, "accepted_tokens": 5,
                                "acceptance_rate": pytest.approx(5 / 15, abs=1e-4)}


def test_the_controls_are_checked():
    assert check_mode(None) == check_mode(True) == "prompt-lookup"
    assert check_mode(False) == check_mode("off") == "off"
    with pytest.raises(sdk.ValidationError, match="speculative must be one of"):
        check_mode("medusa")
    assert split_speculative({"model": "m", "speculative": False}) == ({"model": "m"}, False)
    assert split_speculative({"model": "m"}) == ({"model": "m"}, None)
    with pytest.raises(sdk.ValidationError, match="speculative must be true or false"):
        split_speculative({"speculative": "no"})
