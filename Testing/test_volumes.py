"""Tests for MedSAMSlicerLib.fileio.volumes: orientation, reading, boxes and writers, on real files."""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.fileio import volumes
from MedSAMSlicerLib.fileio.segnrrd import write_seg_nrrd
from MedSAMSlicerLib.fileio.volumes import (
    AxialOrientation,
    Volume,
    ijk_box_to_canonical,
    ras_box_to_canonical,
    read_volume,
    write_labelmap,
)

LIVER = 5
SPLEEN = 1
STOMACH = 6
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _bbox(mask_zyx: np.ndarray) -> Tuple[int, int, int, int, int, int]:
    z, y, x = np.nonzero(mask_zyx)
    return (int(x.min()), int(y.min()), int(z.min()), int(x.max()), int(y.max()), int(z.max()))


def _ijk_bbox(mask_kji: np.ndarray) -> Tuple[int, int, int, int, int, int]:
    k, j, i = np.nonzero(mask_kji)
    return (int(i.min()), int(j.min()), int(k.min()), int(i.max()), int(j.max()), int(k.max()))


def _rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def _voxel_ras(image: sitk.Image, mask_kji: np.ndarray) -> np.ndarray:
    """RAS centres (N, 3) of the voxels of a (k, j, i) mask on ``image``'s grid."""
    k, j, i = np.nonzero(mask_kji)
    ijk = np.stack([i, j, k], axis=1).astype(float)
    d = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps = ijk @ d.T + np.asarray(image.GetOrigin())
    return lps * LPS_TO_RAS


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def _listing(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def ct_labels(ct_seg_path) -> Volume:
    return read_volume(ct_seg_path)


# ----------------------------------------------------------------------------------------------
# AxialOrientation, without files
# ----------------------------------------------------------------------------------------------


def _signed_permutations():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            d = np.zeros((3, 3))
            for a in range(3):  # index axis a points along LPS axis perm[a] with sign signs[a]
                d[perm[a], a] = signs[a]
            yield perm, signs, d


@pytest.mark.parametrize("perm,signs,direction", list(_signed_permutations()))
def test_orientation_all_signed_permutations(perm, signs, direction):
    shape_ijk = (4, 5, 6)
    o = AxialOrientation.from_lps_direction(direction, shape_ijk)
    for a in range(3):
        c = perm[a]
        assert o.axes[c] == a
        assert o.flips[c] == (signs[a] < 0)
    assert o.obliqueness_degrees == pytest.approx(0.0, abs=1e-9)
    assert o.canonical_shape == tuple(shape_ijk[o.axes[c]] for c in (2, 1, 0))

    rng = np.random.default_rng(0)
    a_kji = rng.integers(0, 1000, size=o.shape_kji).astype(np.int16)
    zyx = o.to_canonical(a_kji)
    assert zyx.shape == o.canonical_shape
    assert zyx.flags.c_contiguous and zyx.dtype == np.int16
    back = o.from_canonical(zyx)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, a_kji)
    # Every canonical voxel is the file voxel the index mapping names, and canonical x/y/z steps
    # move toward L/P/S.
    for xyz in [(0, 0, 0), (1, 2, 3), (o.canonical_shape[2] - 1, 0, o.canonical_shape[0] - 1)]:
        i, j, k = o.canonical_to_ijk(xyz)
        assert zyx[xyz[2], xyz[1], xyz[0]] == a_kji[k, j, i]
        assert o.ijk_to_canonical((i, j, k)) == xyz
    for c in range(3):
        step = np.zeros(3, dtype=int)
        step[c] = 1
        ijk0 = np.array(o.canonical_to_ijk((1, 1, 1)))
        ijk1 = np.array(o.canonical_to_ijk(tuple(np.array((1, 1, 1)) + step)))
        lps_step = direction @ (ijk1 - ijk0)
        np.testing.assert_allclose(lps_step, step)
    # RAS input gives the same orientation.
    assert AxialOrientation.from_ras_direction(LPS_TO_RAS[:, None] * direction, shape_ijk) == o
    # Continuous mapping agrees with the integer one.
    pts = np.array([[0, 0, 0], [3, 4, 5], [1.5, 2.25, 0.5]])
    np.testing.assert_allclose(o.canonical_points_to_ijk(o.ijk_points_to_canonical(pts)), pts)
    assert o.canonical_spacing((1.0, 2.0, 3.0)) == tuple((1.0, 2.0, 3.0)[o.axes[c]] for c in range(3))


