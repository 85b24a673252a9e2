"""Refining a solved allocation against measured KL divergence, where the additive error model is off.

The profile predicts a mix's damage as a sum over tensors; at very low bits damage compounds and the sum misjudges
how the kinds of tensor (attention, FFN, embeddings ...) trade against each other. The search keeps one weight per
tensor kind, starting at 1: each candidate scales one kind's predicted costs by a factor, solves again for the same
size, and is measured (by the caller) only when it gives a different mix. The best candidate of a round becomes the
new incumbent when it measures better; the search ends when a round finds nothing better or the time is up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dynq.core.qtypes import QType

Choice = Mapping[str, QType]
FACTORS = (2.0, 0.5)


@dataclass(frozen=True)
class Trial:
    """One measured mix: the kind weights it was solved with and its measured KL divergence."""

    weights: dict[str, float]
    measured: float
    accepted: bool


@dataclass(frozen=True)
class Refined:
    weights: dict[str, float]  # the incumbent's kind weights (1 = the profile as measured)
    choice: Choice
    first: float  # measured KL divergence of the unrefined solution
    best: float  # and of the refined one
    trials: tuple[Trial, ...]
    seconds: float


def scaled_costs(
    costs: Mapping[str, Mapping[str, float]], kind_of: Callable[[str], str], weights: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """Every tensor's costs times its kind's weight."""
    return {n: {t: c * weights.get(kind_of(n), 1.0) for t, c in by_type.items()} for n, by_type in costs.items()}


def choice_key(choice: Choice) -> tuple[tuple[str, str], ...]:
    """A mix as a hashable value: two choices are the same mix when their keys are equal."""
    return tuple(sorted((n, t.name) for n, t in choice.items()))


def refine(
    kinds: Sequence[str],
    solve: Callable[[Mapping[str, float]], Choice],
    measure: Callable[[Choice], float],
    *,
    seconds: float,
    factors: Sequence[float] = FACTORS,
    clock: Callable[[], float] = time.monotonic,
) -> Refined:
    """Coordinate search over kind weights (see the module doc). `solve(weights)` gives the mix for those weights at
    the fixed size, `measure(choice)` its KL divergence; at least the unrefined mix is measured, and no new
    measurement starts after `seconds`."""
    started = clock()
    weights = dict.fromkeys(kinds, 1.0)
    incumbent = solve(weights)
    first = best = measure(incumbent)
    trials = [Trial(dict(weights), first, True)]
    seen = {choice_key(incumbent)}
    while clock() - started < seconds:
        round_best: tuple[float, dict[str, float], Choice] | None = None
        for kind in kinds:
            for f in factors:
                if clock() - started >= seconds:
                    break
                trial = weights | {kind: weights[kind] * f}
                choice = solve(trial)
                if choice_key(choice) in seen:
                    continue
                seen.add(choice_key(choice))
                m = measure(choice)
                trials.append(Trial(trial, m, False))
                if m < best and (round_best is None or m < round_best[0]):
                    round_best = (m, trial, choice)
        if round_best is None:
            break
        best, weights, incumbent = round_best
        trials = [t if t.weights != weights else Trial(t.weights, t.measured, True) for t in trials]
    return Refined(weights, incumbent, first, best, tuple(trials), clock() - started)
