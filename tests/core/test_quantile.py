"""Streaming quantiles: the sketch's error bound, exact refinement, merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dissect_core.quantile import (
    QuantileBracket,
    QuantileRefiner,
    QuantileSketch,
    exact_quantiles,
    float_keys,
    hazen_lerp,
    hazen_ranks,
    keys_to_float,
)


def hazen(x: np.ndarray, q: float) -> np.ndarray:
    return np.quantile(x.astype(np.float32).astype(np.float64), q, axis=1, method="hazen")


def post_relu(rng: np.random.Generator, units: int, n: int, zero_fraction: float) -> np.ndarray:
    x = rng.exponential(size=(units, n)) * rng.uniform(0.01, 100, size=(units, 1))
    return np.where(rng.random((units, n)) < zero_fraction, 0.0, x)


def test_keys_preserve_order_and_invert() -> None:
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-40, 1e-30, 2.0, 3e38, np.inf], np.float32)
    keys = float_keys(torch.from_numpy(values)).numpy()
    assert (np.diff(keys.astype(np.int64)) >= 0).all()
    assert keys[3] == keys[4] == 0
    back = keys_to_float(keys)
    np.testing.assert_array_equal(back[np.r_[0:3, 4:10]], values[np.r_[0:3, 4:10]])


@pytest.mark.parametrize("q", [0.0, 0.001, 0.25, 0.5, 0.99, 0.995, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 4001])
def test_exact_equals_numpy_hazen(q: float, n: int) -> None:
    rng = np.random.default_rng(n)
    x = np.stack(
        [
            rng.normal(size=n),
            np.maximum(rng.normal(size=n), 0),
            np.round(rng.normal(size=n) * 2),
            np.zeros(n),
            post_relu(rng, 1, n, 0.8)[0],
            -rng.exponential(size=n),
            np.full(n, 1.5),
        ]
    )
    got = exact_quantiles(torch.from_numpy(x.astype(np.float32)), q)
    np.testing.assert_array_equal(got, hazen(x, q))


def test_hazen_helpers_match_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 100, 12345):
        x = np.sort(rng.normal(size=n))
        for q in (0, 0.01, 0.3, 0.5, 0.99, 1):
            lo, hi, g = hazen_ranks(n, q)
            assert hazen_lerp(np.array([x[lo]]), np.array([x[hi]]), g)[0] == np.quantile(x, q, method="hazen")


@pytest.mark.parametrize("zero_fraction", [0.5, 0.9])
def test_sketch_alone_within_alpha(zero_fraction: float) -> None:
    rng = np.random.default_rng(2)
    x = post_relu(rng, 16, 50000, zero_fraction)
    narrow = QuantileSketch(16, mantissa_bits=8)
    wide = QuantileSketch(16, mantissa_bits=8, max_buckets=1 << 16)
    for part in np.array_split(x, 7, axis=1):
        narrow.add(torch.from_numpy(part.astype(np.float32)))
        wide.add(torch.from_numpy(part.astype(np.float32)))
    for sketch, qs in ((narrow, (0.95, 0.99, 0.999)), (wide, (0.3, 0.5, 0.9, 0.99))):
        for q in qs:
            ref = hazen(x, q)
            est = sketch.quantile(q).numpy()
            assert est.shape == (16,)
            assert np.all(np.abs(est - ref) <= sketch.alpha * np.abs(ref) + 1e-30), q


def test_zero_quantile_resolves_without_refinement() -> None:
    x = np.zeros((3, 1000), np.float32)
    x[:, :5] = 1.0
    sketch = QuantileSketch(3)
    sketch.add(torch.from_numpy(x))
    bracket = sketch.bracket(0.99)
    assert bracket.done
    np.testing.assert_array_equal(bracket.values(), hazen(x, 0.99))


def test_shards_merge_exactly() -> None:
    rng = np.random.default_rng(3)
    shards = [
        (rng.normal(size=(6, 3000)) * 10.0 ** rng.uniform(-3, 3, size=(6, 1))).astype(np.float32) for _ in range(4)
    ]
    whole = QuantileSketch(6, max_buckets=64)
    for s in shards:
        whole.add(torch.from_numpy(s))
    parts = []
    for s in shards:
        part = QuantileSketch(6, max_buckets=64)
        part.add(torch.from_numpy(s))
        parts.append(QuantileSketch.from_state_dict(part.state_dict()))
    merged = parts[3].merge(parts[1]).merge(parts[0]).merge(parts[2])
    a, b = whole.state_dict(), merged.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    x = np.concatenate(shards, axis=1)
    bracket = merged.bracket(0.99)
    while not bracket.done:
        refiners = []
        for s in shards:
            r = QuantileRefiner(QuantileBracket.from_state_dict(bracket.state_dict()))
            r.add(torch.from_numpy(s))
            refiners.append(QuantileRefiner.from_state_dict(r.state_dict()))
        total = refiners[0]
        for r in refiners[1:]:
            total.merge(r)
        bracket = total.bracket()
    np.testing.assert_array_equal(bracket.values(), hazen(x, 0.99))


def test_narrowing_when_collection_budget_is_small() -> None:
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(5, 20000)).astype(np.float32))
    sketch = QuantileSketch(5, mantissa_bits=2, max_buckets=8)
    sketch.add(x)
    bracket = sketch.bracket(0.9)
    passes = 0
    while not bracket.done:
        refiner = QuantileRefiner(bracket, max_values=10, bins=16)
        refiner.add(x)
        bracket = refiner.bracket()
        passes += 1
    assert passes >= 2
    np.testing.assert_array_equal(bracket.values(), hazen(x.numpy(), 0.9))


def test_batched_layout_and_refiner_consistency_check() -> None:
    rng = np.random.default_rng(5)
    maps = torch.from_numpy(np.maximum(rng.normal(size=(4, 3, 5, 5)), 0).astype(np.float32))
    sketch = QuantileSketch(3)
    sketch.add_batch(maps[:2])
    sketch.add_batch(maps[2:])
    flat = maps.permute(1, 0, 2, 3).reshape(3, -1)
    bracket = sketch.bracket(0.9)
    refiner = QuantileRefiner(bracket)
    refiner.add_batch(maps)
    np.testing.assert_array_equal(refiner.bracket().values(), hazen(flat.numpy(), 0.9))
    if not bracket.done:
        wrong = QuantileRefiner(bracket)
        wrong.add_batch(maps[:1])
        with pytest.raises(RuntimeError, match="changed between passes"):
            wrong.bracket()


def test_memory_is_bounded() -> None:
    sketch = QuantileSketch(2, max_buckets=128)
    rng = np.random.default_rng(6)
    for scale in (1e-20, 1e-5, 1.0, 1e10, 1e30):
        sketch.add(torch.from_numpy((rng.exponential(size=(2, 1000)) * scale).astype(np.float32)))
    state = sketch.state_dict()
    assert state["pos_counts"].shape == (2, 128)
    assert int(state["pos_counts"].sum() + state["zeros"].sum()) == 2 * 5000
    x = np.concatenate([rng.exponential(size=(2, 10))])
    assert np.isfinite(sketch.quantile(0.99).numpy()).all() and x.size


def test_nonfinite_detected() -> None:
    sketch = QuantileSketch(2)
    sketch.add(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert sketch.finite
    sketch.add(torch.tensor([[1.0, float("inf")], [3.0, 4.0]]))
    assert not sketch.finite


@pytest.mark.parametrize("floor_q", [0.9, 0.995, 0.0])
def test_floor_skips_low_values_and_stays_exact(floor_q: float) -> None:
    rng = np.random.default_rng(7)
    x = post_relu(rng, 4, 20000, 0.6).astype(np.float32)
    floor = torch.from_numpy(np.quantile(x, floor_q, axis=1).astype(np.float32))
    sketch = QuantileSketch(4, floor=floor)
    for part in np.array_split(x, 3, axis=1):
        sketch.add(torch.from_numpy(part))
    state = sketch.state_dict()
    assert int(state["floor_count"].sum() + state["zeros"].sum() + state["pos_counts"].sum()) == x.size
    bracket = sketch.bracket(0.99)
    while not bracket.done:
        refiner = QuantileRefiner(bracket)
        refiner.add(torch.from_numpy(x))
        bracket = refiner.bracket()
    np.testing.assert_array_equal(bracket.values(), hazen(x, 0.99))
    with pytest.raises(ValueError, match="floors"):
        sketch.merge(QuantileSketch(4))


def test_floor_lives_on_the_sketch_device_from_the_start() -> None:
    """A floor given with a device is on that device before any data (the rising-floor
    sketch raises it from the first batch before the first add: on CUDA a CPU floor failed
    every dissection). The meta device stands in for a GPU here."""
    sketch = QuantileSketch(4, floor=np.zeros(4, np.float32), device="meta")
    assert sketch.floor is not None and sketch.floor.device.type == "meta"
    assert QuantileSketch(4, floor=np.zeros(4, np.float32)).floor.device.type == "cpu"
