"""Saved-for-backward bytes per module: exact on a small network, storages counted once."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mz_pipelines.runtime.saved_memory import saved_bytes_by_module


def test_attribution_is_exact_on_a_small_network() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.ReLU(), nn.Linear(16, 4)))
    x = torch.randn(5, 8)
    got = saved_bytes_by_module(net, lambda: net(x).sum(), depth=2)
    # Linear 0 saves its input x; ReLU saves its output, which Linear 1.1 saves again (one storage)
    assert got == {"1.0": 5 * 16 * 4, "0": 5 * 8 * 4}
    assert saved_bytes_by_module(net, lambda: net(x).sum(), depth=1) == {"1": 5 * 16 * 4, "0": 5 * 8 * 4}
    # hooks are gone afterwards, the module still works
    assert not net._forward_hooks and not net[0]._forward_pre_hooks and net(x).shape == (5, 4)


def test_nothing_saved_without_autograd_and_bad_depth() -> None:
    net = nn.Linear(4, 4)
    with torch.no_grad():
        assert saved_bytes_by_module(net, lambda: net(torch.randn(2, 4))) == {}
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        saved_bytes_by_module(net, lambda: net(torch.randn(2, 4)), depth=0)
