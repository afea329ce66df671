"""PlainMamba: published sizes, zig-zag mixer against an independent loop reference, any input size,
and loading a state dict in the official (mmcls) key layout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mz_backbones import create_backbone
from mz_backbones.families.plainmamba import PlainMamba2D
from mz_kernels import selective_scan


def _n_params(name: str) -> int:
    with torch.device("meta"):
        model = create_backbone(name, num_classes=1000)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "published"), [("plainmamba_l1", 7.3e6), ("plainmamba_l2", 25.7e6)], ids=["l1", "l2"])
def test_param_count_matches_paper(name, published):
    assert abs(_n_params(name) - published) / published < 0.05


def _snake_routes(H: int, W: int) -> tuple[list[list[int]], list[list[int]]]:
    """The paper's four routes as cell lists, and per-token ids of the move that reached each cell
    (0 start, 1 right, 2 left, 3 up, 4 down)."""
    def snake(lines, length, first_fwd):
        out = []
        for n, line in enumerate(lines):
            fwd = first_fwd if n % 2 == 0 else not first_fwd
            out += [(line, k) for k in (range(length) if fwd else reversed(range(length)))]
        return out

    r1 = [(i, j) for i, j in snake(range(H), W, True)]
    r2 = [(i, j) for i, j in snake(reversed(range(H)), W, H % 2 == 0)]
    r3 = [(i, j) for j, i in snake(range(W), H, True)]
    r4 = [(i, j) for j, i in snake(reversed(range(W)), H, W % 2 == 0)]
    move = {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}
    orders, ids = [], []
    for cells in (r1, r2, r3, r4):
        orders.append([i * W + j for i, j in cells])
        ids.append([0] + [move[(b[0] - a[0], b[1] - a[1])] for a, b in zip(cells, cells[1:])])
    return orders, ids


def _reference(mixer: PlainMamba2D, x: torch.Tensor, grid: tuple[int, int], bc_order: str) -> torch.Tensor:
    """One selective scan per route, in the released code's structure (``ref`` backend)."""
    H, W = grid
    B, L, _ = x.shape
    ssm = mixer.ssm
    xs, z = mixer.in_proj(x).chunk(2, dim=-1)
    xs = F.silu(mixer.conv2d(xs.transpose(1, 2).reshape(B, -1, H, W))).flatten(2).transpose(1, 2)
    proj = lambda t: t @ ssm.x_proj_weight[0].t()  # noqa: E731
    orders, ids = _snake_routes(H, W)
    A = -torch.exp(ssm.A_log[0])
    y = torch.zeros_like(xs)
    for order, dirs in zip(orders, ids):
        o = torch.tensor(order)
        src = xs if bc_order == "raster" else xs[:, o]
        dt, Bm, Cm = proj(src).split([ssm.dt_rank, ssm.d_state, ssm.d_state], dim=-1)
        Bm = Bm + mixer.direction_Bs[torch.tensor(dirs)]
        out, _ = selective_scan(xs[:, o].contiguous(), (dt @ ssm.dt_proj_weight[0].t()).contiguous(), A,
                                Bm[:, :, None].contiguous(), Cm[:, :, None].contiguous(),
                                D=ssm.D[0], delta_bias=ssm.dt_bias[0], backend="ref")
        y[:, o] += out
    return mixer.out_proj(y * F.silu(z))