def test_orientation_oblique_choice_and_angle():
    shape = (10, 20, 30)
    o = AxialOrientation.from_lps_direction(_rotation((0, 0, 1), 40), shape)
    assert o.axes == (0, 1, 2) and o.flips == (False, False, False)
    assert o.obliqueness_degrees == pytest.approx(40.0)
    o = AxialOrientation.from_lps_direction(_rotation((0, 0, 1), 50), shape)
    # i = (cos 50, sin 50, 0) is closer to P, j = (-sin 50, cos 50, 0) to -L: x from -j, y from i.
    assert o.axes == (1, 0, 2)
    assert o.flips == (True, False, False)
    assert o.obliqueness_degrees == pytest.approx(40.0)
    # An exact 45-degree tie keeps the unpermuted order.
    o = AxialOrientation.from_lps_direction(_rotation((0, 0, 1), 45), shape)
    assert o.axes == (0, 1, 2)
    # Spacing inside the columns (Slicer's IJKToRAS) is normalised away.
    scaled = np.diag([-1.0, -1.0, 1.0]) @ np.diag([0.5, 0.5, 2.5])
    o = AxialOrientation.from_ras_direction(scaled, shape)
    assert o.axes == (0, 1, 2) and o.flips == (False, False, False)
    assert "x <- i" in o.describe()


def test_orientation_rejects_bad_input():
    with pytest.raises(MedSAMError, match="3x3"):
        AxialOrientation.from_lps_direction([1, 0, 0, 1], (2, 2, 2))
    with pytest.raises(MedSAMError, match="zero"):
        AxialOrientation.from_lps_direction(np.zeros((3, 3)), (2, 2, 2))
    with pytest.raises(MedSAMError, match="singular"):
        AxialOrientation.from_lps_direction([[1, 1, 0], [0, 0, 0.0], [0, 0, 1]], (2, 2, 2))
    with pytest.raises(MedSAMError, match="positive"):
        AxialOrientation.from_lps_direction(np.eye(3), (2, 0, 2))
    o = AxialOrientation.from_lps_direction(np.eye(3), (2, 3, 4))
    with pytest.raises(MedSAMError, match=r"\(k, j, i\)"):
        o.to_canonical(np.zeros((2, 3, 4)))
    with pytest.raises(MedSAMError, match=r"\(z, y, x\)"):
        o.from_canonical(np.zeros((2, 3, 4)))


def test_engine_messages_name_slices_as_the_file_does():
    """Stop reasons carry canonical slices (z up); the user sees the file's index (here k runs
    inferior, so canonical z is k = 9 - z). Areas, grey levels and counts are not slices."""
    o = AxialOrientation.from_lps_direction(np.diag([1.0, 1.0, -1.0]), (4, 5, 10))
    assert o.slice_to_index(2) == ("k", 7)
    assert o.name_slices("stopped at slice 2: area 293 px < 0.15 of the largest slice (2099 px)") == \
        "stopped at slice k 7: area 293 px < 0.15 of the largest slice (2099 px)"
    assert o.name_slices("slices 3..4 from the pass from 2, slices 5..6 from the pass from 7, where the decoder "
                         "is most confident in total; 1 kept as they were") == \
        ("slices k 5..6 from the pass from k 7, slices k 3..4 from the pass from k 2, where the decoder "
         "is most confident in total; 1 kept as they were")
    assert o.name_slices("between 2..7") == "between k 2..7"
    assert o.name_slices("intensity changed by 30 grey levels > 25 (8 slices)") == \
        "intensity changed by 30 grey levels > 25 (8 slices)"
    assert AxialOrientation.from_lps_direction(np.eye(3), (4, 5, 10)).name_slices("rejoined the earlier result at "
                                                                                  "slice 3") == \
        "rejoined the earlier result at slice k 3"


# ----------------------------------------------------------------------------------------------
# Reading the vendored CT, and variants of it on disk
# ----------------------------------------------------------------------------------------------


