"""The size-budget solver: pick one type per unit of tensors to minimise predicted damage within a byte budget.

This is a multiple-choice knapsack. `solve` keeps each unit's Pareto front of (bytes, cost) options and its lower
convex hull, solves the LP relaxation exactly by taking the hull's upgrades in order of cost saved per byte (its
optimum has at most one fractional unit; its value is the lower bound reported), rounds down, fills the leftover
bytes with the best upgrades over all front options and improves with pairwise swaps (one unit down, another up).
Then a dynamic programme over Pareto fronts of (bytes, cost) states, pruned by the incumbent, by reduced costs at
the LP's price of a byte and by the LP bound of the units still to come, either proves the result optimal or finds
a better one. `solve_exact` is that programme without an incumbent or a limit, for tests and small cases."""

from __future__ import annotations

import itertools
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dynq.core.qtypes import QType
from dynq.core.units import MIB
from dynq.errors import DynqError

# Work (state x option pairs) per pass of the exact programme inside `solve`: past it, fronts are thinned to the
# most promising states (a good solution, no longer a proof). A better solution narrows the next pass.
DP_WORK = 3_000_000
_DP_PASSES = 3
_SWAP_ROUNDS = 16  # pairwise-swap rounds after the greedy fill; each round is O(options log options)


@dataclass(frozen=True)
class Option:
    """One candidate type for a unit: its bytes and predicted cost (summed over the unit's tensors)."""

    qtype: QType
    nbytes: int
    cost: float


@dataclass(frozen=True)
class Unit:
    """Tensors that must share one type (usually one tensor) and the types they may take."""

    names: tuple[str, ...]
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Solution:
    """The chosen type of every tensor; `lower_bound` is a proven lower bound on the optimal cost at this budget."""

    choice: dict[str, QType]
    nbytes: int
    cost: float
    lower_bound: float
    exact: bool

    @property
    def gap(self) -> float:
        """How far above the optimum the cost can be, at most."""
        return max(0.0, self.cost - self.lower_bound)


@dataclass(frozen=True)
class _Front:
    """A unit's useful options: bytes ascending, cost strictly descending (dominated options dropped)."""

    unit: Unit
    options: tuple[Option, ...]
    nbytes: tuple[int, ...]
    costs: tuple[float, ...]
    hull: tuple[int, ...]  # indices of the lower convex hull, from the smallest option to the cheapest


def below_minimum(target: int, minimum: int) -> DynqError:
    return DynqError(
        f"target {target} B is below the smallest reachable size {minimum} B ({minimum / MIB:.2f} MiB) with these types"
    )


def _label(unit: Unit) -> str:
    return unit.names[0] if len(unit.names) == 1 else f"{unit.names[0]} (tied with {', '.join(unit.names[1:])})"


def _pareto(unit: Unit) -> tuple[Option, ...]:
    """Options no other option beats on both bytes and cost; a dominated option is never needed."""
    kept: list[Option] = []
    for o in sorted(unit.options, key=lambda o: (o.nbytes, o.cost)):
        if not kept or o.cost < kept[-1].cost:
            kept.append(o)
    return tuple(kept)


def _lower_hull(options: Sequence[Option]) -> tuple[int, ...]:
    """Monotone chain over the front; collinear middle points go, since the LP gains nothing from them."""
    hull: list[int] = []
    for i, p in enumerate(options):
        while len(hull) >= 2:
            o, a = options[hull[-2]], options[hull[-1]]
            cross = (a.nbytes - o.nbytes) * (p.cost - o.cost) - (a.cost - o.cost) * (p.nbytes - o.nbytes)
            if cross > 0:
                break
            hull.pop()
        hull.append(i)
    return tuple(hull)


def _front(unit: Unit) -> _Front:
    if not unit.names:
        raise DynqError("a solver unit has no tensor names")
    if not unit.options:
        raise DynqError(f"tensor {_label(unit)}: no candidate type is available")
    for o in unit.options:
        if o.nbytes < 0 or not math.isfinite(o.cost):
            raise DynqError(f"tensor {_label(unit)}: option {o.qtype.name} has {o.nbytes} B and cost {o.cost}")
    opts = _pareto(unit)
    return _Front(unit, opts, tuple(o.nbytes for o in opts), tuple(o.cost for o in opts), _lower_hull(opts))


def _fronts(units: Sequence[Unit], budget_bytes: int) -> list[_Front]:
    """Validate the units and the budget; one error line for each way they can be wrong."""
    seen: set[str] = set()
    for u in units:
        dup = seen.intersection(u.names)
        if dup:
            raise DynqError(f"tensor {sorted(dup)[0]} is in more than one solver unit")
        seen.update(u.names)
    fronts = [_front(u) for u in units]
    minimum = sum(f.nbytes[0] for f in fronts)
    if minimum > budget_bytes:
        raise below_minimum(budget_bytes, minimum)
    return fronts


