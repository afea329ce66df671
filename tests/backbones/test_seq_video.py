"""The 1D sequence encoder (``bimamba_seq_*``) and VideoMamba: token layouts, position embeddings,
bidirectionality, feature shapes, published sizes and the official VideoMamba key layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mz_backbones import create_backbone
from mz_backbones.families.seq import sinusoidal_embedding

# ---- bimamba_seq ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,length",
    [
        (dict(patch_size=1, pos_embed="sinusoidal"), 37),
        (dict(patch_size=4, pos_embed="learned", seq_len=64), 92),
        (dict(patch_size=2, pos_embed="none", cls_token=True, mlp_ratio=2.0), 50),
    ],
    ids=["p1-sin-L37", "p4-learned-L92", "p2-none-cls-mlp-L50"],
)
def test_seq_feature_shapes_and_classifier(kwargs, length):
    torch.manual_seed(0)
    model = create_backbone("bimamba_seq_test", in_chans=5, num_classes=3, **kwargs)
    x = torch.randn(2, 5, length)
    feats = model.forward_intermediates(x)
    p = kwargs["patch_size"]
    assert [tuple(f.shape) for f in feats] == [(2, 32, length // p)] * 4
    assert [i["reduction"] for i in model.feature_info] == [p] * 4
    tokens = model.forward_features(x)
    assert tokens.shape == (2, length // p + (1 if kwargs.get("cls_token") else 0), 32)
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_seq_is_bidirectional():
    """With slow-decaying SSMs, the last input step reaches the first token and the first input step
    reaches the last token (beyond the conv window: through the backward / forward scans)."""
    torch.manual_seed(0)
    model = create_backbone("bimamba_seq_test", patch_size=1, pos_embed="none").eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.mixer.ssm.A_log.fill_(-3.0)  # A = -0.05
            blk.mixer.ssm.dt_bias.fill_(1.0)
    x = torch.randn(1, 1, 24)
    late, early = x.clone(), x.clone()
    late[..., -1] += 1.0
    early[..., 0] += 1.0
    with torch.no_grad():
        ref, a, b = (model.forward_intermediates(v)[-1] for v in (x, late, early))
    assert (ref[..., 0] - a[..., 0]).abs().max() > 1e-3
    assert (ref[..., -1] - b[..., -1]).abs().max() > 1e-3


def test_seq_learned_pos_embed_native_and_interpolated():
    torch.manual_seed(0)
    model = create_backbone("bimamba_seq_test", pos_embed="learned", seq_len=64, patch_size=4).eval()
    x = torch.randn(2, 1, 64)
    stem = model.stem(x).transpose(1, 2)
    torch.testing.assert_close(model.embed(x), stem + model.pos_embed)
    x2 = torch.randn(2, 1, 28)  # 7 tokens from a table of 16
    want = F.interpolate(model.pos_embed.transpose(1, 2), size=7, mode="linear", align_corners=False).transpose(1, 2)
    torch.testing.assert_close(model.embed(x2), model.stem(x2).transpose(1, 2) + want)


def test_sinusoidal_table():
    t = sinusoidal_embedding(9, 6)
    assert t.shape == (1, 9, 6)
    torch.testing.assert_close(t[0, 0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(t[0, 5, 0], torch.sin(torch.tensor(5.0)))
    torch.testing.assert_close(t[0, :, 0::2] ** 2 + t[0, :, 1::2] ** 2, torch.ones(9, 3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pos_embed="rope"), "pos_embed"),
        (dict(depth=3), "depth"),
        (dict(embed_dim=33, pos_embed="sinusoidal"), "even"),
        (dict(pos_embed="learned", seq_len=62), "seq_len"),
        (dict(cls_token="yes"), "cls_token"),
        (dict(patch_size=0), "patch_size"),
    ],
    ids=["pos-kind", "depth", "odd-dim", "seq_len-multiple", "cls-not-bool", "patch-zero"],
)
def test_seq_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_backbone("bimamba_seq_test", **kwargs)


def test_seq_rejects_length_not_multiple_of_patch():
    model = create_backbone("bimamba_seq_test", patch_size=4)
    with pytest.raises(ValueError, match="multiple of"):
        model(torch.randn(1, 1, 30))


# ---- VideoMamba ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,published", [("videomamba_tiny", 7.0), ("videomamba_small", 26.0)], ids=["Ti", "S"])
def test_videomamba_parameter_count(name, published):
    with torch.device("meta"):
        model = create_backbone(name, num_classes=1000)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - published) / published < 0.05


def test_videomamba_tokens_are_spatial_first_with_head_cls():
    torch.manual_seed(0)
    model = create_backbone("videomamba_test").eval()  # tubelet 2, built for 8 x 32 x 32 (4 x 2 x 2 tokens)
    x = torch.randn(1, 3, 8, 32, 32)
    tokens, grid = model.embed(x)
    assert grid == (4, 2, 2) and tokens.shape == (1, 1 + 16, 32)
    conv = model.patch_embed.proj(x)[0]  # [C, T, H, W]
    for t, h, w in [(0, 0, 1), (1, 0, 0), (3, 1, 1), (2, 1, 0)]:
        idx = 1 + t * 4 + h * 2 + w
        want = conv[:, t, h, w] + model.pos_embed[0, h * 2 + w] + model.temporal_pos_embed[0, t]
        torch.testing.assert_close(tokens[0, idx], want)
    torch.testing.assert_close(tokens[0, 0], (model.cls_token + model.cls_pos_embed)[0, 0])


def test_videomamba_features_on_other_clip_sizes():
    torch.manual_seed(0)
    model = create_backbone("videomamba_test", num_classes=4)
    x = torch.randn(2, 3, 6, 48, 16)  # 3 x 3 x 1 tokens; both embeddings interpolated
    feats = model.forward_intermediates(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 3, 3, 1)] * 4
    assert model.feature_info[0]["reduction"] == (2, 16, 16)
    assert model(x).shape == (2, 4)


def test_videomamba_official_checkpoint_layout(tmp_path):
    """VideoMamba keys (class row first in pos_embed, ``temporal_pos_embedding`` for 8 frames) load
    into a model built for 4 temporal tokens: the temporal table is resized."""
    torch.manual_seed(0)
    model = create_backbone("videomamba_test", num_classes=4)
    D, DI = 32, 64
    g = torch.Generator().manual_seed(1)
    sd = {
        "patch_embed.proj.weight": torch.randn(D, 3, 2, 16, 16, generator=g),
        "patch_embed.proj.bias": torch.randn(D, generator=g),
        "cls_token": torch.randn(1, 1, D, generator=g),
        "pos_embed": torch.randn(1, 1 + 4, D, generator=g),
        "temporal_pos_embedding": torch.randn(1, 8, D, generator=g),
        "norm_f.weight": torch.randn(D, generator=g),
        "head.weight": torch.randn(4, D, generator=g),
        "head.bias": torch.randn(4, generator=g),
    }
    for i in range(4):
        p = f"layers.{i}.mixer."
        sd[f"layers.{i}.norm.weight"] = torch.randn(D, generator=g)
        sd[p + "in_proj.weight"] = torch.randn(2 * DI, D, generator=g)
        sd[p + "out_proj.weight"] = torch.randn(D, DI, generator=g)
        for s in ("", "_b"):
            sd[p + f"conv1d{s}.weight"] = torch.randn(DI, 1, 4, generator=g)
            sd[p + f"conv1d{s}.bias"] = torch.randn(DI, generator=g)
            sd[p + f"x_proj{s}.weight"] = torch.randn(2 + 32, DI, generator=g)
            sd[p + f"dt_proj{s}.weight"] = torch.randn(DI, 2, generator=g)
            sd[p + f"dt_proj{s}.bias"] = torch.randn(DI, generator=g)
            sd[p + f"D{s}"] = torch.randn(DI, generator=g)
        sd[p + "A_log"] = torch.randn(DI, 16, generator=g)
        sd[p + "A_b_log"] = torch.randn(DI, 16, generator=g)
    torch.save({"model": sd}, tmp_path / "vm.pth")
    loaded = create_backbone("videomamba_test", num_classes=4, pretrained=tmp_path / "vm.pth").state_dict()
    assert loaded.keys() == model.state_dict().keys()
    torch.testing.assert_close(loaded["cls_pos_embed"], sd["pos_embed"][:, :1])
    torch.testing.assert_close(loaded["pos_embed"], sd["pos_embed"][:, 1:])
    want_t = F.interpolate(sd["temporal_pos_embedding"].transpose(1, 2), size=4, mode="linear", align_corners=False)
    torch.testing.assert_close(loaded["temporal_pos_embed"], want_t.transpose(1, 2))
    torch.testing.assert_close(loaded["blocks.1.mixer.ssm.x_proj_weight"][1], sd["layers.1.mixer.x_proj_b.weight"])
    torch.testing.assert_close(loaded["blocks.1.mixer.conv_bias"][DI:], sd["layers.1.mixer.conv1d_b.bias"])
    torch.testing.assert_close(loaded["norm.weight"], sd["norm_f.weight"])


def test_videomamba_bad_arguments():
    with pytest.raises(ValueError, match="num_frames"):
        create_backbone("videomamba_test", num_frames=7)
    with pytest.raises(ValueError, match="merge"):
        create_backbone("videomamba_test", merge="max")
