# UperNet + Vim-Ti (vim_tiny) on ADE20K, 512x512 crops, 60k iterations (mmsegmentation 1.2.2).
# Ports hustvl/Vim seg/configs/vim/upernet/upernet_vim_tiny_24_512_slide_60k.py (written for mmseg 0.29) to
# mmseg 1.x: blocks 5/11/17/23 are tapped at stride 16 (192 channels each), mmseg's MultiLevelNeck rescales
# them by 4, 2, 1, 0.5 into a stride 4-32 pyramid for UPerHead (channels 192), auxiliary FCNHead on level 2.
# AdamW 1e-4, weight decay 0.05, 1500-iteration linear warm-up then poly (power 1); sliding-window test
# 512 / 341; 4 GPUs x 8 images (32 per iteration). Not ported: Vim's layer-wise lr decay (0.92 over 24 layers).
# Weights: model.backbone.pretrained = "<official Vim or mambazoo checkpoint>" (keys are mapped).
_base_ = [
    "mmseg::_base_/models/upernet_swin.py",
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_160k.py",
]
custom_imports = dict(imports=["mz_backbones.integrations.mmseg"], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type="MZBackbone",
        name="vim_tiny",
        out_indices=(0, 1, 2, 3),  # vim_tiny.feature_info: the outputs of blocks 5, 11, 17, 23
        pretrained=None,
        img_size=512,
    ),
    neck=dict(type="MultiLevelNeck", in_channels=[192, 192, 192, 192], out_channels=192, scales=[4, 2, 1, 0.5]),
    decode_head=dict(in_channels=[192, 192, 192, 192], channels=192, num_classes=150),
    auxiliary_head=dict(in_channels=192, in_index=2, num_classes=150),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)),
)

optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    # no weight decay on norms, SSM A/D/dt terms, the cls token and position embeddings
    paramwise_cfg=dict(
        custom_keys={
            "norm": dict(decay_mult=0.0),
            "A_log": dict(decay_mult=0.0),
            "dt_bias": dict(decay_mult=0.0),
            ".D": dict(decay_mult=0.0),
            "pos_embed": dict(decay_mult=0.0),
            "cls_token": dict(decay_mult=0.0),
        }
    ),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=60000, by_epoch=False),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=60000, val_interval=1000)
default_hooks = dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=1000, max_keep_ckpts=4))

# 4 GPUs x 8 images per GPU
train_dataloader = dict(batch_size=8)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
