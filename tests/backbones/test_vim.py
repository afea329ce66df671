"""Vim and LocalVim: published sizes, the middle class token, the official Vim checkpoint layout
(checked against an independent re-implementation of Vim's forward), ShuffleMamba, local scans."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mz_backbones import create_backbone
from mz_backbones.families.localvim import LocalMambaMixer, parse_direction
from mz_backbones.layers.vim_block import call_shuffled


def _params(name: str) -> float:
    with torch.device("meta"):
        model = create_backbone(name, num_classes=1000)
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize(
    "name,published",
    [("vim_tiny", 7.0), ("vim_small", 26.0), ("localvim_tiny", 8.0), ("localvim_small", 28.0)],
    ids=["vim-Ti", "vim-S", "localvim-T", "localvim-S"],
)
def test_parameter_count_matches_paper(name, published):
    assert abs(_params(name) - published) / published < 0.05


def test_cls_token_sits_in_the_middle():
    torch.manual_seed(0)
    model = create_backbone("vim_test").eval()
    x = torch.randn(1, 3, 48, 80)  # 3 x 5 = 15 patches -> class token at index 7
    tokens, grid = model.embed(x)
    assert grid == (3, 5) and tokens.shape == (1, 16, 32)
    torch.testing.assert_close(tokens[0, 7], (model.cls_token + model.cls_pos_embed)[0, 0])
    # forward_features reorders so the class token comes first
    feats = model.forward_features(x)
    _, final, _ = model._run(x, ())
    torch.testing.assert_close(feats[:, 0], model.norm(final)[:, 7])


# ---- official checkpoint layout --------------------------------------------------------------
D, DI, N, R, DEPTH, M, NCLS = 32, 64, 16, 2, 4, 16, 5  # vim_test at 64 x 64: 4 x 4 patches


def _official_vim_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in hustvl/Vim's key layout and shapes, with random values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "patch_embed.proj.weight": rnd(D, 3, 16, 16, scale=0.02),
        "patch_embed.proj.bias": rnd(D),
        "cls_token": rnd(1, 1, D, scale=1.0),
        "pos_embed": rnd(1, M + 1, D),
        "norm_f.weight": 1 + rnd(D),
        "head.weight": rnd(NCLS, D),
        "head.bias": rnd(NCLS),
    }
    for i in range(DEPTH):
        p = f"layers.{i}.mixer."
        sd[f"layers.{i}.norm.weight"] = 1 + rnd(D)
        sd[p + "in_proj.weight"] = rnd(2 * DI, D, scale=D**-0.5)
        sd[p + "out_proj.weight"] = rnd(D, DI, scale=DI**-0.5)
        for sfx in ("", "_b"):
            sd[p + f"conv1d{sfx}.weight"] = rnd(DI, 1, 4, scale=0.5)
            sd[p + f"conv1d{sfx}.bias"] = rnd(DI)
            sd[p + f"x_proj{sfx}.weight"] = rnd(R + 2 * N, DI, scale=DI**-0.5)
            sd[p + f"dt_proj{sfx}.weight"] = rnd(DI, R, scale=R**-0.5)
            sd[p + f"dt_proj{sfx}.bias"] = rnd(DI) - 3.0
            sd[p + f"D{sfx}"] = 1 + rnd(DI)
        sd[p + "A_log"] = torch.log(torch.arange(1, N + 1.0)).expand(DI, N) + rnd(DI, N)
        sd[p + "A_b_log"] = torch.log(torch.arange(1, N + 1.0)).expand(DI, N) + rnd(DI, N)
    return sd


def _ref_direction(x, conv_w, conv_b, x_proj, dt_w, dt_b, A_log, Dp):
    """One Mamba-1 direction written out step by step: causal conv -> SiLU -> S6, ``x [B, L, C]``."""
    L = x.shape[1]
    xc = F.silu(F.conv1d(x.transpose(1, 2), conv_w, conv_b, padding=3, groups=x.shape[-1])[..., :L]).transpose(1, 2)
    dt, Bm, Cm = (xc @ x_proj.T).split([R, N, N], dim=-1)
    dt = F.softplus(dt @ dt_w.T + dt_b)
    A = -torch.exp(A_log)
    h = torch.zeros(x.shape[0], x.shape[-1], N)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bm[:, t, None, :] * xc[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + Dp * xc[:, t])
    return torch.stack(ys, 1)


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _ref_vim_logits(sd, x):
    """Vim's forward (middle class token, Add -> RMSNorm -> bimamba v2 with div2, norm_f, head)."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    mid = t.shape[1] // 2
    t = torch.cat([t[:, :mid], sd["cls_token"].expand(x.shape[0], -1, -1), t[:, mid:]], 1) + sd["pos_embed"]
    residual, hidden = None, t
    for i in range(DEPTH):
        p = f"layers.{i}.mixer."
        residual = hidden if residual is None else residual + hidden
        xs, z = (_rms(residual, sd[f"layers.{i}.norm.weight"]) @ sd[p + "in_proj.weight"].T).chunk(2, -1)

        def run(seq, s):
            names = (f"conv1d{s}.weight", f"conv1d{s}.bias", f"x_proj{s}.weight", f"dt_proj{s}.weight",
                     f"dt_proj{s}.bias", "A_b_log" if s else "A_log", f"D{s}")
            return _ref_direction(seq, *(sd[p + n] for n in names))

        y = (run(xs, "") + run(xs.flip(1), "_b").flip(1)) / 2
        hidden = (y * F.silu(z)) @ sd[p + "out_proj.weight"].T
    out = _rms(residual + hidden, sd["norm_f.weight"])
    return out[:, mid] @ sd["head.weight"].T + sd["head.bias"]