def test_ct_canonical_orientation(ct, ct_path):
    image = sitk.ReadImage(str(ct_path))
    raw = sitk.GetArrayFromImage(image)  # (k, j, i); direction diag(-1, -1, 1): i -> Right, j -> Anterior
    o = ct.orientation
    assert o.axes == (0, 1, 2)
    assert o.flips == (True, True, False)
    assert o.obliqueness_degrees == 0.0
    assert ct.shape == (112, 101, 122) == ct.array.shape
    assert ct.spacing == (3.0, 3.0, 3.0)
    assert ct.array.dtype == raw.dtype
    np.testing.assert_array_equal(ct.array, raw[:, ::-1, ::-1])
    assert ct.path == ct_path
    # Direct reasoning: canonical steps move 3 mm toward Left, Posterior, Superior.
    base = np.array(image.TransformIndexToPhysicalPoint(o.canonical_to_ijk((5, 6, 7))))
    for c in range(3):
        xyz = [5, 6, 7]
        xyz[c] += 1
        step = np.array(image.TransformIndexToPhysicalPoint(o.canonical_to_ijk(tuple(xyz)))) - base
        expected = np.zeros(3)
        expected[c] = 3.0
        np.testing.assert_allclose(step, expected, atol=1e-6)
    # Canonical (0, 0, 0) is the right-anterior-inferior corner.
    ras0 = ct.canonical_to_ras([0, 0, 0])
    ras1 = ct.canonical_to_ras([121, 100, 111])
    assert ras0[0] > ras1[0] and ras0[1] > ras1[1] and ras0[2] < ras1[2]
    np.testing.assert_allclose(ct.ras_to_canonical(ras1), [121, 100, 111], atol=1e-6)


VARIANTS = {
    # name: (builder of an image with the same physical voxels, or an oblique one, file extension)
    "original": (lambda im: im, ".nii.gz"),
    "flip_i": (lambda im: sitk.Flip(im, [True, False, False]), ".nii.gz"),
    "flip_k": (lambda im: sitk.Flip(im, [False, False, True]), ".nrrd"),
    "lps_identity": (lambda im: sitk.Flip(im, [True, True, False]), ".nii.gz"),
    "flip_all": (lambda im: sitk.Flip(im, [True, True, True]), ".mha"),
    "sagittal": (lambda im: sitk.PermuteAxes(im, [1, 2, 0]), ".nii.gz"),
    "coronal_flipped": (lambda im: sitk.Flip(sitk.PermuteAxes(im, [0, 2, 1]), [False, True, True]), ".nrrd"),
    "permuted_kij": (lambda im: sitk.PermuteAxes(im, [2, 0, 1]), ".mha"),
}
OBLIQUE = {
    "oblique10_z": ((0.0, 0.0, 1.0), 10.0),
    "oblique10_tilted": ((1.0, 1.0, 0.3), 10.0),
}


def _make_oblique(image: sitk.Image, axis, degrees: float) -> sitk.Image:
    out = sitk.Image(image)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    out.SetDirection(tuple((_rotation(axis, degrees) @ d).reshape(-1)))
    return out


@pytest.fixture(scope="module")
def variant_files(tmp_path_factory, ct_path, ct_seg_path):
    """name -> (ct file, seg file, oblique?) for every variant, written once."""
    folder = tmp_path_factory.mktemp("variants")
    ct_image = sitk.ReadImage(str(ct_path))
    seg_image = sitk.ReadImage(str(ct_seg_path))
    files = {}
    for name, (build, ext) in VARIANTS.items():
        files[name] = (folder / f"{name}_ct{ext}", folder / f"{name}_seg{ext}", False)
        sitk.WriteImage(build(ct_image), str(files[name][0]))
        sitk.WriteImage(build(seg_image), str(files[name][1]))
    for name, (axis, degrees) in OBLIQUE.items():
        files[name] = (folder / f"{name}_ct.nii.gz", folder / f"{name}_seg.nii.gz", True)
        sitk.WriteImage(_make_oblique(ct_image, axis, degrees), str(files[name][0]))
        sitk.WriteImage(_make_oblique(seg_image, axis, degrees), str(files[name][1]))
    return files


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_builders_keep_physical_voxels(name, variant_files, ct_path):
    """Sanity check of the test's own variants: resampled onto the original grid they match it."""
    original = sitk.ReadImage(str(ct_path))
    variant = sitk.ReadImage(str(variant_files[name][0]))
    back = sitk.Resample(variant, original, sitk.Transform(), sitk.sitkNearestNeighbor, -5000)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original))


