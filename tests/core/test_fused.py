"""The fused CPU loops (dissect_core.fused) give the torch path's sketches and dissections exactly."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch import nn

from dissect_core import fused
from dissect_core.counts import prepare_labels
from dissect_core.dissect import dissect
from dissect_core.models import LoadedModel
from dissect_core.quantile import QuantileSketch
from dissect_core.synthetic import SyntheticScenes

engine = importlib.import_module("dissect_core.dissect")  # the module (the package exports the function)


@pytest.fixture(autouse=True)
def _restore() -> object:
    before = fused.set_enabled(True)
    threads = fused.set_threads(None)
    yield
    fused.set_enabled(before)
    fused.set_threads(threads)


def _state(s: QuantileSketch) -> dict[str, np.ndarray]:
    out = {name: getattr(s, name).numpy().copy() for name in ("zeros", "floor_count", "key_min", "key_max", "floor")}
    for sign, store in s.stores.items():
        for part, t in store.items():
            out[f"{sign}.{part}"] = t.numpy().copy()
    out["n"] = np.array(s.n)
    return out


def _values(kind: str, rng: np.random.Generator, units: int, n: int) -> np.ndarray:
    if kind == "gelu":  # both signs, two units below 0 throughout
        pre = rng.normal(size=(units, n)) * rng.uniform(0.5, 4, size=(units, 1))
        pre[-2:] = rng.normal(-3.0, 0.4, size=(2, n))
        return (pre / (1 + np.exp(-1.702 * pre))).astype(np.float32)
    if kind == "relu":  # mostly exact zeros, some -0.0
        x = np.maximum(rng.normal(-1.0, 1.0, size=(units, n)), 0).astype(np.float32)
        x[:, ::7] = np.float32(-0.0)
        return x
    if kind == "rising":  # every unit's values grow call by call: the stores' windows move
        return (rng.random((units, n)) * np.exp(np.linspace(0, 30, n))[None, :]).astype(np.float32)
    # negative values only, of many magnitudes
    return (-np.exp(rng.normal(0, 6, size=(units, n)))).astype(np.float32)


@pytest.mark.parametrize("kind", ["gelu", "relu", "rising", "negative"])
@pytest.mark.parametrize("max_buckets", [4096, 64])
def test_fused_sketch_equals_the_torch_sketch(kind: str, max_buckets: int) -> None:
    """Rows of 16 values fed to two floored sketches whose floors rise between calls: every
    count, zero, floor count and window is the same with the fused loops as without."""
    rng = np.random.default_rng(5)
    units = 40
    x = _values(kind, rng, units, 4096)
    n = x.shape[1]
    sketches, states = {}, {}
    for on in (False, True):
        fused.set_enabled(on)
        s = QuantileSketch(units, max_buckets=max_buckets, floor=np.full(units, -np.inf, np.float32))
        for part in np.array_split(x, 8, axis=1):
            t = torch.from_numpy(np.ascontiguousarray(part))
            rows = t.reshape(units * (t.shape[1] // 16), 16)
            unit = torch.arange(units).repeat_interleave(t.shape[1] // 16)
            given = rows.amax(1) > s.floor[unit]
            s.add_rows(rows[given], unit[given], total=t.shape[1], lower=t.amin(1), upper=t.amax(1))
            states.setdefault(on, []).append(_state(s))
            k = n - int(0.97 * n)
            if s.n >= k:
                s.raise_floor(s.n - k)
        sketches[on] = s
    for step, (a, b) in enumerate(zip(states[False], states[True], strict=True)):
        assert a.keys() == b.keys(), step
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{name} after call {step}")
    assert sketches[True].bracket(0.97).key_lo.tolist() == sketches[False].bracket(0.97).key_lo.tolist()


def test_fused_loops_are_used_on_the_cpu_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = fused.floored_bucket

    def spy(rows: torch.Tensor, *args: object) -> None:
        calls.append(rows.shape[0])
        real(rows, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(fused, "floored_bucket", spy)
    s = QuantileSketch(2, floor=np.zeros(2, np.float32))
    rows = torch.tensor([[0.5, 2.0], [-1.0, 3.0]])
    s.add_rows(rows, torch.tensor([0, 1]), total=2, lower=torch.full((2,), -1.0), upper=torch.full((2,), 3.0))
    assert calls == [2]
    fused.set_enabled(False)
    assert not fused.available(rows)
    s.add_rows(rows, torch.tensor([0, 1]), total=2, lower=torch.full((2,), -1.0), upper=torch.full((2,), 3.0))
    assert calls == [2]


class _Mixed(nn.Module):
    """Two layers of mixed sign: ``gelu`` (8 units, 1/4 of the image size) and ``coarse`` (1/8)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.gelu = nn.GELU()
        self.coarse = nn.Conv2d(8, 6, 2, stride=2)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.coarse(self.gelu(self.conv(x))).mean(dim=(2, 3)))


