"""Building blocks of the zoo: the folded multi-direction selective SSM, mixers and common layers."""
from __future__ import annotations

from .common import (
    BATCHNORM, CONV, CONV_T, INSTANCENORM, MAXPOOL, ChannelNorm, DropPath, Mlp, check_spatial_dims,
    resample_pos_embed, run_checkpointed, to_channels_first, to_channels_last,
)
from .ssm import SelectiveSSM, dt_rank_for

__all__ = [
    "BATCHNORM", "CONV", "CONV_T", "INSTANCENORM", "MAXPOOL", "ChannelNorm", "DropPath", "Mlp",
    "SelectiveSSM", "check_spatial_dims", "dt_rank_for", "resample_pos_embed", "run_checkpointed", "to_channels_first", "to_channels_last",
]
