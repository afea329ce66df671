# UperNet + VMamba-T (vmamba_tiny_s1l8) on ADE20K, 512x512 crops, 160k iterations (mmsegmentation 1.2.2).
# Follows MzeroMiko/VMamba segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py, which
# inherits mmseg's Swin-T UperNet recipe: UPerHead on strides 4-32, auxiliary FCNHead on level 2, AdamW 6e-5,
# weight decay 0.01, 1500-iteration linear warm-up then PolyLR; 4 GPUs x 4 images (16 per iteration).
# Train: mim train mmsegmentation <this file>   or   python mmseg/tools/train.py <this file>
# Weights: model.backbone.pretrained = "<official VMamba or mambazoo checkpoint>" (keys are mapped).
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
        name="vmamba_tiny_s1l8",
        out_indices=(0, 1, 2, 3),
        pretrained=None,
        drop_path_rate=0.2,
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768], channels=512, num_classes=150),
    auxiliary_head=dict(in_channels=384, in_index=2, num_classes=150),
)

optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    # no weight decay on norms, SSM A/D/dt terms and position embeddings (Backbone.no_weight_decay)
    paramwise_cfg=dict(
        custom_keys={
            "norm": dict(decay_mult=0.0),
            "A_log": dict(decay_mult=0.0),
            "dt_bias": dict(decay_mult=0.0),
            ".D": dict(decay_mult=0.0),
            "pos_embed": dict(decay_mult=0.0),
        }
    ),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=160000, val_interval=16000)

# 4 GPUs x 4 images per GPU
train_dataloader = dict(batch_size=4)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