def test_official_checkpoint_maps_and_reproduces_vim(tmp_path):
    sd = _official_vim_state_dict()
    path = tmp_path / "vim_official.pth"
    torch.save({"model": sd}, path)
    model = create_backbone("vim_test", num_classes=NCLS, pretrained=path).eval()
    own = model.state_dict()
    torch.testing.assert_close(own["blocks.2.mixer.conv_weight"][:DI], sd["layers.2.mixer.conv1d.weight"][:, 0])
    torch.testing.assert_close(own["blocks.2.mixer.conv_weight"][DI:], sd["layers.2.mixer.conv1d_b.weight"][:, 0])
    torch.testing.assert_close(own["blocks.3.mixer.ssm.A_log"][1], sd["layers.3.mixer.A_b_log"])
    torch.testing.assert_close(own["blocks.0.mixer.ssm.dt_bias"][0], sd["layers.0.mixer.dt_proj.bias"])
    torch.testing.assert_close(own["norm.weight"], sd["norm_f.weight"])
    torch.testing.assert_close(own["cls_pos_embed"][0, 0], sd["pos_embed"][0, M // 2])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _ref_vim_logits(sd, x), rtol=1e-4, atol=1e-4)


def test_official_pos_embed_is_resized_to_another_grid(tmp_path):
    sd = _official_vim_state_dict()
    path = tmp_path / "vim_official.pth"
    torch.save(sd, path)
    model = create_backbone("vim_test", num_classes=NCLS, img_size=(48, 80), pretrained=path)
    assert model.pos_embed.shape == (1, 15, D)
    grid = torch.cat([sd["pos_embed"][:, : M // 2], sd["pos_embed"][:, M // 2 + 1 :]], 1)
    want = F.interpolate(grid.reshape(1, 4, 4, D).permute(0, 3, 1, 2), size=(3, 5), mode="bicubic", align_corners=False)
    torch.testing.assert_close(model.pos_embed.detach(), want.permute(0, 2, 3, 1).reshape(1, 15, D))


def test_official_checkpoint_of_other_depth_is_rejected(tmp_path):
    sd = {k: v for k, v in _official_vim_state_dict().items() if not k.startswith("layers.3.")}
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="missing"):
        create_backbone("vim_test", num_classes=NCLS, pretrained=tmp_path / "short.pth")


# ---- ShuffleMamba ------------------------------------------------------------------------------
def _pair(shuffle_prob: float):
    torch.manual_seed(0)
    plain = create_backbone("vim_test", num_classes=3)
    shuffled = create_backbone("vim_test", num_classes=3, shuffle_prob=shuffle_prob)
    shuffled.load_state_dict(plain.state_dict())
    return plain, shuffled


def test_shuffle_schedule_rises_linearly_with_depth():
    _, model = _pair(0.6)
    assert model.shuffle_probs == pytest.approx([0.0, 0.2, 0.4, 0.6])


def test_shuffle_is_identity_at_eval():
    plain, shuffled = _pair(1.0)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(shuffled.eval()(x), plain.eval()(x))


def test_shuffle_changes_training_forward_and_keeps_gradients():
    plain, shuffled = _pair(1.0)  # the last layer always runs on shuffled tokens
    x = torch.randn(2, 3, 64, 48)
    torch.manual_seed(1)
    out = shuffled.train()(x)
    assert not torch.allclose(out, plain.train()(x), atol=1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None for p in shuffled.parameters())


def test_call_shuffled_restores_token_order():
    torch.manual_seed(0)
    blk = create_backbone("vim_test").blocks[1]
    stream = torch.randn(2, 11, 32)
    perm = torch.randperm(11)
    out = call_shuffled(blk, stream, perm, (11,))
    torch.testing.assert_close(out[:, perm], blk(stream[:, perm], (11,)))


def test_bad_shuffle_prob_raises():
    with pytest.raises(ValueError, match="shuffle_prob"):
        create_backbone("vim_test", shuffle_prob=1.5)


# ---- LocalVim -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,triple",
    [("h", (None, False, False)), ("v_flip", (None, True, True)), ("w7", (7, False, False)), ("w2_flip", (2, False, True))],
    ids=["h", "v_flip", "w7", "w2_flip"],
)
def test_direction_names(name, triple):
    assert parse_direction(name) == triple


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(directions=[("h",)] * 3), "4 layers"),
        (dict(directions=[("h", "diag")] * 4), "direction"),
        (dict(cls_token="middle"), "cls_token"),
    ],
    ids=["wrong-depth", "unknown-direction", "cls-token"],
)
def test_localvim_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_backbone("localvim_test", **kwargs)