def _solution(fronts: Sequence[_Front], pos: Sequence[int], lower_bound: float, exact: bool) -> Solution:
    chosen = [f.options[i] for f, i in zip(fronts, pos, strict=True)]
    choice = {name: o.qtype for f, o in zip(fronts, chosen, strict=True) for name in f.unit.names}
    cost = math.fsum(o.cost for o in chosen)
    return Solution(choice, sum(o.nbytes for o in chosen), cost, cost if exact else min(lower_bound, cost), exact)


def _tolerance(fronts: Sequence[_Front]) -> float:
    """Cost differences below this are float noise, not improvements."""
    return 1e-12 * max(1e-300, math.fsum(max(abs(c) for c in f.costs) for f in fronts))


# --- the LP relaxation and its rounding ---


def _lp_greedy(fronts: Sequence[_Front], budget: int) -> tuple[list[int], float, float]:
    """Take hull upgrades by cost saved per byte while they fit: the LP optimum, rounded down.

    Returns the front positions, the LP bound and the price of a byte at the critical (fractional) upgrade.
    """
    pos = [0] * len(fronts)
    upgrades: list[tuple[float, int, int]] = []
    for u, f in enumerate(fronts):
        for k in range(1, len(f.hull)):
            a, b = f.hull[k - 1], f.hull[k]
            upgrades.append(((f.costs[a] - f.costs[b]) / (f.nbytes[b] - f.nbytes[a]), u, b))
    upgrades.sort(key=lambda t: (-t[0], t[1], t[2]))  # within a unit the hull's own order, as slopes decrease
    left = budget - sum(f.nbytes[0] for f in fronts)
    cost = math.fsum(f.costs[0] for f in fronts)
    for price, u, b in upgrades:
        f, a = fronts[u], pos[u]
        if b <= a:
            continue  # slopes a rounding error apart came out of order: the later point is already taken
        step = f.nbytes[b] - f.nbytes[a]
        if step > left:
            return pos, cost - price * left, price  # the one fractional unit of the LP optimum
        pos[u], left, cost = b, left - step, cost - (f.costs[a] - f.costs[b])
    return pos, cost, 0.0


def _best_fit(f: _Front, at: int, room: int) -> int:
    """The cheapest option of the unit that costs at most `room` more bytes than option `at`."""
    return bisect_right(f.nbytes, f.nbytes[at] + room) - 1


def _fill(fronts: Sequence[_Front], pos: list[int], left: int, tol: float) -> int:
    """Spend the leftover bytes: repeatedly make the single-unit upgrade that saves the most and fits."""
    while True:
        best, best_u, best_j = tol, -1, -1
        for u, f in enumerate(fronts):
            j = _best_fit(f, pos[u], left)
            if j > pos[u] and f.costs[pos[u]] - f.costs[j] > best:
                best, best_u, best_j = f.costs[pos[u]] - f.costs[j], u, j
        if best_u < 0:
            return left
        left -= fronts[best_u].nbytes[best_j] - fronts[best_u].nbytes[pos[best_u]]
        pos[best_u] = best_j


def _upgrade_table(fronts: Sequence[_Front], pos: Sequence[int]) -> tuple[list[int], list[tuple[float, int, int]]]:
    """Every upgrade by extra bytes, with the best and second-best (from another unit) saving up to each size."""
    moves = sorted(
        (f.nbytes[j] - f.nbytes[pos[u]], f.costs[pos[u]] - f.costs[j], u, j)
        for u, f in enumerate(fronts)
        for j in range(pos[u] + 1, len(f.options))
    )
    deltas: list[int] = []
    tops: list[tuple[float, int, int]] = []  # (saving, unit, option) of the best; second best kept alongside
    seconds: list[tuple[float, int, int]] = []
    top: tuple[float, int, int] = (-math.inf, -1, -1)
    second: tuple[float, int, int] = (-math.inf, -1, -1)
    for delta, saving, u, j in moves:
        if saving > top[0]:
            if u != top[1]:
                second = top
            top = (saving, u, j)
        elif saving > second[0] and u != top[1]:
            second = (saving, u, j)
        deltas.append(delta)
        tops.append(top)
        seconds.append(second)
    return deltas, [t for pair in zip(tops, seconds, strict=True) for t in pair]


