"""Splitting networks at a layer, and hooks that never outlive their block.

For every way a network can be split (explicit stages, an observed chain, the
whole network on a zero input with the layer replaced), running the prefix and
then the suffix must give the whole network's output on fresh inputs; networks
that cannot be split (a skip connection around the layer, a layer that runs
twice) must say ``"full"``. Hooks registered through ``nethook`` are gone after
the block, also when the block or a hook raises.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import dissect_core
from dissect_core.errors import Cancelled, LayerError
from dissect_core.nethook import evaluating, forward_hooks, trace
from dissect_core.progress import check_stop
from dissect_core.surgery import (
    HookSuffix,
    chain_suffix,
    exact_float32,
    explicit_suffix,
    outputs_match,
    prefix,
    split_module,
)


def small_net() -> nn.Module:
    """conv -> (conv, BN, in-place ReLU) -> pool -> flatten -> fc: [B, 3, 8, 8] -> [B, 5]."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 6, 3, padding=1),
            block=nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)),
            pool=nn.AdaptiveAvgPool2d(2),
            flatten=nn.Flatten(),
            fc=nn.Linear(16, 5),
        )
    ).eval()


class Chain(nn.Module):
    """Children called one after the other by a custom forward (no ``nn.Sequential``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = small_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Skip(nn.Module):
    """The input reaches the output around every layer of ``body``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = small_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x.mean((1, 2, 3))[:, None]


