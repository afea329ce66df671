"""MONAI bundle export: layout, metadata, weights round trip, and running the bundle on NIfTI files."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")
from monai.bundle import ConfigParser  # noqa: E402
from monai.bundle import run as run_bundle  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402

from mz_pipelines.medseg.bundle import export_bundle  # noqa: E402
from mz_pipelines.medseg.inference import argmax_mask, sliding_window_predict  # noqa: E402

LABELS = {"0": "background", "1": "liver", "2": "tumour"}


def _unet(spatial_dims: int, seed: int = 0) -> tuple[UNet, dict]:
    kwargs = dict(spatial_dims=spatial_dims, in_channels=1, out_channels=3, channels=[4, 8], strides=[2], num_res_units=1)
    torch.manual_seed(seed)
    net = UNet(**kwargs)
    with torch.no_grad():  # make the untrained net's classes all show up in the output
        for p in net.parameters():
            p.mul_(3.0)
    return net.eval(), kwargs


def _export(tmp_path, dims, **over):
    net, kwargs = _unet(dims)
    args = dict(
        network_target="monai.networks.nets.UNet", network_kwargs=kwargs, state_dict=net.state_dict(),
        spatial_dims=dims, in_channels=1, out_channels=3, labels=LABELS, roi=[16] * dims,
        spacing=None, intensity="none", overlap=0.5,
    )
    args.update(over)
    return net, export_bundle(tmp_path / "bundle", **args)


def _run(bundle, data_dir, out_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's trust-the-config and deprecation notices
        run_bundle(
            config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
            bundle_root=str(bundle), dataset_dir=str(data_dir), output_dir=str(out_dir),
        )
    return sorted(out_dir.iterdir())


def test_layout_metadata_and_weights_round_trip(tmp_path):
    net, bundle = _export(tmp_path, 3, spacing=[1.5, 1.5, 2.0], intensity="ct:-100,200", channel_names=["CT"])
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    import monai

    assert meta["monai_version"] == monai.__version__ and meta["version"]
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    inp, out = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert (inp["num_channels"], inp["spatial_shape"], inp["value_range"]) == (1, [16, 16, 16], [0.0, 1.0])
    assert inp["channel_def"] == {"0": "CT"}
    assert out["num_channels"] == 3 and out["channel_def"] == LABELS
    assert "liver" in meta["task"] and "tumour" in meta["task"]

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    names = [t["_target_"] for t in parser["preprocessing"]["transforms"]]
    assert names[:4] == ["LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd"]
    assert "ScaleIntensityRanged" in names
    assert parser["inferer"]["mode"] == "gaussian" and parser["inferer"]["roi_size"] == [16, 16, 16]
    post = [t["_target_"] for t in parser["postprocessing"]["transforms"]]
    assert post == ["Activationsd", "AsDiscreted", "Invertd", "SaveImaged"]

    rebuilt = parser.get_parsed_content("network_def")
    assert type(rebuilt) is UNet
    rebuilt.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    ref = net.state_dict()
    assert rebuilt.state_dict().keys() == ref.keys()
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_bundle_run_matches_sliding_window_predict(tmp_path):
    # Identity (RAS) affine, native spacing, no intensity change: the bundle must give exactly our own
    # sliding-window argmax, in the input's shape and affine.
    net, bundle = _export(tmp_path, 3)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(23, 19, 17)).astype(np.float32)
    data = tmp_path / "in"
    data.mkdir()
    nib.save(nib.Nifti1Image(image, np.eye(4)), data / "case_a.nii.gz")
    (mask_file,) = _run(bundle, data, tmp_path / "out")
    assert mask_file.name == "case_a_seg.nii.gz"
    saved = nib.load(mask_file)
    got = np.asarray(saved.dataobj)
    assert saved.shape == image.shape and got.dtype == np.uint8
    np.testing.assert_allclose(saved.affine, np.eye(4))
    probs = sliding_window_predict(net, torch.from_numpy(image)[None, None], roi=(16, 16, 16), overlap=0.5)
    want = argmax_mask(probs)[0].numpy()
    assert len(np.unique(want)) > 1  # a non-trivial mask
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spatial_dims", [2, 3], ids=["2d", "3d"])
def test_bundle_run_restores_flipped_anisotropic_geometry(tmp_path, spatial_dims):
    _, bundle = _export(tmp_path, spatial_dims, spacing=[1.5] * spatial_dims, intensity="zscore")
    affine = np.diag([-1.2, 0.9, 2.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    shape = (21, 18, 9) if spatial_dims == 3 else (21, 18, 1)  # 2D is stored with a singleton 3rd axis
    rng = np.random.default_rng(1)
    data = tmp_path / "in"
    data.mkdir()
    for name in ("b", "c"):
        nib.save(nib.Nifti1Image(rng.normal(size=shape).astype(np.float32) + 5, affine), data / f"{name}.nii.gz")
    outs = _run(bundle, data, tmp_path / "out")
    assert [p.name for p in outs] == ["b_seg.nii.gz", "c_seg.nii.gz"]
    for p in outs:
        img = nib.load(p)
        assert img.shape == shape[:spatial_dims]  # MONAI's writer drops a 2D file's trailing singleton axis
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2}


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(network_kwargs=dict(spatial_dims=3, in_channels=1, out_channels=3, channels=[4, 16], strides=[2])),
         "does not fit"),
        (dict(network_target="monai.networks.nets.NoSuchNet"), "importable"),
        (dict(labels={"0": "background", "1": "liver"}), "labels"),
        (dict(roi=[16, 16]), "roi"),
        (dict(intensity="minmax"), "intensity"),
        (dict(overlap=1.0), "overlap"),
        (dict(spatial_dims=1), "spatial_dims"),
        (dict(spacing=[1.0, 1.0]), "spacing"),
    ],
    ids=["wrong-kwargs", "bad-target", "labels-count", "roi-len", "intensity", "overlap", "dims", "spacing-len"],
)
def test_export_rejects_bad_input(tmp_path, over, match):
    with pytest.raises(ValueError, match=match):
        _export(tmp_path, 3, **over)
    assert not (tmp_path / "bundle").exists()  # nothing written


def test_bundle_run_multichannel_nnunet_naming(tmp_path):
    torch.manual_seed(2)
    kwargs = dict(spatial_dims=3, in_channels=2, out_channels=2, channels=[4, 8], strides=[2])
    bundle = export_bundle(
        tmp_path / "bundle", network_target="monai.networks.nets.UNet", network_kwargs=kwargs,
        state_dict=UNet(**kwargs).state_dict(), spatial_dims=3, in_channels=2, out_channels=2,
        labels={"0": "background", "1": "lesion"}, roi=[16, 16, 16], spacing=[2.0, 2.0, 2.0], intensity="zscore",
        channel_names=["T1", "T2"],
    )
    affine = np.diag([-1.0, 1.0, 1.5, 1.0])
    data = tmp_path / "in"
    data.mkdir()
    rng = np.random.default_rng(3)
    for c in range(2):  # one file per channel: <case>_0000, <case>_0001
        nib.save(nib.Nifti1Image(rng.normal(size=(20, 17, 11)).astype(np.float32), affine), data / f"k_{c:04d}.nii.gz")
    (out,) = _run(bundle, data, tmp_path / "out")
    img = nib.load(out)
    assert out.name == "k_0000_seg.nii.gz" and img.shape == (20, 17, 11)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
