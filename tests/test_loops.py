from __future__ import annotations

import pytest

from dynq.eval.loops import Continuation, loop_period, loop_rate


@pytest.mark.parametrize(
    ("tokens", "period"),
    [
        ([1, 2, 3, 4, 5, 6, 7] + [9] * 40, 1),  # one token forever (blank lines)
        (list(range(100)) + [5, 6, 7] * 20, 3),
        (list(range(50)) + list(range(200, 240)) * 4, 40),  # a repeated 40-token line
        (list(range(300)), None),  # no repetition
        ([1, 2] * 10, None),  # too short to call it a loop (window 32 + period)
        (list(range(100)) + [5, 6, 7] * 8 + [8], None),  # the repetition was broken at the end
        (list(range(100)) + list(range(300, 370)) * 3, None),  # period 70 is beyond MAX_PERIOD
    ],
)
def test_loop_period(tokens: list[int], period: int | None) -> None:
    assert loop_period(tokens) == period


def test_smallest_period_wins() -> None:
    assert loop_period(list(range(20)) + [1, 2] * 60) == 2  # also periodic with 4, 6, ...


def test_stopped_generation_is_not_a_loop() -> None:
    def c(stopped: bool, period: int | None) -> Continuation:
        return Continuation("code", "p", "greedy", "", 10, stopped, period)

    assert not c(True, 3).looped
    assert c(False, 3).looped
    assert not c(False, None).looped
    assert loop_rate([c(False, 1), c(True, 1), c(False, None), c(False, 2)]) == 0.5
