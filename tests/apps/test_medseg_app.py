"""The medseg app: display geometry and overlays on numpy arrays, NIfTI loading, checkpoint discovery,
segmentation with a real (untrained) network saved as a run checkpoint, and the gradio wiring (no server)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nibabel")

from mz_apps.medseg import handlers as H  # noqa: E402
from mz_pipelines.runtime.errors import UserError  # noqa: E402


def _affine(perm: tuple[int, int, int], flips: tuple[bool, bool, bool], spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel axis ``perm[w]`` runs along world axis ``w`` (backwards when ``flips[w]``) with ``spacing[w]`` mm."""
    a = np.eye(4)
    a[:3, :3] = 0.0
    for w in range(3):
        a[w, perm[w]] = (-1.0 if flips[w] else 1.0) * spacing[w]
    a[:3, 3] = (12.0, -7.0, 3.5)
    return a


def _store(ras: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    """The voxel array a file with ``_affine(perm, flips, .)`` holds for the RAS-ordered anatomy ``ras``."""
    flipped = np.flip(ras, axis=tuple(w for w in range(3) if flips[w])) if any(flips) else ras
    inverse = np.argsort(perm)  # voxel axis v holds world axis inverse[v]
    return np.ascontiguousarray(np.transpose(flipped, inverse))


def _ras_by_world_coordinates(stored: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reference reordering: place each voxel by the rank of its world coordinates (axis-aligned affines)."""
    idx = np.indices(stored.shape).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    out_shape = []
    ranks = []
    for w in range(3):
        values = np.unique(np.round(world[w], 6))
        ranks.append(np.searchsorted(values, np.round(world[w], 6)))
        out_shape.append(values.size)
    out = np.empty(out_shape, dtype=stored.dtype)
    out[ranks[0], ranks[1], ranks[2]] = stored.reshape(-1)
    return out


ORIENTATIONS = [
    pytest.param((0, 1, 2), (False, False, False), id="RAS"),
    pytest.param((0, 1, 2), (True, True, False), id="LPS"),
    pytest.param((2, 0, 1), (False, True, False), id="permuted-P"),
    pytest.param((1, 2, 0), (True, False, True), id="permuted-LI"),
]


@pytest.mark.parametrize("perm,flips", ORIENTATIONS)
def test_ras_axes_reads_permutation_and_flips(perm, flips):
    got_perm, got_flips = H.ras_axes(_affine(perm, flips, (0.7, 1.3, 2.9)))
    assert got_perm == perm and got_flips == flips


def test_ras_axes_oblique_goes_to_closest_axis():
    t = np.deg2rad(20.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([1.0, 1.0, 2.0])
    a[:3, :3] = a[:3, [1, 0, 2]] * np.array([1.0, -1.0, 1.0])  # voxel 0 ~ A, voxel 1 ~ -R
    assert H.ras_axes(a) == ((1, 0, 2), (True, False, False))


@pytest.mark.parametrize(
    "affine,match",
    [
        pytest.param(np.eye(3), r"\[4, 4\]", id="3x3"),
        pytest.param(np.diag([1.0, 0.0, 1.0, 1.0]), "zero voxel axis", id="zero-column"),
        pytest.param(np.full((4, 4), np.nan), "finite", id="nan"),
    ],
)
def test_ras_axes_rejects_bad_affine(affine, match):
    with pytest.raises(ValueError, match=match):
        H.ras_axes(affine)


@pytest.mark.parametrize("perm,flips", ORIENTATIONS)
def test_to_ras_matches_world_coordinate_reference(perm, flips):
    rng = np.random.default_rng(3)
    stored = rng.normal(size=(5, 7, 3)).astype(np.float32)
    affine = _affine(perm, flips, (1.0, 1.5, 2.5))
    np.testing.assert_array_equal(H.to_ras(stored, affine), _ras_by_world_coordinates(stored, affine))
    # leading (channel) axes are carried along
    both = H.to_ras(np.stack([stored, -stored]), affine)
    np.testing.assert_array_equal(both[1], -both[0])


def test_display_slice_orientation_anterior_up_right_on_left():
    ras = np.zeros((5, 7, 3), dtype=np.int64)  # X (L->R), Y (P->A), Z (I->S)
    ras[4, 6, 2] = 1  # the most right, anterior, superior voxel
    axial = H.display_slice(ras, "axial", 2)
    coronal = H.display_slice(ras, "coronal", 6)
    sagittal = H.display_slice(ras, "sagittal", 4)
    assert axial.shape == (7, 5) and coronal.shape == (3, 5) and sagittal.shape == (3, 7)
    for view in (axial, coronal, sagittal):
        assert view[0, 0] == 1 and view.sum() == 1  # top-left: anterior/superior up, right (or anterior) on the left


@pytest.mark.parametrize(
    "axis,index,match",
    [
        pytest.param("axial", 3, r"axial slice index must be in \[0, 2\], got 3", id="past-end"),
        pytest.param("coronal", -1, r"coronal slice index must be in \[0, 6\]", id="negative"),
        pytest.param("transverse", 0, "axis must be one of", id="unknown-axis"),
    ],
)
def test_display_slice_rejects_bad_index_or_axis(axis, index, match):
    with pytest.raises(ValueError, match=match):
        H.display_slice(np.zeros((5, 7, 3)), axis, index)


def test_percentile_window_and_apply_window():
    values = np.arange(101, dtype=np.float64)
    values[7] = np.nan
    lo, hi = H.percentile_window(values)
    finite = values[np.isfinite(values)]
    assert (lo, hi) == pytest.approx((np.percentile(finite, 1), np.percentile(finite, 99)))
    out = H.apply_window(np.array([lo - 5, lo, lo + 0.2 * (hi - lo), hi, hi + 5, np.nan]), lo, hi)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 51, 255, 255, 0]
    assert H.percentile_window(np.full((3, 4), 2.5)) == (2.5, 3.5)
    with pytest.raises(ValueError, match="low < high"):
        H.percentile_window(values, 99, 1)
    with pytest.raises(ValueError, match="hi > lo"):
        H.apply_window(values, 1.0, 1.0)


def test_square_pixels_keeps_proportions_and_labels():
    img = np.arange(5 * 7).reshape(5, 7)
    tall = H.square_pixels(img, 2.0, 1.0, min_size=1)  # rows are 2 mm: each row shows twice
    assert tall.shape == (10, 7)
    np.testing.assert_array_equal(tall[::2], img)
    np.testing.assert_array_equal(tall[1::2], img)
    zoomed = H.square_pixels(img, 1.0, 1.0, min_size=20)  # integer zoom 4 (ceil(20 / 5))
    assert zoomed.shape == (20, 28)
    np.testing.assert_array_equal(zoomed[::4, ::4], img)
    rgb = H.square_pixels(np.zeros((3, 4, 3), np.uint8), 1.0, 3.0, min_size=1)
    assert rgb.shape == (3, 12, 3)
    with pytest.raises(ValueError, match="spacing must be > 0"):
        H.square_pixels(img, 0.0, 1.0)


def test_overlay_colours_only_labelled_pixels():
    grey = np.array([[10, 200, 30], [40, 50, 60]], dtype=np.uint8)
    mask = np.array([[0, 1, 2], [0, 0, 1]], dtype=np.int16)
    colors = {1: (255, 0, 0), 2: (0, 0, 255)}
    solid = H.overlay(grey, mask, colors, alpha=1.0)
    assert solid.shape == (2, 3, 3) and solid.dtype == np.uint8
    assert solid[0, 1].tolist() == [255, 0, 0] and solid[0, 2].tolist() == [0, 0, 255]
    assert solid[1, 0].tolist() == [40, 40, 40]  # background untouched
    half = H.overlay(grey, mask, colors, alpha=0.5)
    assert half[1, 2].tolist() == [158, 30, 30]  # 0.5 * 60 + 0.5 * (255, 0, 0), rounded
    np.testing.assert_array_equal(H.overlay(grey, None, colors), np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize(
    "image,mask,colors,match",
    [
        pytest.param(np.zeros((2, 3), np.uint8), np.array([[0, 3, 0], [0, 0, 0]]), {1: (1, 2, 3)}, r"label\(s\) \[3\]", id="no-colour"),
        pytest.param(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.int64), {}, "mask2d must have the image's shape", id="shape"),
        pytest.param(np.zeros((2, 3), np.uint8), np.zeros((2, 3), np.float32), {}, "integer labels", id="float-mask"),
        pytest.param(np.zeros((2, 3), np.float32), None, {}, "image2d must be uint8", id="float-image"),
    ],
)
def test_overlay_rejects_bad_input(image, mask, colors, match):
    with pytest.raises(ValueError, match=match):
        H.overlay(image, mask, colors)


@pytest.mark.parametrize(
    "path,name",
    [
        pytest.param("/x/liver_007_0000.nii.gz", "liver_007", id="nnunet-channel"),
        pytest.param("brain.nii", "brain", id="plain-nii"),
        pytest.param("case_12.nii.gz", "case_12", id="short-suffix-kept"),
    ],
)
def test_case_name(path, name):
    assert H.case_name(path) == name


def test_find_checkpoints_prefers_best_and_sorts_newest_first(tmp_path):
    runs = tmp_path / "runs" / "medseg"
    for run, files, mtime in (("a", ("best.pt", "checkpoint.pt"), 1_000), ("b", ("checkpoint.pt",), 2_000), ("c", (), 3_000)):
        (runs / run).mkdir(parents=True)
        for f in files:
            (runs / run / f).write_bytes(b"x")
            os.utime(runs / run / f, (mtime, mtime))
    (tmp_path / "runs" / "toy" / "z").mkdir(parents=True)
    (tmp_path / "runs" / "toy" / "z" / "best.pt").write_bytes(b"x")  # another domain: not listed
    assert H.find_checkpoints(tmp_path / "runs") == [str(runs / "b" / "checkpoint.pt"), str(runs / "a" / "best.pt")]
    assert H.find_checkpoints(tmp_path / "nowhere") == []


# ---------------------------------------------------------------- NIfTI files


def _anatomy(shape=(9, 11, 5), seed=0) -> np.ndarray:
    """A RAS-ordered volume with a bright block near the right-anterior-superior corner."""
    rng = np.random.default_rng(seed)
    ras = rng.normal(0.0, 1.0, size=shape).astype(np.float32)
    ras[-3:, -4:, -2:] += 20.0
    return ras


@pytest.mark.parametrize("perm,flips", ORIENTATIONS[1:])
def test_loaded_views_do_not_depend_on_the_file_voxel_order(tmp_path, perm, flips):
    from mz_pipelines.medseg.nifti import write_image

    ras = _anatomy()
    spacing = (0.8, 1.1, 2.5)
    ref = H.load_volume(write_image(tmp_path / "ref_0000.nii.gz", ras, _affine((0, 1, 2), (False,) * 3, spacing)))
    other = H.load_volume([write_image(tmp_path / "other.nii.gz", _store(ras, perm, flips), _affine(perm, flips, spacing))])
    assert ref.name == "ref" and other.name == "other"
    assert other.ras_spacing == pytest.approx(spacing)
    for axis in H.AXES:
        n = ref.n_slices(axis)
        assert n == other.n_slices(axis) == ras.shape[H._AXIS_DIM[axis]]
        for index in (0, n // 2, n - 1):
            np.testing.assert_array_equal(H.slice_views(ref, axis, index), H.slice_views(other, axis, index))
    top_axial = H.slice_views(other, "axial", ras.shape[2] - 1)
    assert top_axial.shape[2] == 3 and top_axial[0, 0, 0] == 255  # the bright block shows top-left


def test_loaded_view_has_true_proportions(tmp_path):
    from mz_pipelines.medseg.nifti import write_image

    path = write_image(tmp_path / "aniso.nii.gz", _anatomy((9, 11, 5)), _affine((0, 1, 2), (False,) * 3, (1.0, 1.0, 3.0)))
    state = H.load_volume(path)
    assert state.mask is None and state.channels == 1
    coronal = H.slice_views(state, "coronal", 4)  # rows: 5 slices x 3 mm, columns: 9 x 1 mm
    assert coronal.shape[0] * 9 == coronal.shape[1] * 15


def test_load_volume_reports_a_corrupt_file(tmp_path):
    from mz_pipelines.medseg.nifti import write_image

    good = write_image(tmp_path / "good.nii.gz", _anatomy(), np.eye(4))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(good.read_bytes())[:400]))
    with pytest.raises(UserError, match="'bad'"):
        H.load_volume(bad)
    with pytest.raises(UserError, match="no image file"):
        H.load_volume([])


# ---------------------------------------------------------------- segmentation with a run checkpoint

LABELS = {"0": "background", "1": "sphere"}


def _write_run(runs_root: Path, name: str = "tiny", *, in_channels: int = 1, spatial_dims: int = 3) -> Path:
    """A run folder holding ``best.pt`` of an untrained tiny MONAI UNet, in the runtime checkpoint format."""
    import torch

    from mz_pipelines.medseg.config import MedsegConfig, MedsegDataConfig, MedsegModelConfig
    from mz_pipelines.medseg.models.registry import build_model
    from mz_pipelines.runtime.checkpoint import save_checkpoint
    from mz_pipelines.runtime.config import config_to_dict

    cfg = MedsegConfig(
        data=MedsegDataConfig(roi=[16] * spatial_dims),
        model=MedsegModelConfig(name="unet", preset="tiny", in_channels=in_channels, out_channels=2, labels=dict(LABELS)),
    )
    torch.manual_seed(0)
    model = build_model("unet", spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2, preset="tiny")
    run = runs_root / "medseg" / name
    save_checkpoint({"kind": "best", "model": model.state_dict(), "config": config_to_dict(cfg)}, run / "best.pt")
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _write_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def flipped_case(tmp_path_factory) -> Path:
    """An odd-sized image (not a multiple of the network stride) stored permuted and flipped."""
    from mz_pipelines.medseg.nifti import write_image

    perm, flips = (1, 2, 0), (True, False, True)
    ras = _anatomy((19, 13, 11), seed=4)
    return write_image(tmp_path_factory.mktemp("img") / "odd_0000.nii.gz", _store(ras, perm, flips), _affine(perm, flips, (0.9, 1.2, 2.0)))


@pytest.mark.parametrize("which", ["run-folder", "best.pt"])
def test_segment_and_save_mask_keep_the_input_geometry(run_dir, flipped_case, tmp_path, which):
    import nibabel as nib

    state = H.load_volume(flipped_case)
    checkpoint = run_dir if which == "run-folder" else run_dir / "best.pt"
    done = H.segment(state, checkpoint)
    assert state.mask is None  # the input state is left alone
    stored_shape = nib.load(str(flipped_case)).shape
    assert done.mask is not None and done.mask.shape == stored_shape
    assert set(np.unique(done.mask).tolist()) <= {0, 1}
    assert done.labels == {1: "sphere"}
    voxel_ml = float(np.prod(state.volume.spacing)) / 1000.0
    assert set(done.volumes_ml) == {"sphere"}
    assert done.volumes_ml["sphere"] == pytest.approx(int((done.mask == 1).sum()) * voxel_ml, rel=1e-6)
    np.testing.assert_array_equal(done.ras_mask, H.to_ras(done.mask, state.volume.affine))
    rows = H.volume_rows(done)
    assert [r[:3] for r in rows] == [[1, "sphere", H.color_hex(H.PALETTE[0])]] and rows[0][3] == int((done.mask == 1).sum())

    out = H.save_mask(done, tmp_path)
    assert out.name == "odd_seg.nii.gz"
    saved = nib.load(str(out))
    assert saved.shape == stored_shape
    np.testing.assert_allclose(saved.affine, state.volume.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), done.mask)


def test_segmented_views_colour_exactly_the_mask(run_dir, flipped_case):
    done = H.segment(H.load_volume(flipped_case), run_dir)
    colour = np.array(H.PALETTE[0], dtype=np.float64)
    for axis in H.AXES:
        index = done.n_slices(axis) // 2
        with_mask = H.slice_views(done, axis, index, alpha=1.0)
        mask = H.square_pixels(H.display_slice(done.ras_mask, axis, index), *H.display_spacing(done.ras_spacing, axis))
        coloured = np.all(with_mask == colour, axis=2)
        grey = (with_mask[..., 0] == with_mask[..., 1]) & (with_mask[..., 1] == with_mask[..., 2])
        assert np.all(coloured[mask == 1]) and np.all(grey[mask == 0])


def test_segment_2d_model_on_a_file_with_a_singleton_slice_axis(tmp_path):
    import nibabel as nib

    from mz_pipelines.medseg.nifti import write_image

    run = _write_run(tmp_path / "runs", "flat", spatial_dims=2)
    affine = np.diag([0.5, 0.7, 3.0, 1.0])
    path = write_image(tmp_path / "slice_0000.nii.gz", _anatomy((21, 17, 1), seed=2), affine)
    state = H.load_volume(path)
    assert [state.n_slices(a) for a in H.AXES] == [1, 17, 21]
    done = H.segment(state, run)
    assert done.mask.shape == (21, 17, 1)
    assert done.volumes_ml["sphere"] == pytest.approx(int((done.mask == 1).sum()) * 0.5 * 0.7 * 3.0 / 1000.0)
    assert H.slice_views(done, "axial", 0).shape[2] == 3
    saved = nib.load(str(H.save_mask(done, tmp_path / "out")))
    assert saved.shape == (21, 17, 1)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), done.mask)
    with pytest.raises(UserError, match="the model is 3D"):
        H.segment(H.load_volume(write_image(tmp_path / "flat.nii.gz", np.zeros((9, 8), np.float32), affine)), _write_run(tmp_path / "r3"))


def test_segment_rejects_what_the_model_cannot_take(run_dir, flipped_case, tmp_path):
    from mz_pipelines.medseg.nifti import write_image

    state = H.load_volume(flipped_case)
    with pytest.raises(UserError, match="nothing to save yet"):
        H.save_mask(state, tmp_path)
    with pytest.raises(UserError, match="no checkpoint chosen"):
        H.segment(state, "  ")
    with pytest.raises(UserError, match="not found"):
        H.segment(state, tmp_path / "missing" / "best.pt")
    a = write_image(tmp_path / "two_0000.nii.gz", _anatomy((9, 11, 5)), np.eye(4))
    b = write_image(tmp_path / "two_0001.nii.gz", _anatomy((9, 11, 5), seed=1), np.eye(4))
    two = H.load_volume([a, b])
    assert two.name == "two" and two.channels == 2
    with pytest.raises(UserError, match=r"takes 1 channel\(s\), the image has 2"):
        H.segment(two, run_dir)


def test_example_image_is_generated_once_and_loads(tmp_path):
    first = H.example_image(tmp_path, size=16)
    mtime = first[0].stat().st_mtime_ns
    again = H.example_image(tmp_path, size=16)
    assert again == first and again[0].stat().st_mtime_ns == mtime
    state = H.load_volume(first)
    assert state.volume.array.shape == (1, 16, 16, 16)


# ---------------------------------------------------------------- the gradio app (no server)

gr = pytest.importorskip("gradio")
from mz_apps.medseg import app as A  # noqa: E402


def test_build_app_lists_found_runs(run_dir):
    demo = A.build_app(runs_root=str(run_dir.parent.parent))
    assert isinstance(demo, gr.Blocks)
    dropdowns = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown)]
    assert len(dropdowns) == 1
    assert [c[1] for c in dropdowns[0].choices] == [str(run_dir / "best.pt")]
    assert dropdowns[0].value == str(run_dir / "best.pt")
    assert isinstance(A.build_app(runs_root=str(run_dir / "nowhere")), gr.Blocks)


def test_callbacks_load_segment_and_report_user_errors(run_dir, flipped_case, tmp_path):
    loaded = A.on_upload([str(flipped_case)])
    state, views, sliders, table, download = loaded[0], loaded[1:4], loaded[4:7], loaded[8], loaded[9]
    assert state.mask is None and download is None and table.empty and list(table.columns) == H.VOLUME_HEADERS
    for axis, view, slider in zip(H.AXES, views, sliders):
        assert view.dtype == np.uint8 and view.ndim == 3
        assert slider.maximum == state.n_slices(axis) - 1 and slider.value == state.n_slices(axis) // 2
    assert A.on_slice(None, "axial", 0, 0) is None
    np.testing.assert_array_equal(A.on_slice(state, "axial", 99, 0), H.slice_views(state, "axial", state.n_slices("axial") - 1))

    out = A.on_segment(state, str(run_dir / "best.pt"), "", 3, 4, 5, 0, out_root=str(tmp_path))
    done, table, mask_path = out[0], out[4], Path(out[5])
    assert done.mask is not None and table["name"].tolist() == ["sphere"]
    assert mask_path.is_file() and mask_path.parent.parent == tmp_path
    typed = A.on_segment(state, "ignored-when-a-path-is-typed", f" {run_dir} ", 3, 4, 5, 0, out_root=str(tmp_path))
    np.testing.assert_array_equal(typed[0].mask, done.mask)

    with pytest.raises(gr.Error, match="load an image first"):
        A.on_segment(None, str(run_dir), "", 0, 0, 0, 0)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file")
    with pytest.raises(gr.Error, match="bad"):
        A.on_upload([str(bad)])


def test_on_example_generates_and_shows_a_case(tmp_path):
    out = A.on_example(str(tmp_path))
    state = out[0]
    assert state.volume.array.shape == (1, H.EXAMPLE_SIZE, H.EXAMPLE_SIZE, H.EXAMPLE_SIZE) and state.mask is None
    assert state.name in out[-1] and (tmp_path / f"example_{H.EXAMPLE_SIZE}_0" / "dataset.json").is_file()


def test_parse_args_defaults_and_port_check():
    args = A.parse_args([])
    assert (args.host, args.port, args.share, args.runs_root) == ("127.0.0.1", 7860, False, "runs")
    assert A.parse_args(["--share", "--port", "8001"]).share is True
    with pytest.raises(SystemExit):
        A.parse_args(["--port", "70000"])
