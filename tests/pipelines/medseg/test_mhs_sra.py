"""MHS-VM-style scan-route attention (``route_fusion="sra"``): the fusion against an element-wise
loop, the route pairs, the mixer against a reference built from explicit per-scan indexing (float64,
odd grid), and the U-Nets' switches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mz_pipelines.medseg.models import build_model
from mz_pipelines.medseg.models.vmunet import MultiHeadRouteSS2D, scan_route_attention, sra_route_orders


def test_scan_route_attention_matches_elementwise_loop() -> None:
    torch.manual_seed(0)
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64)  # [..., R=4, C=5]
    for t in (0.0, 0.7):
        out = scan_route_attention(y, t)
        ref = torch.empty(2, 3, 5, dtype=torch.float64)
        for i in range(2):
            for j in range(3):
                for c in range(5):
                    v = [float(y[i, j, r, c]) for r in range(4)]
                    mean = sum(v) / 4
                    std = (sum((a - mean) ** 2 for a in v) / 3) ** 0.5
                    level = sum(a - min(v) for a in v) / 4
                    ref[i, j, c] = sum(v) * max(std / (level + 1e-5) - t, 0.0)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert (scan_route_attention(y, 1e6) == 0).all()  # above every cv: all weights zero


def test_sra_route_pairs_and_reverses() -> None:
    r = sra_route_orders(5, 7, 3)
    assert r.shape == (3, 4, 35)
    for head in r:
        for row in head:
            assert torch.equal(row.sort().values, torch.arange(35))
        assert torch.equal(head[1], head[0].flip(0)) and torch.equal(head[3], head[2].flip(0))
    for h, w in ((5, 7), (4, 6), (3, 8)):  # 12 different scans, odd and even grids
        rows = sra_route_orders(h, w, 3).reshape(12, h * w)
        assert len({tuple(row.tolist()) for row in rows}) == 12
    with pytest.raises(ValueError, match="at most 3"):
        sra_route_orders(5, 7, 4)


def _reference(m: MultiHeadRouteSS2D, x: torch.Tensor) -> torch.Tensor:
    """The mixer with the scans read and written back by explicit indexing, fused by a plain loop."""
    B, H, W, _ = x.shape
    L, hd = H * W, m.head_dim
    xs, z = m.in_proj(x).chunk(2, dim=-1)
    xs = F.silu(m.conv2d(xs.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)).reshape(B, L, m.heads, hd)
    routes = sra_route_orders(H, W, m.heads)  # [heads, 4, L]
    seqs = torch.stack([xs[:, routes[h, r], h, :] for h in range(m.heads) for r in range(4)], dim=2)
    ys = m.ssm(seqs)  # [B, L, heads*4, hd]
    grid = torch.zeros(B, L, m.heads, 4, hd, dtype=x.dtype)
    for h in range(m.heads):
        for r in range(4):
            grid[:, routes[h, r], h, r, :] = ys[:, :, 4 * h + r, :]
    s = grid.sum(3)
    cv = grid.std(3) / ((grid - grid.min(3, keepdim=True).values).mean(3) + 1e-5)
    y = (s * torch.clamp(cv - m.sra_threshold, min=0)).reshape(B, L, m.d_inner)
    y = m.out_norm(y) * F.silu(z.reshape(B, L, m.d_inner))
    return m.out_proj(y).reshape(B, H, W, -1)


@pytest.mark.parametrize("heads,t", [(3, 0.0), (2, 0.2)])
def test_sra_mixer_matches_explicit_reference(heads: int, t: float) -> None:
    torch.manual_seed(1)
    m = MultiHeadRouteSS2D(12, heads=heads, d_state=3, route_fusion="sra", sra_threshold=t).double()
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, _reference(m, x), rtol=1e-10, atol=1e-10)
    y.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and all(p.grad is not None for p in m.parameters())


def test_unets_take_route_fusion_and_validate() -> None:
    for name in ("vmunet", "msvmunet"):
        torch.manual_seed(2)
        net = build_model(name, spatial_dims=2, in_channels=1, out_channels=2, route="mhs", heads=3, route_fusion="sra")
        ops = [m for m in net.modules() if isinstance(m, MultiHeadRouteSS2D)]
        assert ops and all(m.route_fusion == "sra" for m in ops)
        y = net(torch.randn(1, 1, 64, 32))
        assert y.shape == (1, 2, 64, 32) and torch.isfinite(y).all()
        y.sum().backward()
    with pytest.raises(ValueError, match="needs route='mhs'"):
        build_model("vmunet", spatial_dims=2, in_channels=1, out_channels=2, route_fusion="sra")
    with pytest.raises(ValueError, match="route_fusion must be one of"):
        build_model("vmunet", spatial_dims=2, in_channels=1, out_channels=2, route="mhs", route_fusion="attn")
    with pytest.raises(ValueError, match="heads must be at most 3"):
        MultiHeadRouteSS2D(16, heads=4, route_fusion="sra")
    with pytest.raises(ValueError, match="sra_threshold must be"):
        MultiHeadRouteSS2D(16, heads=2, route_fusion="sra", sra_threshold=-1)