class Twice(nn.Module):
    """One layer runs twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.conv(x)))


def hook_count(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


def assert_split_reproduces(net: nn.Module, layer: str, size: int, ways: tuple[str, ...], kind: str) -> None:
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    split = split_module(net, layer, probe, ways=ways)
    assert split.kind == kind and split.layer == layer
    assert split.activation.dim() == 4 and split.activation.shape[0] == 2
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), evaluating(net):
        want = net(x)
        a = prefix(net, layer, x)
        assert a.shape == (3, *split.activation.shape[1:])
        assert split.suffix is not None
        got = split.suffix(a)
    assert got.shape == want.shape == (3, want.shape[1])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert hook_count(net) == 0


@pytest.mark.parametrize(
    ("layer", "ways", "kind"),
    [
        ("conv1", ("explicit", "chain", "hook"), "explicit"),
        ("block.0", ("explicit",), "explicit"),
        ("block.1", ("chain",), "chain"),
        ("block", ("hook",), "hook"),
    ],
)
def test_split_then_suffix_is_the_whole_sequential(layer: str, ways: tuple[str, ...], kind: str) -> None:
    assert_split_reproduces(small_net(), layer, 8, ways, kind)


def test_a_custom_forward_splits_as_a_chain_or_with_a_hook() -> None:
    net = Chain().eval()
    assert explicit_suffix(net, "body.block") is None
    assert_split_reproduces(net, "body.block", 8, ("explicit", "chain", "hook"), "chain")
    assert_split_reproduces(net, "body.block.2", 8, ("explicit", "hook"), "hook")
    suffix = chain_suffix(net, "body.conv1", torch.zeros(1, 3, 8, 8))
    assert suffix is not None and [type(m).__name__ for m in suffix] == [
        "Sequential",
        "AdaptiveAvgPool2d",
        "Flatten",
        "Linear",
    ]


@pytest.mark.parametrize(
    ("arch", "layer", "size"),
    [
        ("resnet18", "layer2", 32),
        ("resnet18", "layer4.0", 32),
        ("vgg11", "features.10", 32),
        ("alexnet", "features.3", 64),
    ],
)
def test_split_then_suffix_is_the_whole_torchvision_network(arch: str, layer: str, size: int) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=4).eval()
    assert_split_reproduces(net, layer, size, ("explicit", "hook"), "explicit")


def test_networks_that_do_not_split_say_full() -> None:
    probe = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    skip = Skip().eval()
    for ways in (("explicit", "chain", "hook"), ("chain",)):
        split = split_module(skip, "body.block", probe, ways=ways)
        assert split.kind == "full" and split.suffix is None
    assert split.output.shape == (2, 5) and split.activation.shape == (2, 4, 8, 8)
    assert split_module(Twice().eval(), "conv", probe).kind == "full"
    assert hook_count(skip) == 0
    with pytest.raises(ValueError, match="unknown way"):
        split_module(skip, "body.block", probe, ways=("magic",))
    with pytest.raises(LayerError):
        split_module(skip, "body.nope", probe)


def test_split_checks_outputs_first_and_restores_the_mode() -> None:
    net = small_net().train()
    probe = torch.randn(2, 3, 8, 8)
    seen = []

    def check(a: torch.Tensor, out: torch.Tensor) -> None:
        seen.append((tuple(a.shape), tuple(out.shape)))
        raise RuntimeError("not a map the caller can use")

    with pytest.raises(RuntimeError, match="caller"):
        split_module(net, "block", probe, check=check)
    assert seen == [((2, 4, 8, 8), (2, 5))]
    assert net.training and all(m.training for m in net.modules()) and hook_count(net) == 0


def test_hook_suffix_and_outputs_match() -> None:
    net = small_net()
    x = torch.rand(2, 3, 8, 8)
    suffix = HookSuffix(net, "block", [(3, 8, 8)])
    with torch.no_grad():
        torch.testing.assert_close(suffix(prefix(net, "block", x)), net(x), rtol=0, atol=0)
    b = torch.tensor([[1.0, -200.0]])
    assert outputs_match(b + 0.01, b) and not outputs_match(b + 0.1, b)
    assert not outputs_match(b.T, b) and outputs_match(torch.zeros(0, 3), torch.zeros(0, 3))


def test_prefix_stops_at_the_layer() -> None:
    net = small_net()
    later = []
    with forward_hooks(net, {"fc": lambda m, i, out: later.append(out)}):
        a = prefix(net, "block", torch.rand(2, 3, 8, 8))
    assert a.shape == (2, 4, 8, 8) and later == [] and hook_count(net) == 0


def test_forward_hooks_are_removed_whatever_happens() -> None:
    net = small_net().train()
    calls = []
    with forward_hooks(net, {"block": lambda m, i, out: calls.append(out.shape)}) as handles:
        assert len(handles) == 1 and hook_count(net) == 1
        net(torch.rand(2, 3, 8, 8))
    assert calls == [torch.Size([2, 4, 8, 8])] and hook_count(net) == 0

    with pytest.raises(KeyError), forward_hooks(net, [("conv1", lambda *a: None), (net.fc, lambda *a: None)]):
        assert hook_count(net) == 2
        raise KeyError("the block fails")
    assert hook_count(net) == 0

    def failing(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        raise ZeroDivisionError("the hook fails")

    with pytest.raises(ZeroDivisionError), forward_hooks(net, {"block.0": failing}):
        net(torch.rand(1, 3, 8, 8))
    assert hook_count(net) == 0

    with pytest.raises(LayerError), forward_hooks(net, {"conv1": lambda *a: None, "nope": lambda *a: None}):
        pass
    assert hook_count(net) == 0

    with pytest.raises(RuntimeError), trace(net, ["block"], edit={"conv1": lambda out: out}) as tr:
        tr(torch.rand(1, 5, 8, 8))
    with pytest.raises(ValueError), evaluating(net):
        assert not net.training
        raise ValueError("the block fails")
    assert hook_count(net) == 0 and net.training


def test_forward_hooks_with_kwargs_and_replacement() -> None:
    net = small_net()
    seen = []

    def record(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        seen.append((len(args), sorted(kwargs)))
        return torch.zeros_like(output)

    with torch.no_grad(), forward_hooks(net, {"fc": record}, with_kwargs=True):
        out = net(torch.rand(2, 3, 8, 8))
    assert seen == [(1, [])] and out.shape == (2, 5) and not out.any() and hook_count(net) == 0


def test_check_stop_names_the_work() -> None:
    check_stop(None)
    check_stop(lambda: False, "ablation")
    with pytest.raises(Cancelled, match=r"^ablation cancelled$"):
        check_stop(lambda: True, "ablation")
    with pytest.raises(Cancelled, match=r"^cancelled$"):
        check_stop(lambda: True)


def test_forward_hooks_are_registered_only_in_nethook() -> None:
    root = Path(dissect_core.__file__).parent
    found = sorted(p.name for p in root.glob("*.py") if re.search(r"register_forward", p.read_text()))
    assert found == ["nethook.py"]


def test_exact_float32_turns_tf32_off_inside_and_restores_the_settings() -> None:
    """The 1e-4 checks of a suffix or a rank-one plan run in IEEE float32 (TF32 is CUDA's
    default for convolutions); the user's settings, whatever they are, come back after."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = (conv.fp32_precision, matmul.fp32_precision)
    try:
        conv.fp32_precision, matmul.fp32_precision = "tf32", "tf32"
        with exact_float32():
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
        with pytest.raises(RuntimeError), exact_float32():
            raise RuntimeError("a failing check")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved
