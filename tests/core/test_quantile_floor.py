"""A sketch whose floor rises while data streams in: same bracket as a plain sketch, exact quantiles."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import dissect_core.quantile as quantile_module
from dissect_core import fused
from dissect_core.quantile import QuantileRefiner, QuantileSketch, hazen_ranks


def data(rng: np.random.Generator, units: int, n: int, signed: bool) -> np.ndarray:
    """Post-ReLU units with many exact zeros and a constant unit; when ``signed``, a signed
    unit and an all-negative one (whose floors go below 0)."""
    x = rng.exponential(size=(units, n)) * rng.uniform(0.01, 100, size=(units, 1))
    x = np.where(rng.random((units, n)) < 0.6, 0.0, x)
    if signed:
        x[1] = rng.normal(size=n) * 3
        x[2] = -rng.exponential(size=n) - 0.25
    x[3] = 1.5
    return x.astype(np.float32)


def same_bracket_and_exact_quantiles(plain: QuantileSketch, rising: QuantileSketch, x: np.ndarray, q: float) -> None:
    """The two sketches bracket the q-quantile alike, and refining gives numpy's exact quantiles."""
    a, b = plain.bracket(q), rising.bracket(q)
    for name in ("key_lo", "key_hi", "below", "inside"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    while not b.done:
        refiner = QuantileRefiner(b)
        refiner.add(torch.from_numpy(x))
        b = refiner.bracket()
    np.testing.assert_array_equal(b.values(), np.quantile(x.astype(np.float64), q, axis=1, method="hazen"))


@pytest.mark.parametrize("path", ["auto", "sparse", "dense"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("q", [0.99, 0.9, 0.5, 0.999, 1.0, 0.0])
def test_rising_floor_keeps_the_bracket_of_a_plain_sketch(
    q: float, signed: bool, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path != "auto":
        monkeypatch.setattr(quantile_module, "_SPARSE_BELOW", 1.0 if path == "sparse" else -1.0)
    rng = np.random.default_rng(11)
    x = data(rng, 5, 30000, signed)
    n = x.shape[1]
    k = n - hazen_ranks(n, q)[0]
    buckets = 512 if signed else 4096
    plain = QuantileSketch(5, max_buckets=buckets)
    rising = QuantileSketch(5, max_buckets=buckets, floor=np.full(5, -np.inf, np.float32))
    floors = []
    for part in np.array_split(x, 12, axis=1):
        t = torch.from_numpy(part)
        plain.add(t)
        rising.add_rows(t, torch.arange(5), total=part.shape[1], lower=t.amin(1), upper=t.amax(1))
        if rising.n >= k:
            rising.raise_floor(rising.n - k)
        floors.append(rising.floor.clone())
    assert all(bool((b >= a).all()) for a, b in itertools.pairwise(floors))
    state = rising.state_dict()
    counted = state["floor_count"] + state["zeros"] + state.get("pos_counts", np.zeros((5, 1))).sum(1)
    counted = counted + state.get("neg_counts", np.zeros((5, 1))).sum(1)
    np.testing.assert_array_equal(counted, np.full(5, n))
    if q >= 0.9:
        assert (state["floor_count"][[0, 1, 2, 4]] > 0).all() and state["floor_count"][3] == 0
    if not signed and q >= 0.9:
        assert bool((rising.floor[[0, 1, 2, 4]] > 0).all())
    same_bracket_and_exact_quantiles(plain, rising, x, q)


def test_rows_left_out_are_counted_at_the_floor() -> None:
    sketch = QuantileSketch(2, floor=np.array([1.0, 0.0], np.float32))
    rows = torch.tensor([[0.5, 2.0, 3.0], [-1.0, 0.0, 4.0]])
    sketch.add_rows(
        rows, torch.tensor([0, 1]), total=9, lower=torch.tensor([0.0, -1.0]), upper=torch.tensor([3.0, 4.0])
    )
    assert sketch.n == 9
    assert sketch.floor_count.tolist() == [7, 8]
    assert sketch.key_max.tolist()[1] == torch.tensor(4.0).view(torch.int32).item()
    with pytest.raises(ValueError, match="floor"):
        QuantileSketch(2).add_rows(rows, torch.tensor([0, 1]), total=3, lower=rows.amin(1), upper=rows.amax(1))
    with pytest.raises(ValueError, match="floor"):
        QuantileSketch(2).raise_floor(0)


def test_rising_floor_survives_state_dict_and_detects_nonfinite() -> None:
    sketch = QuantileSketch(1, floor=np.full(1, -np.inf, np.float32))
    rows = torch.arange(100, dtype=torch.float32)[None]
    sketch.add_rows(rows, torch.tensor([0]), total=100, lower=rows.amin(1), upper=rows.amax(1))
    sketch.raise_floor(90)
    assert 0 < float(sketch.floor[0]) <= 90.0
    again = QuantileSketch.from_state_dict(sketch.state_dict())
    np.testing.assert_array_equal(again.bracket(0.95).key_lo, sketch.bracket(0.95).key_lo)
    assert sketch.finite
    sketch.add_rows(
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.int64),
        total=4,
        lower=torch.tensor([0.0]),
        upper=torch.tensor([float("nan")]),
    )
    assert not sketch.finite


@pytest.mark.parametrize("signed", [True, False])
def test_fast_floor_raise_matches_the_general_one(signed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """raise_floor's shortcut (no full value-ordered table; ranks that fall among the zeros of
    post-ReLU units) leaves the sketch exactly as the general path does."""
    rng = np.random.default_rng(5)
    x = data(rng, 6, 24000, signed)
    x[5] = np.where(rng.random(24000) < 0.995, 0.0, x[5])  # a unit whose upper quantiles are 0
    states = []
    for fast in (True, False):
        monkeypatch.setattr(quantile_module, "_FAST_RAISE", fast)
        sketch = QuantileSketch(6, floor=np.full(6, -np.inf, np.float32))
        floors = []
        for part in np.array_split(x, 10, axis=1):
            t = torch.from_numpy(part)
            sketch.add_rows(t, torch.arange(6), total=part.shape[1], lower=t.amin(1), upper=t.amax(1))
            sketch.raise_floor(sketch.n - 240)
            floors.append(sketch.floor.clone())
        states.append((floors, sketch.state_dict()))
    (fast_floors, fast_state), (slow_floors, slow_state) = states
    for a, b in zip(fast_floors, slow_floors):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fast_state.keys() == slow_state.keys()
    for name in fast_state:
        np.testing.assert_array_equal(fast_state[name], slow_state[name], err_msg=name)
    if not signed:
        assert float(fast_floors[-1][5]) < 0 < float(fast_floors[-1][0])


def test_zeros_given_as_counts_land_in_the_zero_bucket_only_above_the_floor() -> None:
    sketch = QuantileSketch(2, floor=np.array([-1e-3, 0.5], np.float32))
    rows = torch.tensor([[0.0, 2.0, 0.0, 3.0], [0.0, 0.25, 1.0, 0.0]])
    sketch.add_rows(
        rows,
        torch.tensor([0, 1]),
        total=10,
        lower=torch.zeros(2),
        upper=torch.tensor([3.0, 1.0]),
        zeros=torch.tensor([4, 4]),
    )
    # unit 0 (floor < 0): 2 zeros in its row + 4 counted; unit 1 (floor 0.5): zeros are below the floor
    assert sketch.zeros.tolist() == [6, 0]
    assert sketch.floor_count.tolist() == [2, 9]
    plain = QuantileSketch(2)
    plain.add(torch.tensor([[0.0] * 6 + [2.0, 3.0, -0.5, -0.5], [0.0] * 8 + [0.25, 1.0]]))
    np.testing.assert_array_equal(plain.bracket(0.9).key_lo[:, 0], sketch.bracket(0.9).key_lo[:, 0])


def test_a_window_that_moves_for_some_units_only_keeps_the_others() -> None:
    """When a later batch moves the bucket window of one unit (a new, much larger maximum),
    only that unit's histogram shifts: the state equals one sketch that saw everything at once."""
    rng = np.random.default_rng(3)
    x = rng.exponential(size=(3, 4000)).astype(np.float32) + 0.01
    x[0, 2500:] *= 1e6  # unit 0's window moves by far more than max_buckets // 4 buckets
    x[2, 3000:] *= 4.0  # unit 2's moves by a few buckets
    once = QuantileSketch(3, max_buckets=256)
    once.add(torch.from_numpy(x))
    parts = QuantileSketch(3, max_buckets=256)
    for part in np.array_split(x, 8, axis=1):
        parts.add(torch.from_numpy(part))
    a, b = once.state_dict(), parts.state_dict()
    assert not np.array_equal(a["pos_offset"][[0]], a["pos_offset"][[1]])
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def gelu_like(rng: np.random.Generator, units: int, n: int) -> np.ndarray:
    """GELU outputs (values down to about -0.17) of many units whose upper quantiles are
    positive, and two units whose every value is below 0 (their floors stay below 0)."""
    pre = rng.normal(size=(units, n)) * rng.uniform(0.5, 4, size=(units, 1))
    pre[-2:] = rng.normal(-3.0, 0.4, size=(2, n))
    return (pre * 0.5 * (1 + np.vectorize(math.erf)(pre / math.sqrt(2)))).astype(np.float32)


@pytest.mark.parametrize("fuse", [False, True], ids=["torch", "fused"])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("q", [0.99, 0.95, 0.9])
def test_a_few_units_with_floors_below_zero_among_many(
    q: float, fast: bool, fuse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Most units' floors rise above 0 while two stay below it (values of both signs above
    them): given as rows of 16 values like the dissection's segments, the sketch keeps the
    bracket of a plain sketch and the exact quantiles. On the torch path the two units'
    values are added one by one rather than widening every unit's histogram; the fused loop
    (dissect_core.fused) puts every value in its bucket directly."""
    monkeypatch.setattr(quantile_module, "_FAST_RAISE", fast)
    monkeypatch.setattr(fused, "_enabled", fuse)
    one_by_one = []
    add_pairs = QuantileSketch._add_pairs

    def spy(self: QuantileSketch, units: torch.Tensor, values: torch.Tensor) -> None:
        one_by_one.append(units.unique().tolist())
        add_pairs(self, units, values)

    monkeypatch.setattr(QuantileSketch, "_add_pairs", spy)
    monkeypatch.setattr(quantile_module, "_SPARSE_BELOW", -1.0)  # the dense path (else few values are given)
    rng = np.random.default_rng(2)
    units = 200
    x = gelu_like(rng, units, 8192)
    n = x.shape[1]
    k = n - hazen_ranks(n, q)[0]
    plain = QuantileSketch(units)
    rising = QuantileSketch(units, floor=np.full(units, -np.inf, np.float32))
    for part in np.array_split(x, 8, axis=1):
        t = torch.from_numpy(np.ascontiguousarray(part))
        plain.add(t)
        rows = t.reshape(units * (t.shape[1] // 16), 16)
        unit = torch.arange(units).repeat_interleave(t.shape[1] // 16)
        given = rows.amax(1) > rising.floor[unit]  # the others lie at or below the floor
        rising.add_rows(rows[given], unit[given], total=t.shape[1], lower=t.amin(1), upper=t.amax(1))
        if rising.n >= k:
            rising.raise_floor(rising.n - k)
    assert bool((rising.floor[:-2] > 0).all()) and bool((rising.floor[-2:] < 0).all())
    if fuse:
        assert one_by_one == []
    else:
        assert [units - 2, units - 1] in one_by_one  # the two units' rows went value by value
    same_bracket_and_exact_quantiles(plain, rising, x, q)