@pytest.mark.parametrize("name", list(VARIANTS) + list(OBLIQUE))
def test_variant_reads_to_same_canonical_array(name, variant_files, ct, ct_labels, tmp_path):
    ct_file, seg_file, oblique = variant_files[name]
    vol = read_volume(ct_file)
    seg = read_volume(seg_file)
    # Same canonical voxels, exactly (the oblique ones too: no resampling).
    np.testing.assert_array_equal(vol.array, ct.array)
    np.testing.assert_array_equal(seg.array, ct_labels.array)
    assert vol.spacing == pytest.approx((3.0, 3.0, 3.0))
    if oblique:
        # Axis i = -R e_x etc.: each index axis is tilted by acos(R[c, c]) from its canonical axis.
        rotation = _rotation(*OBLIQUE[name])
        expected_angle = max(math.degrees(math.acos(rotation[c, c])) for c in range(3))
        assert vol.orientation.obliqueness_degrees == pytest.approx(expected_angle, abs=1e-3)
        assert 5.0 < expected_angle <= 10.0 + 1e-9
    else:
        assert vol.orientation.obliqueness_degrees == pytest.approx(0.0, abs=1e-4)
    # from_canonical inverts to_canonical on the file's own array.
    raw = sitk.GetArrayFromImage(vol.image)
    np.testing.assert_array_equal(vol.orientation.from_canonical(vol.orientation.to_canonical(raw)), raw)
    np.testing.assert_array_equal(vol.orientation.from_canonical(vol.array), raw)

    # A canonical mask written back lands on the variant's exact grid and on the right voxels.
    liver = ct_labels.array == LIVER
    out = write_labelmap(liver, vol, tmp_path / "out" / f"liver{ct_file.name[len(name) + 3:]}")
    written = sitk.ReadImage(str(out))
    _same_grid(written, sitk.ReadImage(str(ct_file)))
    assert written.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(written), (sitk.GetArrayFromImage(sitk.ReadImage(str(seg_file))) == LIVER)
    )
    assert _listing(tmp_path / "out") == [out.name]

    # Boxes: the file-index and RAS boxes around the liver give its canonical bounding box.
    expected = _bbox(liver)
    seg_kji = sitk.GetArrayFromImage(seg.image) == LIVER
    assert ijk_box_to_canonical(vol, *_ijk_bbox(seg_kji)) == expected
    i0, j0, k0, i1, j1, k1 = _ijk_bbox(seg_kji)
    assert ijk_box_to_canonical(vol, i1, j1, k1, i0, j0, k0) == expected  # corner order does not matter
    ras = _voxel_ras(seg.image, seg_kji)
    box = ras_box_to_canonical(vol, ras.min(axis=0), ras.max(axis=0))
    if oblique:
        # The RAS-aligned box around a tilted organ holds its canonical box and a bit more.
        assert all(box[c] <= expected[c] for c in range(3))
        assert all(box[c + 3] >= expected[c + 3] for c in range(3))
        assert all(abs(box[c] - expected[c]) <= 15 for c in range(6))
    else:
        assert box == expected
        assert ras_box_to_canonical(vol, ras.max(axis=0), ras.min(axis=0)) == expected
        # Corners on voxel edges (half a voxel out) select the same voxels.
        half = 1.5
        assert ras_box_to_canonical(vol, ras.min(axis=0) - half, ras.max(axis=0) + half) == expected


def test_ras_points_round_trip_oblique(variant_files):
    vol = read_volume(variant_files["oblique10_tilted"][0])
    xyz = np.array([[0, 0, 0], [10.5, 20.25, 30], [121, 100, 111]], dtype=float)
    ras = vol.canonical_to_ras(xyz)
    np.testing.assert_allclose(vol.ras_to_canonical(ras), xyz, atol=1e-6)
    with pytest.raises(MedSAMError, match="shape"):
        vol.ras_to_canonical(np.zeros((2, 2)))


def test_ras_box_clipping_and_errors(ct):
    lo_ras = ct.canonical_to_ras([0, 0, 0])
    hi_ras = ct.canonical_to_ras([121, 100, 111])
    # Partly outside: clipped to the volume.
    inside = ct.canonical_to_ras([10, 20, 30])
    assert ras_box_to_canonical(ct, inside, lo_ras + np.array([50.0, 50.0, -50.0])) == (0, 0, 0, 10, 20, 30)
    assert ras_box_to_canonical(ct, lo_ras + [30, 30, -30], hi_ras + [-30, -30, 30]) == (0, 0, 0, 121, 100, 111)
    # A flat box (zero thickness along S) picks the nearest slice.
    a = ct.canonical_to_ras([10, 20, 40.2])
    b = ct.canonical_to_ras([30, 50, 40.2])
    assert ras_box_to_canonical(ct, a, b) == (10, 20, 40, 30, 50, 40)
    # Entirely outside: a clear error that names the volume's extent.
    far = hi_ras + np.array([0.0, 0.0, 100.0])
    with pytest.raises(MedSAMError, match="outside the volume.*spans RAS"):
        ras_box_to_canonical(ct, far, far + 10)
    with pytest.raises(MedSAMError, match="three finite numbers"):
        ras_box_to_canonical(ct, [0, 0], [1, 1, 1])


