"""Reading/validating tasks (one UserError naming the case per bad input), transforms and datasets."""
from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")

from mz_pipelines.medseg.data import PatchDataset, VolumeDataset  # noqa: E402
from mz_pipelines.medseg.dataset_json import check_task, read_task  # noqa: E402
from mz_pipelines.medseg.nifti import read_image, read_label, write_image, write_mask  # noqa: E402
from mz_pipelines.medseg.synth import write_task  # noqa: E402
from mz_pipelines.medseg.transforms import train_transforms  # noqa: E402
from mz_pipelines.runtime.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A small 3D task (aniso geometry, two classes); tests copy it before breaking it."""
    root = tmp_path_factory.mktemp("task") / "t"
    write_task(root, n_train=3, n_val=1, n_test=1, size=(27, 25, 23), eval_size=(29, 31, 27), classes=2, seed=11)
    return root


@pytest.fixture()
def task(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "t")


def _save(path, array, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([0.8, 0.8, 1.5, 1.0]) if affine is None else affine), str(path))


def _truncate(task):
    path = task / "imagesTr" / "synth_001_0000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(task):
    (task / "imagesTr" / "synth_001_0000.nii.gz").write_bytes(b"this is not a nifti file at all" * 20)


def _label_value(task, value):
    path = task / "labelsTr" / "synth_001.nii.gz"
    lab = nib.load(str(path))
    data = np.asarray(lab.dataobj).astype(np.float32)
    data[3, 4, 5] = value
    _save(path, data, lab.affine)


def _shape_mismatch(task):
    path = task / "labelsTr" / "synth_001.nii.gz"
    _save(path, np.zeros((27, 25, 22), np.uint8))


def _extra_channel(task):
    path = task / "imagesTr" / "synth_001_0000.nii.gz"
    img = np.asarray(nib.load(str(path)).dataobj)
    _save(path, np.stack([img, img], axis=-1).astype(np.float32))


def _missing_channel(task):
    meta = json.loads((task / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1", "1": "T2"}
    (task / "dataset.json").write_text(json.dumps(meta))


def _missing_label(task):
    (task / "labelsTr" / "synth_001.nii.gz").unlink()


BREAKS = {
    "truncated-gzip": (_truncate, "synth_001", "synth_001_0000.nii.gz"),
    "garbage-bytes": (_garbage, "synth_001", "synth_001_0000.nii.gz"),
    "label-value-7": (lambda t: _label_value(t, 7), "synth_001", "values [7]"),
    "label-float-0.5": (lambda t: _label_value(t, 0.5), "synth_001", "non-integer"),
    "shape-mismatch": (_shape_mismatch, "synth_001", "shape"),
    "extra-channel": (_extra_channel, "synth_001", "channel"),
    "missing-channel-file": (_missing_channel, "synth_000", "synth_000_0001.nii.gz"),
    "missing-label": (_missing_label, "synth_001", "synth_001.nii.gz"),
}


@pytest.mark.parametrize("name", list(BREAKS), ids=list(BREAKS))
def test_bad_inputs_raise_one_line_user_error(task, name):
    breaker, case, detail = BREAKS[name]
    breaker(task)
    with pytest.raises(UserError) as info:
        check_task(read_task(task), deep=True)
    msg = str(info.value)
    assert "\n" not in msg
    assert repr(case) in msg or case in msg, msg
    assert detail in msg, msg


def test_truncated_file_also_fails_in_dataset(task):
    _truncate(task)
    info = read_task(task)
    with pytest.raises(UserError, match="synth_001"):
        PatchDataset(info.training, spatial_dims=3, roi=(16, 16, 16), spacing=None, intensity="zscore", labels=[0, 1, 2])


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: "{not json", "invalid JSON"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "labels"}), "labels"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "channel_names"}), "channel_names"),
        (lambda m: json.dumps({**m, "training": {"a": 1}}), "'training' must be a list"),
        (lambda m: json.dumps({**m, "training": [{"label": "./labelsTr/x.nii.gz"}]}), "'image'"),
        (lambda m: json.dumps({**m, "labels": {"1": "tumor"}}), "background"),
    ],
    ids=["not-json", "no-labels", "no-channels", "training-not-list", "entry-without-image", "no-background"],
)
def test_malformed_dataset_json(task, edit, match):
    path = task / "dataset.json"
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(UserError, match=match):
        read_task(task)


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_task(tmp_path / "nope")
    with pytest.raises(UserError, match="no dataset.json"):
        read_task(tmp_path)


def test_holdout_without_validation_list(task):
    meta = json.loads((task / "dataset.json").read_text())
    extra = []
    for i in range(6):  # 3 + 6 = 9 training cases after moving the validation case in too
        name = f"extra_{i:02d}"
        shutil.copy(task / "imagesTr" / "synth_000_0000.nii.gz", task / "imagesTr" / f"{name}_0000.nii.gz")
        shutil.copy(task / "labelsTr" / "synth_000.nii.gz", task / "labelsTr" / f"{name}.nii.gz")
        extra.append({"image": f"./imagesTr/{name}_0000.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta["training"] += extra + meta.pop("validation")
    (task / "dataset.json").write_text(json.dumps(meta))
    a, b = read_task(task), read_task(task)
    assert len(a.validation) == 2 and len(a.training) == 8  # round(0.2 * 10)
    assert [c.name for c in a.validation] == [c.name for c in b.validation]
    assert not {c.name for c in a.validation} & {c.name for c in a.training}


def test_msd_style_with_4d_image(tmp_path):
    root = tmp_path / "msd"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        _save(root / "imagesTr" / f"brain_{i}.nii.gz", rng.normal(size=(13, 11, 9, 2)).astype(np.float32))
        _save(root / "labelsTr" / f"brain_{i}.nii.gz", (rng.random((13, 11, 9)) > 0.7).astype(np.uint8))
    meta = {
        "name": "msd",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema"},
        "training": [{"image": f"./imagesTr/brain_{i}.nii.gz", "label": f"./labelsTr/brain_{i}.nii.gz"} for i in range(2)],
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    info = read_task(root)
    check_task(info)
    assert info.channel_names == ["FLAIR", "T1w"] and info.spatial_dims == 3
    assert len(info.training) == 1 and len(info.validation) == 1  # 20% holdout of two cases
    vol = read_image(info.training[0].images, case="brain", spatial_dims=3, channels=2)
    assert vol.array.shape == (2, 13, 11, 9)
    with pytest.raises(UserError, match="expected 3 image channel"):
        read_image(info.training[0].images, case="brain", spatial_dims=3, channels=3)


def test_two_d_with_trailing_singleton_axis(tmp_path):
    path = tmp_path / "slice_0000.nii.gz"
    write_image(path, np.random.default_rng(1).normal(size=(19, 23, 1)), np.diag([0.7, 0.9, 3.0, 1.0]))
    vol = read_image([path], case="slice", spatial_dims=2)
    assert vol.array.shape == (1, 19, 23) and vol.file_shape == (19, 23, 1)
    assert vol.spacing == pytest.approx((0.7, 0.9))
    assert read_image([path], case="slice", spatial_dims=3).array.shape == (1, 19, 23, 1)


def test_write_mask_round_trip(tmp_path):
    affine = np.array([[-0.8, 0, 0, 10.0], [0, 0.8, 0, -3.0], [0, 0, 1.5, 7.0], [0, 0, 0, 1]])
    mask = np.zeros((9, 7, 5), np.int64)
    mask[2:5, 1:3, 1:4] = 2
    path = write_mask(tmp_path / "m.nii.gz", mask, affine)
    img = nib.load(str(path))
    np.testing.assert_allclose(img.get_sform(), affine)
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
    assert img.get_data_dtype() == np.uint8
    back = read_label(path, case="m", labels=[0, 1, 2])
    np.testing.assert_array_equal(back.array[0], mask)


def _patch_dataset(info, **kwargs):
    defaults = dict(spatial_dims=3, roi=(16, 16, 16), spacing=None, intensity="zscore", labels=list(info.labels))
    return PatchDataset(info.training, **{**defaults, **kwargs})


def test_patch_dataset_items_and_determinism(pristine):
    info = read_task(pristine)
    ds = _patch_dataset(info, patches_per_case=8, seed=3)
    assert len(ds) == 3 * 8
    item = ds[5]
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, 16, 16, 16) and item["label"].dtype == torch.int64
    again = _patch_dataset(info, patches_per_case=8, seed=3)
    for i in (5, 0, 17):  # order of access does not matter
        torch.testing.assert_close(again[i]["image"], ds[i]["image"])
    other_seed = _patch_dataset(info, patches_per_case=8, seed=4)
    assert not torch.equal(other_seed[5]["image"], item["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[5]["image"], item["image"])


def test_patch_sampling_includes_empty_and_positive_patches(pristine):
    info = read_task(pristine)
    mixed = _patch_dataset(info, patches_per_case=20, pos=1.0, neg=1.0, roi=(9, 9, 9))
    fg = [int((mixed[i]["label"] > 0).sum()) for i in range(len(mixed))]
    assert any(f == 0 for f in fg) and any(f > 0 for f in fg)
    only_pos = _patch_dataset(info, patches_per_case=6, pos=1.0, neg=0.0, roi=(9, 9, 9))
    assert all(int((only_pos[i]["label"] > 0).sum()) > 0 for i in range(len(only_pos)))


def test_volume_dataset_orients_to_ras(tmp_path):
    """A flipped affine (x and z negated) comes out mirrored back along those axes, exactly."""
    root = tmp_path / "flip"
    write_task(root, n_train=1, n_val=1, n_test=0, size=(21, 19, 17), eval_size=(21, 19, 17), affine="flip", seed=2)
    info = read_task(root)
    raw = read_image(info.validation[0].images, case="v", spatial_dims=3).array
    raw_label = read_label(info.validation[0].label, case="v", labels=[0, 1], spatial_dims=3).array
    item = VolumeDataset(info.validation, spatial_dims=3, spacing=None, intensity="none", labels=[0, 1])[0]
    np.testing.assert_allclose(item["image"].numpy(), raw[:, ::-1, :, ::-1], atol=1e-6)
    np.testing.assert_array_equal(item["label"].numpy(), raw_label[:, ::-1, :, ::-1])
    assert item["case"] == "synth_001" and item["spacing"] == pytest.approx((0.8, 0.8, 1.5))


@pytest.mark.parametrize("intensity", ["zscore", "ct:-0.5,1.5", "none"], ids=["zscore", "ct", "none"])
def test_volume_dataset_spacing_and_intensity(pristine, intensity):
    info = read_task(pristine)
    item = VolumeDataset(info.validation, spatial_dims=3, spacing=(1.0, 1.0, 1.0), intensity=intensity, labels=[0, 1, 2])[0]
    assert item["spacing"] == pytest.approx((1.0, 1.0, 1.0))
    # 29 x 31 x 27 voxels of 0.8 x 0.8 x 1.5 mm resampled to 1 mm
    assert item["image"].shape[1:] == item["label"].shape[1:]
    assert [abs(s - e) <= 1 for s, e in zip(item["image"].shape[1:], (23.2, 24.8, 40.5))] == [True] * 3
    img = item["image"]
    if intensity == "zscore":
        assert abs(float(img.mean())) < 1e-3 and abs(float(img.std()) - 1) < 1e-2
    elif intensity.startswith("ct"):
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert set(torch.unique(item["label"]).tolist()) <= {0, 1, 2}


def test_train_transforms_from_files(pristine):
    info = read_task(pristine)
    case = info.training[0]
    t = train_transforms(spatial_dims=3, roi=(16, 16, 16), spacing=(1.0, 1.0, 1.0), intensity="zscore", num_samples=2)
    patches = t({"image": str(case.images[0]), "label": str(case.label)})
    assert len(patches) == 2 and patches[0]["image"].shape == (1, 16, 16, 16)


def test_transform_arguments_are_validated():
    with pytest.raises(ValueError, match="intensity"):
        train_transforms(spatial_dims=3, roi=(16, 16, 16), spacing=None, intensity="minmax")
    with pytest.raises(ValueError, match="roi"):
        train_transforms(spatial_dims=3, roi=(16, 16), spacing=None, intensity="zscore")
    with pytest.raises(ValueError, match="spacing"):
        train_transforms(spatial_dims=2, roi=(16, 16), spacing=(1.0, 1.0, 1.0), intensity="zscore")


def test_gzip_of_written_files_is_valid(pristine):
    """Files written by synth are real gzip streams (the corrupt-file tests start from valid files)."""
    raw = gzip.decompress((pristine / "imagesTr" / "synth_000_0000.nii.gz").read_bytes())
    assert len(raw) > 27 * 25 * 23 * 4