def _best_swap(fronts: Sequence[_Front], pos: Sequence[int], left: int, tol: float) -> tuple[int, int, int, int] | None:
    """The downgrade of one unit plus upgrade of another that lowers the cost most within the budget."""
    deltas, table = _upgrade_table(fronts, pos)
    best, found = tol, None
    for a, f in enumerate(fronts):
        for i in range(pos[a]):
            freed = f.nbytes[pos[a]] - f.nbytes[i]
            k = bisect_right(deltas, left + freed) - 1
            if k < 0:
                continue
            top, second = table[2 * k], table[2 * k + 1]
            saving, b, j = top if top[1] != a else second
            gain = saving - (f.costs[i] - f.costs[pos[a]])
            if b >= 0 and gain > best:
                best, found = gain, (a, i, b, j)
    return found


def _improve(fronts: Sequence[_Front], pos: list[int], left: int, floor: float, tol: float) -> int:
    """Pairwise swaps, each followed by a fresh fill, until none helps or the LP bound is met."""
    for _ in range(_SWAP_ROUNDS):
        cost = math.fsum(f.costs[p] for f, p in zip(fronts, pos, strict=True))
        if cost <= floor + tol:
            break
        swap = _best_swap(fronts, pos, left, tol)
        if swap is None:
            break
        a, i, b, j = swap
        left += fronts[a].nbytes[pos[a]] - fronts[a].nbytes[i] - (fronts[b].nbytes[j] - fronts[b].nbytes[pos[b]])
        pos[a], pos[b] = i, j
        left = _fill(fronts, pos, left, tol)
    return left


# --- the exact programme ---

_Ints = npt.NDArray[np.int64]
_Floats = npt.NDArray[np.float64]


def _viable(fronts: Sequence[_Front], budget: int, incumbent: float, price: float) -> list[list[int]]:
    """Reduced-cost fixing: a solution below the incumbent exceeds the Lagrangian bound by the sum of its options'
    excesses of cost + price x bytes over their unit's best, so no option may exceed it by more than that margin."""
    reduced = [[c + price * b for b, c in zip(f.nbytes, f.costs, strict=True)] for f in fronts]
    slack = incumbent - (math.fsum(min(r) for r in reduced) - price * budget)
    return [[j for j, r in enumerate(rs) if r - min(rs) <= slack] for rs in reduced]


@dataclass(frozen=True)
class _SuffixLP:
    """The LP bound of the units after each position of the programme, as a function of the bytes left for them:
    their smallest options plus the best hull upgrades that fit, the last one fractional (convex, piecewise
    linear). Tighter than any single price of a byte, because it sees how many bytes a state leaves."""

    unit: _Ints  # programme position of each hull upgrade, upgrades sorted by cost saved per byte
    nbytes: _Floats
    saving: _Floats
    base_bytes: _Ints  # smallest bytes and their cost of the units from position i on
    base_cost: _Floats

    @staticmethod
    def build(units: Sequence[Sequence[Option]]) -> _SuffixLP:
        steps: list[tuple[int, int, float]] = []
        for k, opts in enumerate(units):
            hull = _lower_hull(opts)
            steps += [
                (k, opts[b].nbytes - opts[a].nbytes, opts[a].cost - opts[b].cost) for a, b in itertools.pairwise(hull)
            ]
        unit = np.asarray([u for u, _, _ in steps], dtype=np.int64)
        nbytes = np.asarray([b for _, b, _ in steps], dtype=np.float64)
        saving = np.asarray([c for _, _, c in steps], dtype=np.float64)
        order = np.argsort(-saving / np.maximum(nbytes, 1.0), kind="stable")
        first = [opts[0] for opts in units]  # options are sorted by bytes: the first is the smallest
        base_bytes = np.append(np.cumsum([o.nbytes for o in first][::-1])[::-1], 0).astype(np.int64)
        base_cost = np.append(np.cumsum([o.cost for o in first][::-1])[::-1], 0.0).astype(np.float64)
        return _SuffixLP(unit[order], nbytes[order], saving[order], base_bytes, base_cost)

    def bound(self, start: int, room: _Ints) -> _Floats:
        """The least LP cost of the units from `start` on with `room` bytes each; inf where even their smallest
        options do not fit."""
        mask = self.unit >= start
        spare = (room - self.base_bytes[start]).astype(np.float64)
        xs = np.concatenate(([0.0], np.cumsum(self.nbytes[mask])))
        ys = np.concatenate(([0.0], np.cumsum(self.saving[mask])))
        lp = self.base_cost[start] - np.interp(spare, xs, ys)
        return np.where(spare < 0, np.inf, lp)


@dataclass(frozen=True)
class _Search:
    pos: list[int] | None  # front positions of the best solution found below the incumbent; None: none found
    proven: bool  # no state was thinned away, so nothing better exists than what was found (or the incumbent)


