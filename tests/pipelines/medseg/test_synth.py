"""The synthetic task: folder layout, geometry, intensity independence and the threshold baseline."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("monai")
pytest.importorskip("nibabel")

from scipy import ndimage  # noqa: E402

from mz_pipelines.medseg.dataset_json import check_task, read_task  # noqa: E402
from mz_pipelines.medseg.nifti import read_image, read_label  # noqa: E402
from mz_pipelines.medseg.synth import geometry, threshold_baseline, write_task  # noqa: E402


@pytest.fixture(scope="module")
def default_task(tmp_path_factory):
    """Default-sized volumes and noise (few cases: the baseline only needs validation cases)."""
    return read_task(write_task(tmp_path_factory.mktemp("synth") / "t", n_train=1, n_val=4, n_test=1, seed=3))


def test_layout_and_dataset_json(tmp_path):
    path = write_task(tmp_path / "t", n_train=3, n_val=2, n_test=1, size=24, affine="aniso", seed=1)
    meta = json.loads(path.read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"0": "background", "1": "sphere"}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta["training"][0] == {"image": "./imagesTr/synth_000_0000.nii.gz", "label": "./labelsTr/synth_000.nii.gz"}
    assert len(meta["validation"]) == 2 and meta["test"] == ["./imagesTs/synth_005_0000.nii.gz"]
    assert (tmp_path / "t" / "labelsTs" / "synth_005.nii.gz").is_file()
    info = read_task(tmp_path / "t")
    check_task(info)
    assert info.spatial_dims == 3 and info.channel_names == ["MRI"]
    train = read_image(info.training[0].images, case="x", spatial_dims=3)
    val = read_image(info.validation[0].images, case="x", spatial_dims=3)
    assert train.array.shape == (1, 24, 24, 24) and val.array.shape == (1, 32, 32, 32)  # eval volumes are larger
    assert train.array.dtype == np.float32


@pytest.mark.parametrize("affine", ["identity", "aniso", "flip"])
def test_affine_is_written(tmp_path, affine):
    info = read_task(write_task(tmp_path / "t", n_train=1, n_val=1, n_test=0, size=(20, 17, 19), affine=affine))
    vol = read_image(info.training[0].images, case="x", spatial_dims=3)
    want, spacing = geometry(affine, 3)
    np.testing.assert_allclose(vol.affine, want, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, spacing, atol=1e-5)
    assert vol.array.shape == (1, 20, 17, 19)
    if affine == "flip":
        assert want[0, 0] < 0 and want[2, 2] < 0  # stored mirrored: Orientationd has work to do


@pytest.mark.parametrize("affine", ["aniso", "flip"])
def test_round_objects_are_round_in_mm(tmp_path, affine):
    """Drawn in world space: extents in mm agree across axes although the voxels are 0.8 x 0.8 x 1.5 mm."""
    info = read_task(write_task(tmp_path / "t", n_train=4, n_val=0, n_test=0, size=48, affine=affine, seed=2))
    ratios = []
    for case in info.training:
        lab = read_label(case.label, case=case.name, labels=[0, 1], spatial_dims=3)
        comps, n = ndimage.label(lab.array[0] == 1)
        for sl in ndimage.find_objects(comps):
            extent_mm = np.array([s.stop - s.start for s in sl]) * np.array(lab.spacing)
            ratios.append(extent_mm.max() / extent_mm.min())
    assert len(ratios) >= 3
    assert max(ratios) < 1.6  # ellipsoid axes differ by at most 1/0.75; voxel-space drawing would give ~1.9


def test_two_dimensional_task(tmp_path):
    info = read_task(write_task(tmp_path / "t", n_train=2, n_val=1, n_test=0, size=(40, 37), spatial_dims=2, classes=2))
    check_task(info)
    assert info.spatial_dims == 2 and info.labels == {0: "background", 1: "disc", 2: "square"}
    vol = read_image(info.training[0].images, case="x", spatial_dims=2)
    lab = read_label(info.training[0].label, case="x", labels=[0, 1, 2], spatial_dims=2)
    assert vol.array.shape == (1, 40, 37) and lab.array.shape == (1, 40, 37)
    assert set(np.unique(lab.array)) == {0, 1, 2}


def test_classes_share_one_intensity_distribution(tmp_path):
    info = read_task(write_task(tmp_path / "t", n_train=6, n_val=0, n_test=0, size=32, classes=2, noise=0.5, seed=4))
    means = {1: [], 2: []}
    for case in info.training:
        img = read_image(case.images, case=case.name, spatial_dims=3).array[0]
        lab = read_label(case.label, case=case.name, labels=[0, 1, 2], spatial_dims=3).array[0]
        for k in means:
            if (lab == k).any():
                means[k].append(float(img[lab == k].mean() - img[lab == 0].mean()))
    gap = abs(np.mean(means[1]) - np.mean(means[2]))
    assert gap < 0.2, f"class contrasts differ: {np.mean(means[1]):.3f} vs {np.mean(means[2]):.3f}"


def test_same_seed_same_data_other_seed_differs(tmp_path):
    def first_image(seed, name):
        info = read_task(write_task(tmp_path / name, n_train=1, n_val=0, n_test=0, size=17, seed=seed))
        return read_image(info.training[0].images, case="x").array

    a, b, c = first_image(5, "a"), first_image(5, "b"), first_image(6, "c")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_threshold_baseline_stays_low_on_defaults(default_task):
    result = threshold_baseline(default_task, "validation")
    assert result["n_cases"] == 4 and set(result["per_class"]) == {1}
    assert 0.02 < result["dice"] < 0.3, result


def test_threshold_baseline_finds_the_threshold_without_noise(tmp_path):
    """Noise-free, objects stand out of the background: only the thin unlabeled rods (and the bias field)
    keep one threshold from being perfect, so a working search must find a high Dice."""
    info = read_task(write_task(tmp_path / "t", n_train=1, n_val=2, n_test=0, size=24, classes=1, noise=0.0, seed=7))
    result = threshold_baseline(info, "validation")
    assert result["polarity"][1] == ">" and result["dice"] > 0.6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"affine": "oblique"}, "affine"),
        ({"classes": 4}, "classes"),
        ({"size": 8}, "size"),
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"noise": -1.0}, "noise"),
        ({"n_train": 0}, "n_train"),
    ],
    ids=["affine", "classes", "size", "spatial_dims", "noise", "n_train"],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_task(tmp_path / "t", **kwargs)
