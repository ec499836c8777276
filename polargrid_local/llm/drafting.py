"""Speculative decoding's drafting side: what each sequence proposes, and whether proposing pays.

Prompt lookup: each sequence keeps an n-gram index over its prompt and output tokens. When its last few
tokens (at least ``MIN_MATCH``) appeared before, the tokens that followed them then are its draft (of the latest
``OCCURRENCES`` places, the one whose tokens before match the sequence's longest). The
scheduler (batching.py) puts a sequence's next token and its draft into the shared batch with logits for
each, samples them in order with the sequence's own sampler chain, keeps the drafts the samples agree with
and drops the rest of their KV cells: the output is the same as without drafts.

Whether and how much to draft is a cost decision, made each step for the whole batch: ``StepCosts`` learns
what a step of n tokens costs on this model and machine (EWMA by batch size), ``Acceptance`` learns how
often a draft's first token is accepted (per match length) and how often a later one is (given those before it
were), model-wide and per sequence, and ``Drafting.plan`` adds
draft tokens, the likeliest first, while each one's expected tokens pay for its added cost. A batch that
already fills the CPU makes each extra token cost about as much as it could give, so drafting backs off
by itself.
"""
from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import invalid

MODES = ("prompt-lookup", "off")
MIN_MATCH = 2          # 2-gram matches re-find the place after an edit; the cost model keeps the ones that do not pay
LONGEST_MATCH = 8      # matches are measured up to this many tokens: longer ones are accepted more often
OCCURRENCES = 8        # of each n-gram, the latest this many places are weighed: the longest match wins
FIRST_CAP = 4          # a sequence's first drafts are at most this long: a wrong long draft costs steps
MAX_DRAFT = 16         # verifying 16 tokens costs 3.7-5.5 single-token steps on a small model here
PRIOR_STRENGTH = 6.0   # the model-wide priors count as this many observed drafts
SEQUENCE_PRIOR = 1.0   # the model-wide estimate counts as this many of a sequence's own drafts: its own evidence
                       # soon decides (a list reformatted misses at once, whatever the model did elsewhere)
FIRST_MEMORY = 0.99    # per generated token: a sequence's evidence on its first draft tokens fades, so it tries again
NEXT_MEMORY = 0.97     # per generated token, its evidence on the later ones
MODEL_MEMORY = 0.995   # per verified draft: the model-wide estimates drift back to the prior unless refreshed
SLOPE_PRIOR = 0.3      # one more token in a batch of one costs ~0.3 of a step (SmolLM2-135M, 2 threads)
MISS_FACTOR = 0.25     # per miss (fading as FIRST_MEMORY): a tail whose draft was wrong at once is drafted from at
                       # this fraction of the odds (a list's "\n-" proposes the item before; an edited name breaks
                       # each copy of it)
MARGIN = 1.03          # drafts must promise this much more than no drafts: estimates err, a wasted step is sure


def check_mode(value: Any, where: str = "speculative") -> str:
    """A model's ``[models.engine] speculative`` setting: "prompt-lookup" (the default) or "off"."""
    if value is None or value is True:
        return "prompt-lookup"
    if value is False:
        return "off"
    if value == "draft":
        raise invalid(f'{where} = "draft": a draft model is not offered; measured on a 2-core CPU, Qwen2.5-Coder-0.5B '
                      'drafting for the 1.5B decoded slower than the 1.5B alone (README, "Speculative decoding"). '
                      'Use "prompt-lookup" (the default) or "off"', field="speculative")
    if value not in MODES:
        raise invalid(f"{where} must be one of {', '.join(repr(m) for m in MODES)}, not {value!r}", field="speculative")
    return str(value)


def split_speculative(request: Any) -> tuple[Any, bool | None]:
    """A request dict without its local ``speculative`` key, and that key (None when absent): false turns
    drafting off for the request."""
    if not isinstance(request, dict) or "speculative" not in request:
        return request, None
    request = dict(request)
    value = request.pop("speculative")
    if value is not None and not isinstance(value, bool):
        raise invalid(f"speculative must be true or false, not {type(value).__name__}", field="speculative")
    return request, value