def test_ijk_box_errors(ct):
    with pytest.raises(MedSAMError, match=r"i0=-1 .*i must be in 0\.\.121"):
        ijk_box_to_canonical(ct, -1, 0, 0, 10, 10, 10)
    with pytest.raises(MedSAMError, match=r"k1=112 .*k must be in 0\.\.111"):
        ijk_box_to_canonical(ct, 0, 0, 0, 10, 10, 112)
    with pytest.raises(MedSAMError, match="whole number"):
        ijk_box_to_canonical(ct, 0.5, 0, 0, 10, 10, 10)
    # Flips: file i=0..10 is canonical x=111..121.
    assert ijk_box_to_canonical(ct, 0, 0, 0, 10, 10, 10) == (111, 90, 0, 121, 100, 10)
    assert ijk_box_to_canonical(ct, 0.0, 0, 0, 10, 10, 10) == (111, 90, 0, 121, 100, 10)


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def test_dicom_folder_matches_its_labels(dicom_dir, dicom_seg_path):
    vol = read_volume(dicom_dir)
    assert vol.shape == (20, 512, 512)
    assert vol.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert vol.path == dicom_dir
    assert vol.notes == []
    seg = read_volume(dicom_seg_path)
    assert seg.shape == vol.shape
    # The label file stores j flipped; in canonical order both share one grid.
    assert seg.orientation.flips != vol.orientation.flips
    corners = np.array(list(itertools.product((0, 511), (0, 511), (0, 19))), dtype=float)
    np.testing.assert_allclose(seg.canonical_to_ras(corners), vol.canonical_to_ras(corners), atol=1e-3)
    # ...and the labels sit on the right tissue: liver is soft tissue, not air or bone.
    liver = seg.array == LIVER
    assert liver.sum() > 1000
    assert 20 < float(np.median(vol.array[liver])) < 200
    assert float(np.median(vol.array[~liver])) < -100  # mostly air around the body


def test_single_dicom_file_reads_its_series(dicom_dir, tmp_path):
    first = sorted(dicom_dir.iterdir())[3]
    with pytest.warns(UserWarning, match="one DICOM slice"):
        vol = read_volume(first)
    assert vol.shape == (20, 512, 512)
    assert len(vol.notes) == 1