def test_local_mixer_channel_attention_and_gate_order():
    """A single global direction needs no padding: the mixer is in_proj -> conv -> SSM -> * SiLU(z)
    -> channel gate from the token mean of LN(y) -> out_proj."""
    torch.manual_seed(0)
    mixer = LocalMambaMixer(16, ["h"], d_state=4)
    x = torch.randn(2, 15, 16)
    xs, z = mixer.in_proj(x).chunk(2, -1)
    L, C = 15, mixer.d_inner
    xc = F.silu(F.conv1d(xs.transpose(1, 2), mixer.conv_weight[:, None], mixer.conv_bias, padding=3, groups=C)[..., :L])
    y = mixer.ssm(xc.transpose(1, 2)[:, :, None].contiguous())[:, :, 0] * F.silu(z)
    a = mixer.attn
    gate = torch.sigmoid(a.channel_select(F.gelu(a.global_reduce(a.norm(y).mean(1, keepdim=True)))))
    torch.testing.assert_close(mixer(x, (3, 5)), mixer.out_proj(y * gate), rtol=1e-5, atol=1e-5)


def test_local_mixer_ignores_window_padding_in_the_gate():
    """On a 3 x 5 grid the 2x2 windows pad the scan to 4 x 6 slots; the channel gate must average the
    15 real tokens only (compared with an explicit mean over them)."""
    torch.manual_seed(0)
    mixer = LocalMambaMixer(16, ["w2", "v_flip"], d_state=4)
    x = torch.randn(1, 15, 16)
    mask = mixer.scan.scan(torch.ones(1, 15, 1), (3, 5))
    assert mask.shape[1] == 4 * 6 and mask[0, :, 0].sum() == 15 and mask[0, :, 1].sum() == 15
    y = torch.randn(1, mask.shape[1], 2, mixer.d_inner)
    gates = mixer.attn(y, mask)
    real = mask[0, :, 0, 0].bool()
    want = torch.sigmoid(mixer.attn.channel_select(F.gelu(mixer.attn.global_reduce(mixer.attn.norm(y[:, real, 0]).mean(1)))))
    torch.testing.assert_close(gates[:, 0], want)
    with torch.no_grad():
        assert torch.isfinite(mixer(x, (3, 5))).all()