class PromptLookup:
    """An n-gram index over one sequence's tokens: what followed the earlier occurrence of its tail (of the latest
    ``OCCURRENCES``) that matches it longest, the latest among equals."""

    def __init__(self, tokens: Sequence[int], min_match: int = MIN_MATCH) -> None:
        if min_match < 1:
            raise ValueError("a prompt-lookup match is at least one token")
        self.min_match = min_match
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], list[int]] = {}   # each min_match-gram -> where its followers are
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        n, seq, after = self.min_match, self.tokens, self.after
        for token in tokens:
            end = len(seq)
            if end >= n:
                places = after.setdefault(tuple(seq[end - n:end]), [])
                places.append(end)
                if len(places) > 2 * OCCURRENCES:
                    del places[:-OCCURRENCES]
            seq.append(token)

    def propose(self, limit: int) -> tuple[list[int], int]:
        """Up to ``limit`` tokens that followed the best earlier occurrence of the sequence's tail, and the
        length of the match (0: no match, no draft). A draft that reaches the end repeats its own period."""
        seq, n = self.tokens, self.min_match
        if limit <= 0 or len(seq) < n:
            return [], 0
        places = self.after.get(tuple(seq[-n:]))
        if not places:
            return [], 0
        at, match = 0, 0
        for place in reversed(places[-OCCURRENCES:]):
            length = n
            while length < LONGEST_MATCH and place - length - 1 >= 0 and seq[place - length - 1] == seq[-length - 1]:
                length += 1
            if length > match:
                at, match = place, length
                if length == LONGEST_MATCH:
                    break
        draft: list[int] = []
        for i in range(limit):
            j = at + i
            draft.append(seq[j] if j < len(seq) else draft[j - len(seq)])
        return draft, match


class StepCosts:
    """Seconds per step by the number of tokens in it, as an EWMA per size. A size not timed lately drifts back
    to what the prior slope makes of the size timed last (the step without drafts, usually), so one slow spell
    cannot shut drafting off for good."""

    def __init__(self, alpha: float = 0.15, memory: float = 0.99) -> None:
        self.alpha, self.memory = alpha, memory
        self.seconds: dict[int, float] = {}
        self.timed_at: dict[int, int] = {}   # size -> the step it was last timed at
        self.steps = 0

    def record(self, n: int, seconds: float) -> None:
        self.steps += 1
        old = self.seconds.get(n)
        if old is None:
            self.seconds[n] = seconds
        else:   # a step slowed by another process moves the estimate only so far
            self.seconds[n] = old + self.alpha * (min(seconds, 3 * old) - old)
        self.timed_at[n] = self.steps

    def cost(self, n: int) -> float | None:
        """Estimated seconds of a step of ``n`` tokens; None before any step was timed."""
        if not self.seconds:
            return None
        at = self.timed_at
        anchor = max((m for m in at if m <= n), key=at.__getitem__, default=None) or max(at, key=at.__getitem__)
        prior = self.seconds[anchor] * (1 + SLOPE_PRIOR * (n - 1)) / (1 + SLOPE_PRIOR * (anchor - 1))
        if n not in self.seconds:
            return prior
        weight = self.memory ** (self.steps - at[n])
        return weight * self.seconds[n] + (1 - weight) * prior


