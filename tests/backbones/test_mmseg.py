"""mmsegmentation 1.x integration: the ``MZBackbone`` wrapper, the shipped UperNet configs, and (slow) a
real ``Runner.from_cfg(cfg).train()`` on a tiny synthetic dataset in the ADE20K folder layout."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmseg", reason="needs the mmseg extra (mmcv, mmengine, mmsegmentation)")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit.*", "ignore::UserWarning:mmseg.*")

from mmengine.config import Config  # noqa: E402

from mz_backbones import create_backbone, list_backbones  # noqa: E402
from mz_backbones.integrations import list_mmseg_configs, mmseg_config  # noqa: E402

CONFIGS = {"upernet_vmamba_tiny_s1l8_ade20k": "vmamba_test", "upernet_vim_tiny_ade20k": "vim_test"}
SIZE = 64  # images and crops of the synthetic dataset


def _mmseg_models():
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import mz_backbones.integrations.mmseg  # noqa: F401  (registers MZBackbone)

    register_all_modules(init_default_scope=True)
    return MODELS


# ---- the shipped configs -----------------------------------------------------------------------------
def test_shipped_configs_are_listed():
    assert sorted(CONFIGS) == list_mmseg_configs()
    with pytest.raises(ValueError, match="name must be one of"):
        mmseg_config("upernet_nope")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_config_parses_and_references_registered_names(name):
    cfg = Config.fromfile(mmseg_config(name))  # also runs custom_imports (registers MZBackbone)
    models = _mmseg_models()
    model = cfg.model
    assert cfg.custom_imports["imports"] == ["mz_backbones.integrations.mmseg"]
    assert model.backbone.type == "MZBackbone"
    assert model.backbone.name in list_backbones()
    for part in ("backbone", "neck", "decode_head", "auxiliary_head"):
        if part in model:
            assert models.get(model[part].type) is not None, (part, model[part].type)
    assert model.decode_head.type == "UPerHead" and model.auxiliary_head.type == "FCNHead"
    assert model.auxiliary_head.in_index == 2
    assert cfg.crop_size == (512, 512) and model.data_preprocessor.size == (512, 512)
    # the channels the heads expect are the ones the zoo model produces
    with torch.device("meta"):
        kwargs = {k: v for k, v in model.backbone.items() if k not in ("type", "name", "out_indices", "pretrained")}
        zoo = create_backbone(model.backbone.name, features_only=True, out_indices=model.backbone.out_indices, **kwargs)
    chans = [zoo.feature_info[i]["num_chs"] for i in zoo.out_indices]
    strides = [zoo.feature_info[i]["reduction"] for i in zoo.out_indices]
    if "neck" in model:  # Vim: four stride-16 maps rescaled into a 4..32 pyramid
        assert model.neck.type == "MultiLevelNeck" and model.neck.in_channels == chans
        assert strides == [16] * 4 and list(model.neck.scales) == [4, 2, 1, 0.5]
        chans = [model.neck.out_channels] * len(model.neck.scales)
    else:
        assert strides == [4, 8, 16, 32]
    assert model.decode_head.in_channels == chans
    assert model.auxiliary_head.in_channels == chans[2]
    opt = cfg.optim_wrapper.optimizer
    expect = {"upernet_vmamba_tiny_s1l8_ade20k": (6e-5, 0.01, 160000), "upernet_vim_tiny_ade20k": (1e-4, 0.05, 60000)}[name]
    assert (opt.type, opt.lr, opt.weight_decay, cfg.train_cfg.max_iters) == ("AdamW", *expect)
    assert [s.type for s in cfg.param_scheduler] == ["LinearLR", "PolyLR"]
    assert cfg.param_scheduler[-1].end == cfg.train_cfg.max_iters


# ---- the wrapper ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vmamba_test", "vim_test"])
def test_wrapper_returns_the_pyramid_as_a_tuple(name):
    models = _mmseg_models()
    torch.manual_seed(0)
    backbone = models.build(dict(type="MZBackbone", name=name, out_indices=(0, 1, 2, 3)))
    zoo = create_backbone(name, features_only=True)
    assert backbone.out_channels == [i["num_chs"] for i in zoo.feature_info]
    backbone.eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = backbone(x)
        direct = backbone.model(x)
    assert isinstance(feats, tuple) and len(feats) == 4
    for f, d, c, r in zip(feats, direct, backbone.out_channels, backbone.strides):
        assert f.shape == (2, c, 64 // r, 96 // r)
        assert torch.equal(f, d)  # no padding needed: the wrapper adds nothing


@pytest.mark.parametrize("name", ["vmamba_test", "vim_test"])
def test_wrapper_pads_odd_sizes_and_crops_back(name):
    models = _mmseg_models()
    torch.manual_seed(0)
    backbone = models.build(dict(type="MZBackbone", name=name, out_indices=(1, 3)))
    backbone.eval()
    x = torch.randn(1, 3, 70, 45, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = backbone(x)
    assert len(feats) == 2
    for f, c, r in zip(feats, backbone.out_channels, backbone.strides):
        assert f.shape == (1, c, math.ceil(70 / r), math.ceil(45 / r))
        assert torch.isfinite(f).all()
    strict = models.build(dict(type="MZBackbone", name=name, pad_to_multiple=False))
    with pytest.raises(ValueError, match="multiple"):
        strict(x)


def test_wrapper_rejects_bad_arguments():
    models = _mmseg_models()
    with pytest.raises(ValueError, match="unknown backbone"):
        models.build(dict(type="MZBackbone", name="vmamba_nope"))
    with pytest.raises(ValueError, match="out_indices"):
        models.build(dict(type="MZBackbone", name="vmamba_test", out_indices=(0, 7)))
    with pytest.raises(ValueError, match="pad_to_multiple"):
        models.build(dict(type="MZBackbone", name="vmamba_test", pad_to_multiple="yes"))


def test_wrapper_loads_a_checkpoint_and_trains(tmp_path):
    models = _mmseg_models()
    torch.manual_seed(0)
    src = create_backbone("vmamba_test")
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    backbone = models.build(dict(type="MZBackbone", name="vmamba_test", pretrained=str(path), grad_checkpointing=True))
    for (k, a), b in zip(src.state_dict().items(), backbone.model.state_dict().values()):
        assert torch.equal(a, b), k
    backbone.init_weights()  # mmengine's init must leave the loaded weights alone
    assert torch.equal(next(iter(src.state_dict().values())), next(iter(backbone.model.state_dict().values())))
    backbone.train()
    sum(f.square().mean() for f in backbone(torch.randn(2, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


# ---- end to end: mmseg's Runner on a synthetic ADE20K-layout dataset ----------------------------------
def _write_dataset(root: Path, n_train: int = 12, n_val: int = 4) -> None:
    """ADE20K layout: images/{training,validation}/*.jpg, annotations/{...}/*.png. Label values (ADE
    style, 0 = ignore): 1 background (grey), 2 red square, 3 blue disc; colour decides the class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            label = np.ones((SIZE, SIZE), np.uint8)
            x0, y0, s = *rng.integers(0, SIZE // 3, 2), int(rng.integers(24, 36))
            label[y0 : y0 + s, x0 : x0 + s] = 2
            cy, cx, r = *rng.integers(16, SIZE - 16, 2), int(rng.integers(10, 16))
            label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 3
            colours = np.array([[0, 0, 0], [110, 110, 110], [220, 30, 30], [30, 40, 210]], np.float64)
            img = colours[label] + rng.normal(0, 12, (SIZE, SIZE, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / split / f"{i:03d}.jpg", quality=95)
            Image.fromarray(label).save(root / "annotations" / split / f"{i:03d}.png")


def _tiny_config(shipped: str, variant: str, data_root: Path, work_dir: Path) -> Config:
    """The shipped config's model structure with the *_test backbone, narrow heads and 64x64 crops on CPU."""
    cfg = Config.fromfile(mmseg_config(shipped))
    crop = (SIZE, SIZE)
    m = cfg.model
    m.data_preprocessor.size = crop
    m.backbone.name = variant
    if "img_size" in m.backbone:
        m.backbone.img_size = SIZE
    m.backbone.pop("drop_path_rate", None)
    zoo = create_backbone(variant, features_only=True, out_indices=m.backbone.out_indices)
    chans = [zoo.feature_info[i]["num_chs"] for i in zoo.out_indices]
    if "neck" in m:
        m.neck.in_channels = chans
        m.neck.out_channels = chans[0]
        chans = [chans[0]] * len(m.neck.scales)
    # 3 classes (ADE labels 1-3 after reduce_zero_label); the metric still reports over ADE's 150
    m.decode_head.update(in_channels=chans, channels=16, num_classes=3)
    m.auxiliary_head.update(in_channels=chans[2], channels=8, num_classes=3)
    if m.test_cfg.get("mode") == "slide":
        m.test_cfg.update(crop_size=crop, stride=(43, 43))
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackSegInputs"),
    ]
    test_pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True), dict(type="PackSegInputs")]
    for loader, split, pipeline, bs in (
        (cfg.train_dataloader, "training", train_pipeline, 4),
        (cfg.val_dataloader, "validation", test_pipeline, 1),
    ):
        loader.update(batch_size=bs, num_workers=0, persistent_workers=False)
        loader.dataset.update(
            data_root=str(data_root),
            data_prefix=dict(img_path=f"images/{split}", seg_map_path=f"annotations/{split}"),
            pipeline=pipeline,
        )
    cfg.test_dataloader = copy.deepcopy(cfg.val_dataloader)
    cfg.optim_wrapper.optimizer.lr = 1e-2
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=3),
        dict(type="PolyLR", eta_min=0.0, power=1.0, begin=3, end=20, by_epoch=False),
    ]
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=20, val_interval=20)
    cfg.default_hooks.logger.interval = 5
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=-1, save_last=False)
    cfg.env_cfg.cudnn_benchmark = False
    cfg.visualizer.name = f"visualizer_{variant}"  # one mmengine global instance per runner
    cfg.randomness = dict(seed=0)
    cfg.work_dir = str(work_dir)
    cfg.launcher = "none"
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("shipped", sorted(CONFIGS), ids=lambda s: CONFIGS[s])
def test_runner_trains_and_validates_on_synthetic_ade20k(shipped, tmp_path):
    from mmengine.runner import Runner

    _write_dataset(tmp_path / "ade")
    cfg = _tiny_config(shipped, CONFIGS[shipped], tmp_path / "ade", tmp_path / "work")
    runner = Runner.from_cfg(cfg)
    assert type(runner.model.backbone).__name__ == "MZBackbone"
    assert runner.model.backbone.backbone_name == CONFIGS[shipped]
    runner.train()
    hub = runner.message_hub
    losses = np.asarray(hub.get_scalar("train/loss").data[0], dtype=float)
    assert len(losses) == 20 and np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses
    miou = hub.get_scalar("val/mIoU").current()
    assert isinstance(miou, float) and math.isfinite(miou) and 0.0 <= miou <= 100.0
    # better than predicting the majority class (background) everywhere
    from PIL import Image

    val = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "ade/annotations/validation").glob("*.png"))])
    majority_miou = 100.0 * (val == 1).mean() / 3
    assert miou > majority_miou + 5.0, (miou, majority_miou)