def _order(options: Sequence[Sequence[Option]]) -> list[int]:
    """Decided units first (they do not grow the front), then the largest: the units after a state are then the
    small ones, whose LP bound is nearly their integer optimum, so the bound prunes hard."""
    return sorted(range(len(options)), key=lambda u: (len(options[u]) > 1, -options[u][-1].nbytes))


def _pareto_dp(fronts: Sequence[_Front], budget: int, incumbent: float, price: float, work: float) -> _Search:
    """States are Pareto-optimal (bytes, cost) partial sums; a state goes when its cost plus the LP bound of the
    units still to come exceeds the incumbent. Exact unless a front outgrows what `work` (state x option pairs)
    allows: then only the states with the best bounds go on, and the result is a good solution, not a proof."""
    viable = _viable(fronts, budget, incumbent, price)
    if not all(viable):
        return _Search(None, proven=True)
    options = [[f.options[j] for j in v] for f, v in zip(fronts, viable, strict=True)]
    order = _order(options)
    unit_bytes = [np.asarray([o.nbytes for o in options[u]], dtype=np.int64) for u in order]
    unit_costs = [np.asarray([o.cost for o in options[u]], dtype=np.float64) for u in order]
    rest = _SuffixLP.build([options[u] for u in order])
    cap = max(1.0, work / max(1, sum(len(v) for v in viable)))  # states per front, so work stays bounded
    nbytes, costs = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float64)
    layers: list[tuple[_Ints, _Ints]] = []  # (parent state, option) of each state
    proven = True
    for i, (ob, oc) in enumerate(zip(unit_bytes, unit_costs, strict=True)):
        nb, nc = (nbytes[:, None] + ob[None, :]).ravel(), (costs[:, None] + oc[None, :]).ravel()
        bound = nc + rest.bound(i + 1, budget - nb)
        flat = np.flatnonzero((bound <= incumbent) & np.isfinite(bound))  # inf: the rest no longer fits
        if flat.size == 0:
            return _Search(None, proven)
        flat = flat[np.lexsort((nc[flat], nb[flat]))]
        keep = np.ones(flat.size, dtype=bool)
        keep[1:] = nc[flat][1:] < np.minimum.accumulate(nc[flat])[:-1]  # strictly cheaper than every smaller state
        flat = flat[keep]
        if flat.size > cap:
            flat, proven = flat[np.argpartition(bound[flat], int(cap))[: int(cap)]], False
        layers.append((flat // ob.size, flat % ob.size))
        nbytes, costs = nb[flat], nc[flat]
    state = int(np.argmin(costs))
    pos = [0] * len(fronts)
    for i in range(len(order) - 1, -1, -1):
        parents, chosen = layers[i]
        pos[order[i]] = viable[order[i]][int(chosen[state])]
        state = int(parents[state])
    return _Search(pos, proven)


def solve_exact(units: Sequence[Unit], budget_bytes: int) -> Solution:
    """The optimum by dynamic programming over Pareto fronts; exponential in the worst case, for small instances."""
    fronts = _fronts(units, budget_bytes)
    found = _pareto_dp(fronts, budget_bytes, math.inf, 0.0, math.inf)
    assert found.proven and found.pos is not None  # no incumbent and no limit: the programme always finishes
    return _solution(fronts, found.pos, 0.0, exact=True)


def solve(units: Sequence[Unit], budget_bytes: int, *, dp_work: float = DP_WORK) -> Solution:
    """Minimise the total cost with total bytes <= budget_bytes (never above).

    Exact (`exact`, and lower_bound = cost) when the LP bound is met or the pruned programme finishes within
    `dp_work` state x option pairs per pass; otherwise `lower_bound` is the LP bound and `gap` bounds the loss.
    `dp_work=0` gives the greedy and swaps alone."""
    fronts = _fronts(units, budget_bytes)
    tol = _tolerance(fronts)
    pos, lower_bound, price = _lp_greedy(fronts, budget_bytes)
    left = budget_bytes - sum(f.nbytes[p] for f, p in zip(fronts, pos, strict=True))
    left = _fill(fronts, pos, left, tol)
    _improve(fronts, pos, left, lower_bound, tol)
    for _ in range(_DP_PASSES if dp_work > 0 else 0):
        cost = math.fsum(f.costs[p] for f, p in zip(fronts, pos, strict=True))
        if cost <= lower_bound + tol:
            break
        found = _pareto_dp(fronts, budget_bytes, cost - tol, price, dp_work)
        pos = found.pos or pos
        if found.proven:
            return _solution(fronts, pos, lower_bound, exact=True)
        if found.pos is None:
            break  # thinned and nothing better: another pass would search the same states
    cost = math.fsum(f.costs[p] for f, p in zip(fronts, pos, strict=True))
    return _solution(fronts, pos, lower_bound, exact=cost <= lower_bound + tol)