class Acceptance:
    """How often draft tokens are accepted, as two model-wide estimates (decayed counts over priors): the first
    token of a draft, per match length, and each later token given the ones before it were. Copying makes the
    two differ: a draft after an edit is often wrong at once, but one that starts right tends to run on."""

    FIRST_PRIOR = {2: 0.3, 3: 0.5, 4: 0.6, 5: 0.65, 6: 0.7, 7: 0.75, 8: 0.8}
    NEXT_PRIOR = 0.75

    def __init__(self) -> None:
        self.first = {m: [PRIOR_STRENGTH * p, PRIOR_STRENGTH] for m, p in self.FIRST_PRIOR.items()}
        self.next = [PRIOR_STRENGTH * self.NEXT_PRIOR, PRIOR_STRENGTH]

    def rate(self, match: int) -> float:
        """The chance that a draft's first token is accepted, after a match of ``match`` tokens."""
        accepted, tried = self.first[min(max(match, MIN_MATCH), LONGEST_MATCH)]
        return accepted / tried

    def next_rate(self) -> float:
        """The chance that a draft token is accepted when the ones before it in its draft were."""
        return self.next[0] / self.next[1]

    def learn(self, match: int, accepted: int, drafted: int) -> None:
        """One verified draft: ``accepted`` of its ``drafted`` tokens kept."""
        for m, counts in self.first.items():   # estimates not refreshed drift back to their priors
            _fade(counts, MODEL_MEMORY, self.FIRST_PRIOR[m])
        _fade(self.next, MODEL_MEMORY, self.NEXT_PRIOR)
        _tally(self.first[min(max(match, MIN_MATCH), LONGEST_MATCH)], self.next, accepted, drafted)


def _tally(first: list[float], later: list[float], accepted: int, drafted: int) -> None:
    """Count one verified draft into (accepted, tried) pairs: its first token, and the later tokens that were
    tried (each one after a kept token)."""
    first[0] += accepted > 0
    first[1] += 1
    later[0] += max(accepted - 1, 0)
    later[1] += min(accepted + 1, drafted) - 1


def _fade(counts: list[float], memory: float, prior: float) -> None:
    counts[0] = counts[0] * memory + (1 - memory) * PRIOR_STRENGTH * prior
    counts[1] = counts[1] * memory + (1 - memory) * PRIOR_STRENGTH


@dataclass
class SlotDrafts:
    """One sequence's drafting state: its n-gram index, its own evidence, its length cap, its counts."""

    lookup: PromptLookup
    cap: int = FIRST_CAP
    first: list[float] = field(default_factory=lambda: [0.0, 0.0])   # decayed counts: first tokens accepted, tried
    next: list[float] = field(default_factory=lambda: [0.0, 0.0])    # later tokens accepted, tried
    misses: dict[tuple[int, ...], tuple[float, int]] = field(default_factory=dict)   # tail -> (misses, at length)
    drafted: int = 0                # for its request's usage
    accepted: int = 0
    draft: list[int] = field(default_factory=list)   # this step's draft
    match: int = 0
    tail: tuple[int, ...] = ()      # the n-gram this step's draft was found by

    def extend(self, tokens: Sequence[int]) -> None:
        self.lookup.extend(tokens)
        for counts, memory in ((self.first, FIRST_MEMORY), (self.next, NEXT_MEMORY)):
            fade = memory ** len(tokens)
            counts[0] *= fade
            counts[1] *= fade

    def missed(self, tail: tuple[int, ...]) -> float:
        """How many times drafts from ``tail`` were wrong at once, faded by the tokens generated since."""
        count, at = self.misses.get(tail, (0.0, 0))
        return count * FIRST_MEMORY ** (len(self.lookup.tokens) - at) if count else 0.0

    def rates(self, first_prior: float, next_prior: float) -> tuple[float, float]:
        """Its chances of a first draft token kept, and of a later one, its own evidence over the model's."""
        return ((self.first[0] + SEQUENCE_PRIOR * first_prior) / (self.first[1] + SEQUENCE_PRIOR),
                (self.next[0] + SEQUENCE_PRIOR * next_prior) / (self.next[1] + SEQUENCE_PRIOR))