@pytest.mark.parametrize("bc_order", ["route", "raster"])
@pytest.mark.parametrize("grid", [(3, 5), (4, 3)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_mixer_matches_loop_reference(grid, bc_order):
    torch.manual_seed(0)
    mixer = PlainMamba2D(12, d_state=5, bc_order=bc_order)
    with torch.no_grad():
        mixer.direction_Bs.normal_(0, 0.5)
    x = torch.randn(2, grid[0] * grid[1], 12)
    torch.testing.assert_close(mixer(x, grid), _reference(mixer, x, grid, bc_order), rtol=1e-4, atol=1e-5)


def test_direction_bs_change_output():
    torch.manual_seed(1)
    mixer = PlainMamba2D(8, d_state=4)
    x = torch.randn(1, 12, 8)
    before = mixer(x, (3, 4))
    with torch.no_grad():
        mixer.direction_Bs[3].add_(1.0)  # "up" moves only occur on route 2 for H=3
    assert not torch.allclose(before, mixer(x, (3, 4)))


@pytest.mark.parametrize("size", [(64, 96), (80, 48)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_any_input_size(size):
    torch.manual_seed(2)
    model = create_backbone("plainmamba_test", num_classes=0).eval()
    feats = model.forward_intermediates(torch.randn(1, 3, *size))
    assert [tuple(f.shape) for f in feats] == [(1, 32, size[0] // 16, size[1] // 16)] * 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="bc_order"):
        create_backbone("plainmamba_test", bc_order="diagonal")
    with pytest.raises(ValueError, match="img_size"):
        create_backbone("plainmamba_test", img_size=70)
    with pytest.raises(ValueError, match="multiple"):
        create_backbone("plainmamba_test")(torch.randn(1, 3, 64, 72))


def _official_state_dict(embed=32, depth=4, d_state=4, convs=1, dw_layers=(0,), classes=7, grid=14) -> dict:
    """Keys and shapes of the released mmcls checkpoint (ImageClassifier: backbone / head.fc)."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    E, R = 2 * embed, math.ceil(embed / 16)
    sd = {"backbone.pos_embed": r(1, grid * grid, embed), "backbone.patch_embed.stem.0.weight": r(64, 3, 7, 7),
          "backbone.patch_embed.projection.weight": r(embed, 64, 8, 8), "backbone.patch_embed.projection.bias": r(embed)}
    bn = lambda p, c: {f"{p}.weight": r(c), f"{p}.bias": r(c), f"{p}.running_mean": r(c),  # noqa: E731
                       f"{p}.running_var": r(c).abs(), f"{p}.num_batches_tracked": torch.tensor(5)}
    sd.update(bn("backbone.patch_embed.stem.1", 64))
    for c in range(convs):
        sd[f"backbone.patch_embed.convs.{3 * c}.weight"] = r(64, 64, 3, 3)
        sd.update(bn(f"backbone.patch_embed.convs.{3 * c + 1}", 64))
    for i in range(depth):
        p = f"backbone.layers.{i}."
        sd.update({p + "norm.weight": r(embed), p + "norm.bias": r(embed),
                   p + "mamba.in_proj.weight": r(2 * E, embed), p + "mamba.in_proj.bias": r(2 * E),
                   p + "mamba.conv2d.weight": r(E, 1, 7, 7), p + "mamba.conv2d.bias": r(E),
                   p + "mamba.x_proj.weight": r(R + 2 * d_state, E), p + "mamba.dt_proj.weight": r(E, R),
                   p + "mamba.dt_proj.bias": r(E), p + "mamba.A_log": r(E, d_state), p + "mamba.D": r(E),
                   p + "mamba.out_proj.weight": r(embed, E), p + "mamba.out_proj.bias": r(embed),
                   p + "mamba.direction_Bs": r(5, d_state)})
        if i in dw_layers:
            sd[p + "dw.0.weight"] = r(embed, 1, 3, 3)
            sd.update(bn(p + "dw.1", embed))
    sd.update({"backbone.ln1.weight": r(embed), "backbone.ln1.bias": r(embed),
               "head.fc.weight": r(classes, embed), "head.fc.bias": r(classes)})
    return sd


def test_official_checkpoint_loads(tmp_path):
    sd = _official_state_dict()
    path = tmp_path / "plainmamba_official.pth"
    torch.save({"meta": {"epoch": 300}, "state_dict": sd}, path)
    model = create_backbone("plainmamba_test", pretrained=path, num_classes=7)  # built for 64x64 (4x4 grid)
    got = model.state_dict()
    torch.testing.assert_close(got["layers.2.mamba.in_proj.weight"], sd["backbone.layers.2.mamba.in_proj.weight"])
    torch.testing.assert_close(got["layers.1.mamba.ssm.x_proj_weight"][0], sd["backbone.layers.1.mamba.x_proj.weight"])
    torch.testing.assert_close(got["layers.3.mamba.ssm.dt_bias"][0], sd["backbone.layers.3.mamba.dt_proj.bias"])
    torch.testing.assert_close(got["layers.0.mamba.ssm.A_log"][0], sd["backbone.layers.0.mamba.A_log"])
    torch.testing.assert_close(got["layers.0.mamba.direction_Bs"], sd["backbone.layers.0.mamba.direction_Bs"])
    torch.testing.assert_close(got["layers.0.dw.1.running_var"], sd["backbone.layers.0.dw.1.running_var"])
    torch.testing.assert_close(got["norm.weight"], sd["backbone.ln1.weight"])
    torch.testing.assert_close(got["head.weight"], sd["head.fc.weight"])
    assert got["pos_embed"].shape == (1, 16, 32)  # 14x14 resized to the 4x4 grid
    mean_in, mean_out = sd["backbone.pos_embed"].mean(), got["pos_embed"].mean()
    assert abs(mean_in - mean_out) < 0.5
    assert torch.isfinite(model.eval()(torch.randn(1, 3, 64, 64))).all()


def test_official_checkpoint_with_wrong_depth_is_rejected(tmp_path):
    sd = _official_state_dict(depth=3)
    path = tmp_path / "short.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError, match="missing"):
        create_backbone("plainmamba_test", pretrained=path, num_classes=7)
