"""Prediction writes masks in the input's exact geometry and reports volumes in mL.

The network is a real 1x1 convolution with fixed weights, ``logits = (t - x, x - t)``: it labels a
voxel foreground when its (preprocessed) intensity exceeds ``t``. Geometry handling does not depend
on what the network learned, and with a known rule the expected mask is known exactly.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")

from mz_pipelines.medseg.config import MedsegConfig, MedsegDataConfig, MedsegInferConfig, MedsegModelConfig  # noqa: E402
from mz_pipelines.medseg.nifti import read_image, write_image  # noqa: E402
from mz_pipelines.medseg.predict import case_name, label_volumes_ml, predict_array, predict_file  # noqa: E402
from mz_pipelines.medseg.synth import geometry  # noqa: E402


class ThresholdNet(nn.Module):
    """``[B, 1, *S] -> [B, 2, *S]`` logits of ``x > t`` (a 1x1 convolution with fixed weights)."""

    def __init__(self, spatial_dims: int, t: float) -> None:
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.conv = conv(1, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-10.0, 10.0]).reshape(2, 1, *([1] * spatial_dims)))
            self.conv.bias.copy_(torch.tensor([10.0 * t, -10.0 * t]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _cfg(roi, *, spacing=(), intensity="none", tta="none"):
    return MedsegConfig(
        data=MedsegDataConfig(roi=list(roi), spacing=list(spacing), intensity=intensity),
        model=MedsegModelConfig(in_channels=1, out_channels=2, labels={"0": "background", "1": "blob"}),
        infer=MedsegInferConfig(overlap=0.25, sw_batch_size=2, tta=tta),
    )


def _blobs(shape, affine, seed=0):
    """Smooth random field in world space: a few Gaussian blobs, values in about [0, 1]."""
    rng = np.random.default_rng(seed)
    d = len(shape)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    world = np.einsum("ij,j...->i...", affine[:d, :d], idx) + affine[:d, 3].reshape(d, *([1] * d))
    lo, hi = world.reshape(d, -1).min(1), world.reshape(d, -1).max(1)
    field = np.zeros(shape)
    for _ in range(4):
        c = rng.uniform(lo, hi)
        field += np.exp(-np.sum((world - c.reshape(d, *([1] * d))) ** 2, axis=0) / (2 * 4.0**2))
    return field.astype(np.float32)


GEOMETRIES = {
    "identity": geometry("identity", 3)[0],
    "aniso": geometry("aniso", 3)[0],
    "flip-xz": geometry("flip", 3)[0],
    "flip-y-permuted": np.array([[0, 0, 1.5, -3.0], [0, -0.8, 0, 20.0], [0.8, 0, 0, 5.0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", list(GEOMETRIES), ids=list(GEOMETRIES))
def test_mask_is_exact_in_input_geometry(tmp_path, name):
    """Without resampling the mask must equal the rule applied to the stored array, voxel for voxel."""
    affine = GEOMETRIES[name]
    shape = (23, 19, 21)
    image = _blobs(shape, affine)
    src = write_image(tmp_path / "case_7_0000.nii.gz", image, affine)
    result = predict_file(ThresholdNet(3, 0.5), [src], cfg=_cfg((16, 16, 16)), out_dir=tmp_path / "out")
    out = nib.load(str(result["mask"]))
    assert result["case"] == "case_7" and result["mask"].name == "case_7_seg.nii.gz"
    assert out.shape == shape and result["shape"] == list(shape)
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    np.testing.assert_allclose(out.get_sform(), affine, atol=1e-6)
    mask = np.asarray(out.dataobj)
    np.testing.assert_array_equal(mask, (image > 0.5).astype(np.uint8))


@pytest.mark.parametrize("name", ["aniso", "flip-xz"], ids=["aniso", "flip-xz"])
def test_resampled_prediction_is_mapped_back(tmp_path, name):
    """With data.spacing = 1 mm on 0.8 x 0.8 x 1.5 mm input, the mask still has the input's shape and
    affine, and agrees with the direct mask up to interpolation at object borders."""
    affine = GEOMETRIES[name]
    shape = (27, 25, 17)
    image = _blobs(shape, affine, seed=1)
    src = write_image(tmp_path / "x_0000.nii.gz", image, affine)
    result = predict_file(
        ThresholdNet(3, 0.5), [src], cfg=_cfg((16, 16, 16), spacing=(1.0, 1.0, 1.0)), out_dir=tmp_path, case="x"
    )
    out = nib.load(str(result["mask"]))
    assert out.shape == shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    mask, want = np.asarray(out.dataobj) > 0, image > 0.5
    dice = 2 * (mask & want).sum() / (mask.sum() + want.sum())
    assert want.sum() > 200 and dice > 0.9, dice


def test_two_d_with_singleton_axis_keeps_file_shape(tmp_path):
    affine = np.array([[-0.7, 0, 0, 4.0], [0, 0.9, 0, -2.0], [0, 0, 3.0, 1.0], [0, 0, 0, 1]])
    image = _blobs((33, 29), affine, seed=2)
    src = write_image(tmp_path / "s_0000.nii.gz", image[:, :, None], affine)
    result = predict_file(ThresholdNet(2, 0.5), [src], cfg=_cfg((16, 16), tta="flip"), out_dir=tmp_path / "o")
    out = nib.load(str(result["mask"]))
    assert out.shape == (33, 29, 1)
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.dataobj)[:, :, 0], (image > 0.5).astype(np.uint8))
    want_ml = float((image > 0.5).sum()) * 0.7 * 0.9 * 3.0 / 1000  # slice thickness is the third factor
    assert result["volumes_ml"]["blob"] == pytest.approx(want_ml)


def test_cube_volume_in_ml(tmp_path):
    affine = GEOMETRIES["flip-xz"]
    image = np.zeros((25, 23, 21), np.float32)
    image[4:14, 6:16, 3:13] = 1.0  # 1000 voxels of 0.8 x 0.8 x 1.5 mm = 0.96 mL
    src = write_image(tmp_path / "cube_0000.nii.gz", image, affine)
    result = predict_file(ThresholdNet(3, 0.5), [src], cfg=_cfg((16, 16, 16)), out_dir=tmp_path)
    assert result["volumes_ml"] == {"blob": pytest.approx(0.96)}
    sidecar = json.loads(result["volumes"].read_text())
    assert sidecar["volumes_ml"]["blob"] == pytest.approx(0.96) and sidecar["mask"] == "cube_seg.nii.gz"
    resampled = predict_file(
        ThresholdNet(3, 0.5), [src], cfg=_cfg((16, 16, 16), spacing=(1.0, 1.0, 1.0)), out_dir=tmp_path / "r"
    )
    assert resampled["volumes_ml"]["blob"] == pytest.approx(0.96, rel=0.15)


def test_predict_array_with_zscore_matches_rule_on_normalised_image(tmp_path):
    affine = GEOMETRIES["aniso"]
    image = _blobs((21, 23, 19), affine, seed=3)
    vol = read_image([write_image(tmp_path / "z_0000.nii.gz", image, affine)], case="z", spatial_dims=3)
    mask = predict_array(ThresholdNet(3, 1.0), vol, cfg=_cfg((16, 16, 16), intensity="zscore"))
    z = (image - image.mean()) / image.std()
    agree = np.mean(mask == (z > 1.0))
    assert mask.dtype == np.int64 and mask.shape == image.shape and agree > 0.999


def test_label_volumes_ml():
    mask = np.zeros((7, 9, 11), np.int64)
    mask[:2] = 1
    mask[5:, :3] = 2
    vols = label_volumes_ml(mask, (0.5, 2.0, 1.0), {0: "background", 1: "liver", 2: "tumor", 3: "cyst"})
    assert vols == {"liver": pytest.approx(2 * 9 * 11 / 1000), "tumor": pytest.approx(2 * 3 * 11 / 1000), "cyst": 0.0}
    with pytest.raises(ValueError, match="spacing"):
        label_volumes_ml(mask, (1.0, 1.0), {1: "liver"})
    with pytest.raises(ValueError, match="integer"):
        label_volumes_ml(mask.astype(float), (1.0, 1.0, 1.0), {1: "liver"})


def test_wrong_input_dimensionality_names_the_case(tmp_path):
    src = write_image(tmp_path / "flat_0000.nii.gz", np.zeros((11, 13), np.float32), np.eye(4))
    from mz_pipelines.runtime.errors import UserError

    with pytest.raises(UserError, match="flat"):
        predict_file(ThresholdNet(3, 0.5), [src], cfg=_cfg((16, 16, 16)), out_dir=tmp_path)


def test_case_name():
    assert case_name("dir/liver_12_0000.nii.gz") == "liver_12"
    assert case_name("scan.nii") == "scan"