class Drafting:
    """Prompt-lookup drafting for one model's scheduler: plans each step's drafts and learns from their fate.

    Counters for monitoring (a Prometheus exporter may read them): ``tokens_drafted``, ``tokens_accepted``, and
    ``draft_lengths`` (how many drafts of each length were verified).
    """

    def __init__(self, mode: str = "prompt-lookup", min_match: int = MIN_MATCH) -> None:
        self.mode = check_mode(mode)
        self.min_match = min_match
        self.costs = StepCosts()
        self.acceptance = Acceptance()
        self.tokens_drafted = 0
        self.tokens_accepted = 0
        self.draft_lengths: Counter[int] = Counter()

    def stats(self) -> dict[str, Any]:
        """Tokens drafted and accepted since load (types.SpeculativeStats)."""
        drafted, accepted = self.tokens_drafted, self.tokens_accepted
        return {"mode": self.mode, "drafted_tokens": drafted, "accepted_tokens": accepted,
                "acceptance_rate": round(accepted / drafted, 4) if drafted else None}

    def start(self, prompt: Sequence[int]) -> SlotDrafts:
        return SlotDrafts(PromptLookup(prompt, self.min_match))

    def plan(self, slots: Sequence[tuple[SlotDrafts, int]], generating: int, room: int) -> None:
        """Set each ``SlotDrafts.draft`` for a decode step. ``slots``: the sequences that may draft, each with the
        most draft tokens it may take (budget, context); ``generating``: the sequences in the step (one token
        each without drafts); ``room``: free batch entries.

        Draft tokens are ranked by their chance of being kept (a token is kept only if those before it in its
        draft are); the step takes the first m of that ranking for the m that gives the most expected tokens
        per second, m = 0 (no drafts) included. Costs learned from a noisy machine need not grow smoothly, so
        every m is weighed, not only the next token."""
        candidates = []
        next_prior = self.acceptance.next_rate()
        for state, most in slots:
            state.draft, state.match = [], 0
            draft, match = state.lookup.propose(min(most, state.cap))
            if draft:
                state.tail = tuple(state.lookup.tokens[-self.min_match:])
                first, later = state.rates(self.acceptance.rate(match), next_prior)
                first *= MISS_FACTOR ** state.missed(state.tail)
                candidates.append((state, draft, match, first, later))
        base = self.costs.cost(generating)
        if not candidates or room <= 0 or base is None:   # nothing timed yet: one step without drafts first
            return
        heap = [(-first, i, 1) for i, (_, _, _, first, _) in enumerate(candidates)]
        heapq.heapify(heap)
        ranking: list[int] = []   # candidate index of each draft token, likeliest first
        expected, best, best_m = float(generating), MARGIN * generating / base, 0
        while heap and len(ranking) < room:
            neg_q, i, depth = heapq.heappop(heap)
            ranking.append(i)
            expected -= neg_q
            cost = self.costs.cost(generating + len(ranking))
            assert cost is not None
            if expected / cost > best:
                best, best_m = expected / cost, len(ranking)
            later, length = candidates[i][4], len(candidates[i][1])
            if depth < length:
                heapq.heappush(heap, (neg_q * later, i, depth + 1))
        taken = Counter(ranking[:best_m])
        for i, (state, draft, match, _, _) in enumerate(candidates):
            state.draft, state.match = draft[:taken[i]], match

    def learn(self, state: SlotDrafts, accepted: int) -> None:
        """The fate of the sequence's draft this step: ``accepted`` of its tokens were kept."""
        drafted = len(state.draft)
        if not drafted:
            return
        self.acceptance.learn(state.match, accepted, drafted)
        _tally(state.first, state.next, accepted, drafted)
        if accepted:
            state.misses.pop(state.tail, None)
        else:
            state.misses[state.tail] = (state.missed(state.tail) + 1, len(state.lookup.tokens))
        state.drafted += drafted
        state.accepted += accepted
        self.tokens_drafted += drafted
        self.tokens_accepted += accepted
        self.draft_lengths[drafted] += 1
        # The cap: doubled by a draft kept whole, halved by one wrong at once; a draft wrong past its start
        # found an edit in what it copied, and the copy goes on after it.
        if accepted == drafted:
            state.cap = min(MAX_DRAFT, state.cap * 2)
        elif not accepted:
            state.cap = max(2, state.cap // 2)
        state.draft = []