def test_dicom_folder_with_two_series_picks_the_larger(dicom_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in sorted(dicom_dir.iterdir()):
        shutil.copy(f, folder / f.name)
    # A second, smaller series: three slices with a new SeriesInstanceUID.
    small = sitk.Image(16, 16, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(3):
        small.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.99")
        small.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1.98")
        small.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.97.{z}")
        small.SetMetaData("0020|0032", f"0\\0\\{z * 2}")
        small.SetMetaData("0020|0013", str(z))
        writer.SetFileName(str(folder / f"small{z}.dcm"))
        writer.Execute(small)
    with pytest.warns(UserWarning, match="2 DICOM series"):
        vol = read_volume(folder)
    assert vol.shape == (20, 512, 512)
    assert "the one with the most files" in vol.notes[0]


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


def _bad_inputs(folder: Path, ct_path: Path) -> dict:
    ct_image = sitk.ReadImage(str(ct_path))
    small = ct_image[:20, :20, :5]
    cases = {}
    cases["missing"] = (folder / "nope.nii.gz", "not found")
    text = folder / "notes.nii.gz"
    text.write_text("this is not an image\n")
    cases["text"] = (text, "not an image file")
    empty_file = folder / "empty.nrrd"
    empty_file.write_bytes(b"")
    cases["empty_file"] = (empty_file, "not an image file")
    two_d = folder / "slice.nii.gz"
    sitk.WriteImage(ct_image[:, :, 5], str(two_d))
    cases["2d"] = (two_d, r"needs a 3D volume; got a 2D image of size 122x101")
    four_d = folder / "frames.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([small, small]), str(four_d))
    cases["4d"] = (four_d, r"4D image .*2 frames.*Extract one frame")
    vector = folder / "rgb.mha"
    sitk.WriteImage(sitk.Compose(small, small, small), str(vector))
    cases["vector"] = (vector, r"3 components per voxel.*Extract one channel")
    empty_dir = folder / "empty_dir"
    empty_dir.mkdir()
    cases["empty_dir"] = (empty_dir, "is empty")
    no_dicom = folder / "no_dicom"
    no_dicom.mkdir()
    (no_dicom / "readme.txt").write_text("hello")
    (no_dicom / "sub").mkdir()
    sitk.WriteImage(small, str(no_dicom / "volume.nrrd"))
    cases["no_dicom"] = (no_dicom, r"no DICOM series.*'volume.nrrd'.*Subfolders")
    return cases


def test_bad_inputs_raise_clear_errors_and_write_nothing(tmp_path, ct_path):
    cases = _bad_inputs(tmp_path, ct_path)
    before = _listing(tmp_path)
    for name, (path, pattern) in cases.items():
        with pytest.raises(MedSAMError, match=pattern) as info:
            read_volume(path)
        assert isinstance(info.value, ValueError), name
        assert str(path.name) in str(info.value), name
    assert _listing(tmp_path) == before


def test_single_frame_4d_is_read_as_3d(tmp_path, ct_path):
    small = sitk.ReadImage(str(ct_path))[:20, :21, :5]
    path = tmp_path / "one_frame.nrrd"
    sitk.WriteImage(sitk.JoinSeries([small]), str(path))
    vol = read_volume(path)
    assert vol.shape == (5, 21, 20)
    assert vol.image.GetDimension() == 3


def test_volume_from_image_refuses_vector_images():
    img = sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 2)
    with pytest.raises(MedSAMError, match="2 components"):
        Volume.from_image(img)
    vol = Volume.from_image(sitk.Image(4, 5, 6, sitk.sitkUInt8))
    assert vol.shape == (6, 5, 4) and vol.path is None


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_write_labelmap_formats(ext, ct, ct_labels, ct_path, tmp_path):
    labels = np.where(ct_labels.array == LIVER, 3, 0).astype(np.int64)
    labels[ct_labels.array == SPLEEN] = 200
    out = write_labelmap(labels, ct, tmp_path / "a" / "b" / f"labels{ext}")
    written = sitk.ReadImage(str(out))
    _same_grid(written, sitk.ReadImage(str(ct_path)))
    assert written.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(read_volume(out).array, labels)
    assert _listing(tmp_path / "a" / "b") == [out.name]
    # Overwriting an existing file works and leaves no temporary file.
    write_labelmap(labels > 0, ct, out)
    np.testing.assert_array_equal(read_volume(out).array, (labels > 0).astype(np.uint8))
    assert _listing(tmp_path / "a" / "b") == [out.name]


def test_write_labelmap_refuses_bad_input_and_writes_nothing(ct, tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    good = np.zeros(ct.shape, dtype=bool)
    with pytest.raises(MedSAMError, match=r"shape \(101, 112, 122\).*\(112, 101, 122\)"):
        write_labelmap(np.zeros((101, 112, 122), dtype=bool), ct, out_dir / "m.nii.gz")
    with pytest.raises(MedSAMError, match="whole-number"):
        write_labelmap(good.astype(np.float32), ct, out_dir / "m.nii.gz")
    with pytest.raises(MedSAMError, match=r"0\.\.255"):
        write_labelmap(np.full(ct.shape, 300, dtype=np.int32), ct, out_dir / "m.nii.gz")
    with pytest.raises(MedSAMError, match="Cannot write to 'm.png'"):
        write_labelmap(good, ct, out_dir / "m.png")
    with pytest.raises(MedSAMError, match="shape"):
        write_seg_nrrd([("a", np.zeros((2, 2, 2), dtype=bool), (1, 0, 0))], ct, out_dir / "s.seg.nrrd")
    with pytest.raises(MedSAMError, match="colour"):
        write_seg_nrrd([("a", good, (2, 0, 0))], ct, out_dir / "s.seg.nrrd")
    with pytest.raises(MedSAMError, match="needs a name"):
        write_seg_nrrd([(" ", good, (1, 0, 0))], ct, out_dir / "s.seg.nrrd")
    with pytest.raises(MedSAMError, match="seg.nrrd"):
        write_seg_nrrd([("a", good, (1, 0, 0))], ct, out_dir / "s.nii.gz")
    assert not out_dir.exists()
    # The destination's parent is a file: refused cleanly.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MedSAMError, match="is a file, not a folder"):
        write_labelmap(good, ct, blocker / "m.nii.gz")
    # A folder as destination.
    with pytest.raises(MedSAMError, match="is a folder"):
        write_labelmap(good, ct, tmp_path)

    # A write that fails half-way leaves neither a partial output nor a temporary file.
    def failing_write(image, path, *args):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("sitk::ERROR: disk full")

    monkeypatch.setattr(volumes.sitk, "WriteImage", failing_write)
    with pytest.raises(MedSAMError, match="disk full"):
        write_labelmap(good, ct, out_dir / "m.nii.gz")
    assert _listing(out_dir) == []


def _slicerio_masks(path: Path, volume: Volume) -> Tuple[dict, List[np.ndarray]]:
    """Read a .seg.nrrd with slicerio; return it and each segment's canonical mask."""
    slicerio = pytest.importorskip("slicerio")
    seg = slicerio.read_segmentation(str(path))
    voxels = seg["voxels"]  # (i, j, k) or (layer, i, j, k), Fortran-ordered indices
    masks = []
    for segment in seg["segments"]:
        layer = voxels if voxels.ndim == 3 else voxels[segment["layer"]]
        mask_kji = np.transpose(layer == segment["labelValue"], (2, 1, 0))
        masks.append(volume.orientation.to_canonical(mask_kji))
    return seg, masks


@pytest.mark.parametrize("name", ["original", "sagittal", "oblique10_tilted"])
def test_seg_nrrd_round_trip_with_slicerio(name, variant_files, ct_labels, tmp_path):
    vol = read_volume(variant_files[name][0])
    segments = [
        ("liver", ct_labels.array == LIVER, (0.86, 0.55, 0.4)),
        ("spleen", ct_labels.array == SPLEEN, (0.6, 0.2, 0.8)),
        ("empty one", np.zeros(vol.shape, dtype=bool), (0.0, 0.0, 1.0)),
    ]
    out = write_seg_nrrd(segments, vol, tmp_path / "seg" / "result.seg.nrrd")
    assert _listing(tmp_path / "seg") == ["result.seg.nrrd"]
    seg, masks = _slicerio_masks(out, vol)
    assert seg["voxels"].ndim == 3  # no overlap: one shared layer
    assert [s["name"] for s in seg["segments"]] == ["liver", "spleen", "empty one"]
    assert [s["id"] for s in seg["segments"]] == ["Segment_1", "Segment_2", "Segment_3"]
    for (_, mask, color), segment, read_mask in zip(segments, seg["segments"], masks):
        np.testing.assert_allclose(segment["color"], color, atol=1e-6)
        np.testing.assert_array_equal(read_mask, mask)
    assert seg["segments"][2]["extent"] == [0, -1, 0, -1, 0, -1]
    assert seg["masterRepresentation"] == "Binary labelmap"
    assert seg["containedRepresentationNames"] == ["Binary labelmap"]
    assert seg["referenceImageExtentOffset"] == [0, 0, 0]
    # Geometry: the input's exact grid.
    image = vol.image
    ijk_to_lps = np.asarray(seg["ijkToLPS"])
    d = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    np.testing.assert_allclose(ijk_to_lps[:3, :3], d, atol=1e-9)
    np.testing.assert_allclose(ijk_to_lps[:3, 3], image.GetOrigin(), atol=1e-9)
    # Extents are the file-index bounding boxes (Slicer's i0 i1 j0 j1 k0 k1).
    liver_kji = vol.orientation.from_canonical(segments[0][1])
    i0, j0, k0, i1, j1, k1 = _ijk_bbox(liver_kji)
    assert seg["segments"][0]["extent"] == [i0, i1, j0, j1, k0, k1]


def test_seg_nrrd_overlapping_segments_use_layers(ct, ct_labels, tmp_path):
    liver = ct_labels.array == LIVER
    stomach = ct_labels.array == STOMACH
    segments = [
        ("liver", liver, (1.0, 0.0, 0.0)),
        ("stomach", stomach, (0.0, 1.0, 0.0)),
        ("liver and stomach", liver | stomach, (0.0, 0.0, 1.0)),
        ("liver again", liver, (1.0, 1.0, 0.0)),
    ]
    out = write_seg_nrrd(segments, ct, tmp_path / "layers.seg.nrrd")
    seg, masks = _slicerio_masks(out, ct)
    assert seg["voxels"].ndim == 4 and seg["voxels"].shape[0] == 3
    assert [s["layer"] for s in seg["segments"]] == [0, 0, 1, 2]
    for (name, mask, _), segment, read_mask in zip(segments, seg["segments"], masks):
        assert segment["name"] == name
        np.testing.assert_array_equal(read_mask, mask)


def test_write_labelmap_to_seg_nrrd_keeps_label_values(ct, ct_labels, tmp_path):
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[ct_labels.array == LIVER] = 5
    labels[ct_labels.array == SPLEEN] = 1
    out = write_labelmap(labels, ct, tmp_path / "labels.seg.nrrd")
    seg, masks = _slicerio_masks(out, ct)
    assert [(s["name"], s["labelValue"]) for s in seg["segments"]] == [("Segment_1", 1), ("Segment_5", 5)]
    np.testing.assert_array_equal(masks[0], labels == 1)
    np.testing.assert_array_equal(masks[1], labels == 5)


def _slicer_logic():
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    colors.SetMRMLApplicationLogic(app)
    app.SetModuleLogic("Colors", colors)
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(app)
    app.SetModuleLogic("Segmentations", logic)
    return slicer, logic, (scene, app, colors)


def test_seg_nrrd_loads_in_slicer(variant_files, ct_labels, tmp_path):
    slicer, logic, _keep = _slicer_logic()
    from vtk.util.numpy_support import vtk_to_numpy

    vol = read_volume(variant_files["coronal_flipped"][0])
    liver = ct_labels.array == LIVER
    stomach = ct_labels.array == STOMACH
    # Overlapping segments (two layers) and a non-ASCII name, which Slicer reads as UTF-8.
    segments = [("liver (Leber, foie \u00e9)", liver, (1.0, 0.5, 0.0)),
                ("liver+stomach", liver | stomach, (0.0, 0.5, 1.0))]
    out = write_seg_nrrd(segments, vol, tmp_path / "slicer.seg.nrrd")
    node = logic.LoadSegmentationFromFile(str(out), True, "result")
    assert node is not None
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    assert segmentation.GetNumberOfLayers() == 2
    ijk_to_ras = np.eye(4)
    d = np.asarray(vol.image.GetDirection()).reshape(3, 3) * np.asarray(vol.image.GetSpacing())
    ijk_to_ras[:3, :3] = LPS_TO_RAS[:, None] * d
    ijk_to_ras[:3, 3] = LPS_TO_RAS * np.asarray(vol.image.GetOrigin())
    for n, (name, mask, color) in enumerate(segments):
        segment = segmentation.GetNthSegment(n)
        assert segment.GetName() == name
        np.testing.assert_allclose(segment.GetColor(), color, atol=1e-6)
        labelmap = slicer.vtkOrientedImageData()
        logic.GetSegmentBinaryLabelmapRepresentation(node, segmentation.GetNthSegmentID(n), labelmap)
        matrix = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        np.testing.assert_allclose([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], ijk_to_ras,
                                   atol=1e-6)
        extent = labelmap.GetExtent()
        dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
        values = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
        full = np.zeros(vol.orientation.shape_kji, dtype=bool)
        full[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1] = values > 0
        np.testing.assert_array_equal(vol.orientation.to_canonical(full), mask)


def test_read_seg_nrrd_round_trip_with_tags(ct, ct_labels, tmp_path):
    """Our reader gives back what we wrote: names (not ASCII too), colours, tags in Slicer's
    ``key:value|`` form, layers, masks on the file's grid; tags that Slicer cannot store are refused."""
    from MedSAMSlicerLib.fileio.segnrrd import parse_tags, read_seg_nrrd

    liver = ct_labels.array == LIVER
    stomach = ct_labels.array == STOMACH
    tags = {"MedSAM.Model": "litemedsam", "MedSAM.Box": "a:b:c (colons are fine)"}
    segments = [("foie \u00e9", liver, (1.0, 0.5, 0.0), tags), ("liver+stomach", liver | stomach, (0.0, 0.5, 1.0))]
    out = write_seg_nrrd(segments, ct, tmp_path / "tags.seg.nrrd")
    header = out.read_bytes().split(b"\n\n", 1)[0].decode("utf-8")
    assert "Segment0_Tags:=MedSAM.Box:a:b:c (colons are fine)|MedSAM.Model:litemedsam|" in header.splitlines()
    assert "Segment1_Tags:=|" in header.splitlines()
    seg = read_seg_nrrd(out)
    assert [s.name for s in seg.segments] == ["foie \u00e9", "liver+stomach"]
    assert seg.segments[0].tags == tags and seg.segments[1].tags == {}
    assert [s.layer for s in seg.segments] == [0, 1]
    np.testing.assert_allclose(seg.segments[1].color, (0.0, 0.5, 1.0))
    for (_, mask, *_), entry in zip(segments, seg.segments):
        np.testing.assert_array_equal(ct.orientation.to_canonical(seg.mask_kji(entry)), mask)
    assert seg.image.GetSize() == ct.image.GetSize()
    np.testing.assert_allclose(seg.image.GetDirection(), ct.image.GetDirection(), atol=1e-9)
    # Slicer's reading rule: split at '|', then at the first ':'; pieces without ':' are skipped.
    assert parse_tags("a:1|junk|b:x:y|") == {"a": "1", "b": "x:y"}
    for bad in ({"a|b": "1"}, {"a:b": "1"}, {"a": "x|y"}, {"a": "two\nlines"}):
        with pytest.raises(MedSAMError, match="foie"):
            write_seg_nrrd([("foie \u00e9", liver, (1, 0, 0), bad)], ct, tmp_path / "bad.seg.nrrd")
    assert not (tmp_path / "bad.seg.nrrd").exists()
    with pytest.raises(MedSAMError, match="no segments"):
        read_seg_nrrd(ct.path)