def _same_with_and_without_the_loops(
    model: LoadedModel, ds: SyntheticScenes, layers: list[str], batch_size: int
) -> None:
    """Dissect with the fused loops off, then on: the same thresholds and counts, every unit on somewhere."""
    runs = {}
    for on in (False, True):
        fused.set_enabled(on)
        runs[on] = dissect(model, ds, layers, batch_size=batch_size)
    for layer in layers:
        a, b = runs[False][layer], runs[True][layer]
        np.testing.assert_array_equal(a.thresholds, b.thresholds)
        np.testing.assert_array_equal(a.intersection, b.intersection)
        np.testing.assert_array_equal(a.act_area, b.act_area)
        assert (a.act_area > 0).all()


def test_a_dissection_is_the_same_with_and_without_the_fused_loops() -> None:
    ds = SyntheticScenes(24, seed=1, image_size=(64, 64))
    model = LoadedModel(_Mixed().eval(), "test:mixed", 2, (64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "builtin")
    _same_with_and_without_the_loops(model, ds, ["gelu", "coarse"], batch_size=5)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("image_labels", [False, True])
@pytest.mark.parametrize(("native", "size"), [(4, 16), (7, 112)])
def test_counts_with_known_thresholds_are_the_same_with_and_without_the_fused_loops(
    image_labels: bool, dtype: torch.dtype, native: int, size: int, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A counter given its thresholds (the sharded count pass) counts every on-pixel into
    the same blocks, cells and concepts either way, with whole-image labels or without
    (half-precision maps, which numba cannot take, stay on the torch path). Two batches:
    the second one through the loop that makes and counts parts of rows (7 -> 112: 7 parts),
    in chunks of 5 maps dealt out to ``threads`` threads."""
    monkeypatch.setattr(engine, "_MIN_MAPS", 5)
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS", 5 * size * size)
    fused.set_threads(threads)
    rng = np.random.default_rng(7)
    units, concepts = 6, 9
    maps = torch.from_numpy(rng.normal(size=(12, units, native, native)).astype(np.float32)).to(dtype)
    maps[0::3, 1] = -5.0  # maps wholly below their threshold: the first batch checks the rows path on the others
    label_maps = torch.from_numpy(rng.integers(0, concepts + 1, size=(12, 2, size, size)))
    image = torch.from_numpy(rng.integers(0, concepts + 1, size=(12, 2 if image_labels else 0)))
    thresholds = np.quantile(maps.float().numpy(), 0.8, axis=(0, 2, 3))
    monkeypatch.setattr(engine._MapUpsampler, "_verdicts", {})  # per process: start with no verdict
    monkeypatch.setattr(engine._MapUpsampler, "_row_verdicts", {})
    calls: list[int] = []
    count_parts = fused.count_parts

    def spy(native_maps: torch.Tensor, *args: object) -> object:
        calls.append(native_maps.shape[0])
        return count_parts(native_maps, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(fused, "count_parts", spy)
    tallies = {}
    for on in (False, True):
        fused.set_enabled(on)
        counter = engine._LayerCounter(units, concepts, 0, torch.device("cpu"), thresholds=thresholds, blocks=4)
        for batch in (slice(0, 6), slice(6, 12)):
            labels = prepare_labels(label_maps[batch], image[batch], concepts, indices=torch.arange(12)[batch] * 5)
            counter.counts.add_area(labels)
            counter.add_batch(maps[batch], labels, (size, size))
        tallies[on] = (counter.counts.block_act.clone(), counter.counts.block_intersection.clone())
    # The second float32 batch went through the parts loop, in chunks of at most 5 maps.
    assert (len(calls) > 1) == (dtype == torch.float32) and all(n <= 5 for n in calls)
    assert int(tallies[True][0].sum()) > 0
    for a, b in zip(tallies[False], tallies[True], strict=True):
        assert torch.equal(a, b)


def test_split_tallies_adds_what_one_thread_adds_and_keeps_the_order() -> None:
    """Items dealt out to 3 threads: the first adds to the tallies given, the others to
    copies summed in at the end; results come back in the items' order."""

    def add(item: int, ones: torch.Tensor, squares: torch.Tensor) -> tuple[int, int]:
        ones[item % 4] += 1
        squares[item % 4] += item * item
        return item, id(ones)

    runs = {}
    for threads in (1, 3):
        fused.set_threads(threads)
        tallies = (torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
        results = fused.split_tallies(add, iter(range(10)), tallies)
        assert [item for item, _ in results] == list(range(10))
        given = [owner == id(tallies[0]) for _, owner in results]
        assert given == ([True] * 10 if threads == 1 else [k % 3 == 0 for k in range(10)])
        runs[threads] = tallies
    assert runs[1][0].tolist() == [3, 3, 2, 2]
    for a, b in zip(runs[1], runs[3], strict=True):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="integer tallies"):
        fused.split_tallies(add, range(3), (torch.zeros(4), torch.zeros(4)))


def test_warm_compiles_the_loops_unless_they_are_off() -> None:
    assert fused.warm() is True
    fused.set_enabled(False)
    assert fused.warm() is False


def test_a_loop_that_fails_to_compile_turns_the_loops_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """warm() in a worker must not stop it from starting: a compiler failure leaves the torch path."""

    def broken(*args: object) -> None:
        raise RuntimeError("no such type")

    kernels = fused._compile()
    assert kernels is not None
    monkeypatch.setattr(fused, "_kernels", dict.fromkeys(kernels, broken))
    monkeypatch.setattr(fused, "_import_error", None)
    with pytest.warns(RuntimeWarning, match="the fused loops are off .*no such type"):
        assert fused.warm() is False
    assert not fused.available(torch.zeros(1))


def _test_maps(native: int, seed: int) -> torch.Tensor:
    """Maps of both signs, post-ReLU ones, all-zero ones and ones with zero rows."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn((48, native, native), generator=gen) * 2.0
    maps[8:24].relu_()
    maps[24:28] = 0.0
    maps[28:36, : native // 2] = 0.0
    maps[36:40] = maps[36:40].abs() * 1e-42  # subnormal values
    return maps


@pytest.mark.parametrize(("native", "size"), [(7, 112), (14, 112), (8, 32), (5, 40), (7, 56)])
def test_the_parts_loop_gives_every_part_above_each_level(native: int, size: int) -> None:
    """fused.sketch_parts against whole maps upsampled by the matrix products: the parts it
    gives are the upsampled values bit for bit, every part it leaves out lies at or below
    its map's level, and the parts it counts as exact zeros are zeros (all of those left
    out where the level is below 0, as the sketch needs)."""
    maps = _test_maps(native, native * size)
    full = engine._upsample_maps(maps, (size, size)).view(maps.shape[0], size, size)
    bound = engine._MapBound((native, native), (size, size), torch.device("cpu"))
    parts = bound.segments_count
    width = size // parts
    ups = engine._MapUpsampler((size, size))
    mode = ups._fused_mode(maps[None], maps)
    assert mode is not None, "the loop's blends must match this machine's matrix products"
    gen = torch.Generator().manual_seed(1)
    level = torch.quantile(full.view(maps.shape[0], -1), 0.9, dim=1) * (0.5 + torch.rand(maps.shape[0], generator=gen))
    level[::5] = -1.0
    level[24:26] = 0.0
    values, items, zero_parts = fused.sketch_parts(maps, level, bound.fused_parts(ups._interpolation(maps[None]), mode))
    flat = full.reshape(-1, width)
    assert torch.equal(values, flat[items])
    assert bool((items[1:] > items[:-1]).all())
    left = torch.ones(flat.shape[0], dtype=torch.bool)
    left[items] = False
    owner = torch.arange(flat.shape[0]) // (size * parts)
    below = (flat <= level[owner][:, None]).all(1)
    zero = (flat == 0).all(1)
    assert bool((below | zero)[left].all())
    left_zero = torch.zeros(maps.shape[0], dtype=torch.int64).index_add_(0, owner, (left & zero).long())
    negative = level < 0
    assert torch.equal(zero_parts[negative], left_zero[negative])
    assert bool((zero_parts <= left_zero).all()) and int(zero_parts[24:28].sum()) == 4 * size * parts
    assert values.shape[0] < flat.shape[0]  # the bounds leave parts out


def test_a_parts_loop_that_does_not_match_the_products_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no rounding of the loop's blends gives the matrix products' values (another BLAS,
    say), the passes upsample by the products and the results stay exact."""
    ds = SyntheticScenes(12, seed=3, image_size=(64, 64))
    model = LoadedModel(_Mixed().eval(), "test:mixed", 2, (64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "builtin")
    fused.set_enabled(False)
    want = dissect(model, ds, ["coarse"], batch_size=4)["coarse"]
    fused.set_enabled(True)
    real = fused.upsample_parts
    monkeypatch.setattr(fused, "upsample_parts", lambda *args: real(*args) * (1 + 2.0**-20))
    monkeypatch.setattr(engine._MapUpsampler, "_fused_modes", {})
    used: list[int] = []
    monkeypatch.setattr(fused, "sketch_parts", lambda *args: used.append(1))
    got = dissect(model, ds, ["coarse"], batch_size=4)["coarse"]
    assert not used and set(engine._MapUpsampler._fused_modes.values()) == {None}
    np.testing.assert_array_equal(got.thresholds, want.thresholds)
    np.testing.assert_array_equal(got.intersection, want.intersection)


class _Coarse(nn.Module):
    """resnet-like strides: 14x14 and 7x7 maps of a 224 px image (masks 112 px: 8x and 16x)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mid = nn.Sequential(nn.Conv2d(3, 12, 16, stride=16), nn.ReLU())
        self.low = nn.Conv2d(12, 10, 2, stride=2)
        self.head = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.low(self.mid(x)).mean(dim=(2, 3)))


def test_a_dissection_at_broden_sizes_is_the_same_with_and_without_the_fused_loops() -> None:
    """Layers upsampled 8x and 16x to 112 px masks (7 parts per row): the loops that make
    only the parts of rows they need give the same thresholds and counts."""
    ds = SyntheticScenes(16, seed=2, image_size=(224, 224))
    model = LoadedModel(_Coarse().eval(), "test:coarse", 2, (224, 224), (0.5,) * 3, (0.25,) * 3, "builtin")
    _same_with_and_without_the_loops(model, ds, ["mid", "low"], batch_size=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_evidence_is_the_same_with_and_without_the_fused_loops(seed: int) -> None:
    """The contenders' pass (fused.contend) against the torch chunks it replaces, on random
    tallies with an empty block and two identical concept columns (exact ties in every
    resample): every array of the evidence bit for bit."""
    from dissect_core.evidence import label_evidence

    rng = np.random.default_rng(seed)
    m, units, concepts, cells = 16, 60, 12, 4
    act = rng.integers(0, 60, (m, units, cells))
    con = rng.integers(0, 60, (m, concepts, cells))
    con[:, 1] = con[:, 0]
    most = np.minimum(act.sum(2)[:, :, None], con.sum(2)[:, None, :])
    inter = rng.integers(0, most + 1)
    inter[:, : units // 2, 0] = most[:, : units // 2, 0]  # half the units are concept 0 (and 1)
    inter[:, :, 1] = inter[:, :, 0]
    images = rng.integers(1, 20, m)
    images[3] = 0
    results = []
    for on in (True, False):
        fused.set_enabled(on)
        results.append(label_evidence(inter, act, con, images, np.full(cells, 25), resamples=300, seed=seed))
    with_loops, without = (vars(ev) for ev in results)
    for name, value in with_loops.items():
        assert np.array_equal(np.asarray(value), np.asarray(without[name]), equal_nan=True), name
    tied = results[0].label == 0
    assert tied.sum() >= units // 4 and (results[0].stability[tied] <= 0.5).all()  # the twin ties every resample
    assert (results[0].contenders[tied] >= 2).all()
