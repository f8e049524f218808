"""Nothing wrong goes unnoticed (issue 11): damaged inputs, unsafe outputs, messages in the user's
terms. Every check runs on real files made from the shipped data (truncated, a DICOM slice
deleted, NaN written into an .mha, two writers started at once), asserts the exit code and the
message, and that no file of the user's changed (hashes before and after). Input errors end
before the model loads, so these tests are cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk

from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.fileio.atomic import TEMP_MARK, atomic_write, write_json
from MedSAMSlicerLib.fileio.integrity import check_file_complete
from MedSAMSlicerLib.fileio.volumes import read_volume, write_labelmap
from MedSAMSlicerLib.models import registry
from MedSAMSlicerLib.segmentation.preprocessing import Window, window_note

BIN = Path(sys.executable).parent
CLI = str(BIN / "medsam-slicer")


def _hashes(folder: Path) -> Dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _temporaries(folder: Path) -> List[str]:
    return [p.name for p in folder.rglob("*") if TEMP_MARK in p.name]


# ---------------------------------------------------------------------------------------------
# files in every format, truncated and damaged


FORMATS = {  # name -> (file name, compress)
    "nii.gz": ("ct.nii.gz", True),
    "nii": ("ct.nii", False),
    "nrrd raw": ("ct.nrrd", False),
    "nrrd gzip": ("ct_gz.nrrd", True),
    "mha raw": ("ct.mha", False),
    "mha compressed": ("ct_z.mha", True),
    "mhd + raw": ("ct.mhd", False),
}


@pytest.fixture(scope="module")
def format_files(tmp_path_factory, ct_sm_path):
    """The small CT written in each format: ``name -> (header path, path whose bytes hold the voxels)``."""
    folder = tmp_path_factory.mktemp("formats")
    image = sitk.ReadImage(str(ct_sm_path))
    out = {}
    for name, (file_name, compress) in FORMATS.items():
        path = folder / file_name
        sitk.WriteImage(image, str(path), compress)
        out[name] = (path, path.with_suffix(".raw") if file_name.endswith(".mhd") else path)
    return out


@pytest.mark.parametrize("name", list(FORMATS))
def test_truncated_file_is_refused_in_every_format(name, format_files, tmp_path):
    header, data = format_files[name]
    read_volume(header)  # the complete file reads
    copy = tmp_path / header.name
    shutil.copy(header, copy)
    if data != header:
        shutil.copy(data, tmp_path / data.name)
    target = tmp_path / data.name
    size = target.stat().st_size
    with open(target, "r+b") as handle:
        handle.truncate(size - size // 3)
    before = _hashes(tmp_path)
    with pytest.raises(MedSAMError, match=r"is truncated: it holds [\d,]+ of the [\d,]+ bytes of voxel data"):
        read_volume(copy)
    assert _hashes(tmp_path) == before


@pytest.mark.parametrize("name", ["nii.gz", "nrrd gzip", "mha compressed"])
def test_damaged_compressed_data_are_refused(name, format_files, tmp_path):
    """SimpleITK reads a flipped byte in the middle of compressed data without a word (hundreds
    of thousands of wrong voxels); the stream's own checksum catches it."""
    header, _ = format_files[name]
    copy = tmp_path / header.name
    data = bytearray(header.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    data[middle + 1] ^= 0x55
    copy.write_bytes(bytes(data))
    with pytest.raises(MedSAMError, match="is damaged: its compressed voxel data fail their integrity check"):
        check_file_complete(copy)


def test_nan_voxel_is_refused_with_its_file_index(tmp_path, ct_sm_path):
    image = sitk.Cast(sitk.ReadImage(str(ct_sm_path)), sitk.sitkFloat32)
    image = sitk.Flip(image, [False, False, True])  # the message must use this file's own k
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    array[7, 40, 50] = np.nan
    array[9, 1, 2] = np.inf
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    path = tmp_path / "nan.mha"
    sitk.WriteImage(bad, str(path))
    with pytest.raises(MedSAMError, match=r"2 voxel\(s\) that are NaN or infinite \(the first at i=50, j=40, k=7\)"):
        read_volume(path)


def test_blank_volume_is_refused_but_a_blank_label_map_reads(tmp_path, ct_sm_path):
    image = sitk.ReadImage(str(ct_sm_path))
    blank = sitk.Image(image.GetSize(), sitk.sitkInt16)
    blank.CopyInformation(image)
    path = tmp_path / "blank.nii.gz"
    sitk.WriteImage(blank + 5, str(path))
    with pytest.raises(MedSAMError, match="is blank: all its .* voxels have the value 5"):
        read_volume(path)
    assert read_volume(path, labels=True).array.max() == 5


def test_itk_errors_are_said_in_plain_words(tmp_path, ct_sm_path):
    """What SimpleITK raises (a source-file line, an object address) and what ITK's C++ code prints
    past Python (MetaIO's 'data not read completely', niftilib's '** ERROR') become one reason."""
    from MedSAMSlicerLib.fileio.itk_io import quiet_itk, sitk_reason

    image = sitk.ReadImage(str(ct_sm_path))
    with pytest.raises(RuntimeError) as info:
        with quiet_itk() as native:
            sitk.WriteImage(image, str(tmp_path / "no" / "such" / "x.nii.gz"))
    assert ".cxx:" in str(info.value) and any("nifti_image_write_engine" in line for line in native)
    assert sitk_reason(info.value, native) == "the file could not be created there"
    path = tmp_path / "t.mha"
    sitk.WriteImage(image, str(path))
    path.write_bytes(path.read_bytes()[:-50000])
    with pytest.raises(RuntimeError) as info:
        with quiet_itk() as native:
            sitk.ReadImage(str(path))
    assert sitk_reason(info.value, native).endswith("bytes of voxel data its header promises: it is truncated")
    with pytest.raises(RuntimeError) as info:
        sitk.ReadImage(str(tmp_path / "absent.nii.gz"))
    reason = sitk_reason(info.value)
    assert "does not exist" in reason and ".cxx" not in reason and "sitk::" not in reason


# ---------------------------------------------------------------------------------------------
# DICOM series with a missing or unreadable slice


@pytest.fixture
def dicom_copy(tmp_path, dicom_dir):
    folder = tmp_path / "series"
    shutil.copytree(dicom_dir, folder)
    return folder


def test_dicom_series_with_a_deleted_slice_is_refused_naming_the_gap(dicom_copy):
    files = sorted(dicom_copy.iterdir())
    files[7].unlink()
    with pytest.raises(MedSAMError) as info:
        read_volume(dicom_copy)
    message = str(info.value)
    assert "1 slice(s) missing between" in message and "4.00 mm apart" in message and "2.00 mm apart" in message
    assert files[6].name in message and files[8].name in message and "--allow-gaps" in message
    # Knowingly accepted: read on SimpleITK's uniform grid, with a note saying how far slices moved.
    with pytest.warns(UserWarning, match=r"read anyway \(--allow-gaps\) on a uniform grid of 2\.111 mm"):
        volume = read_volume(dicom_copy, allow_gaps=True)
    assert volume.shape[0] == 19


def test_dicom_series_with_a_truncated_slice_names_the_unreadable_file(dicom_copy):
    victim = sorted(dicom_copy.iterdir())[12]
    # Cut inside the header: GDCM drops the file exactly as one cut in its pixel data (checked by
    # hand), but a cut in the JPEG2000 data costs GDCM ~5 s of parsing.
    victim.write_bytes(victim.read_bytes()[:2000])
    with pytest.raises(MedSAMError, match=rf"slice\(s\) missing.*could not be read: '{re.escape(victim.name)}'"):
        read_volume(dicom_copy)


# ---------------------------------------------------------------------------------------------
# every input of the issue as a real `medsam-slicer` subprocess: one line, exit 2, nothing changed


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, ct_path, ct_sm_path, dicom_dir):
    """Real bad inputs made from the shipped data."""
    d = tmp_path_factory.mktemp("hostile")
    # The reproduction: head -c 1100000 example_ct.nii.gz > t.nii.gz
    (d / "t.nii.gz").write_bytes(ct_path.read_bytes()[:1100000])
    shutil.copytree(dicom_dir, d / "missing")
    sorted((d / "missing").iterdir())[10].unlink()
    image = sitk.Cast(sitk.ReadImage(str(ct_sm_path)), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[15, 50, 60] = np.nan
    nan = sitk.GetImageFromArray(array)
    nan.CopyInformation(image)
    sitk.WriteImage(nan, str(d / "nan.mha"))
    blank = sitk.Image(image.GetSize(), sitk.sitkInt16)
    blank.CopyInformation(image)
    sitk.WriteImage(blank, str(d / "blank.nii.gz"))
    shutil.copy(ct_sm_path, d / "ct.nii.gz")
    sitk.WriteImage(sitk.Flip(sitk.ReadImage(str(ct_sm_path)), [False, False, True]), str(d / "flipped.nii.gz"))
    (d / "keep.nii.gz").write_bytes(b"precious")
    (d / "not_weights.pth").write_bytes(b"not a checkpoint")  # any model load would fail on it
    (d / "a_file").write_text("not a folder")
    (d / "out").mkdir()
    return d


BOX = ["47", "30", "15", "103", "86", "15"]


@pytest.mark.parametrize(
    "case, args, pattern",
    [
        ("truncated nii.gz", ["t.nii.gz", "--box-ijk", "47", "30", "90", "103", "86", "90"],
         r"'.*t\.nii\.gz' is truncated: it holds [\d,]+ of the 5,520,256 bytes"),
        ("dicom slice deleted", ["missing", "--box-ijk", "100", "100", "5", "300", "300", "5"],
         r"1 slice\(s\) missing between 'CT\.[\d.]+' \(S -?\d+\.\d mm\) and 'CT\.[\d.]+'.*--allow-gaps"),
        ("nan voxel, mr window", ["nan.mha", "--preset", "mr", "--box-ijk", *BOX],
         r"1 voxel\(s\) that are NaN \(the first at i=60, j=50, k=15\)"),
        ("blank volume", ["blank.nii.gz", "--box-ijk", *BOX], r"is blank: all its \d+ voxels have the value 0"),
        ("output exists", ["ct.nii.gz", "--box-ijk", *BOX, "-o", "keep.nii.gz"], r"already exists.*--overwrite"),
        ("output is the input", ["ct.nii.gz", "--box-ijk", *BOX, "-o", "ct.nii.gz", "--overwrite"],
         r"is the input image; writing the result there would destroy the image"),
        ("output is a folder", ["ct.nii.gz", "--box-ijk", *BOX, "-o", "out"], r"is a folder; give a file name"),
        ("output under a file", ["ct.nii.gz", "--box-ijk", *BOX, "-o", "a_file/m.nii.gz"], r"is a file, not a folder"),
        ("output name too long", ["ct.nii.gz", "--box-ijk", *BOX, "-o", "m" * 300 + ".nii.gz"],
         r"is 307 bytes long; this file system allows 255"),
        ("output extension", ["ct.nii.gz", "--box-ijk", *BOX, "-o", "m.png"], r"must end in one of \.nii\.gz"),
        ("zero-size box in i", ["ct.nii.gz", "--box-ijk", "60", "40", "15", "60", "86", "15"],
         r"single voxel wide \(i0=60 and i1=60\).*at least 2 voxels in i and in j"),
        ("slice outside, flipped file", ["flipped.nii.gz", "--box-ijk", "47", "30", "40", "103", "86", "40"],
         r"Box index k0=40 is outside the volume: k must be in 0\.\.29"),
        ("RAS box outside", ["ct.nii.gz", "--box-ras", "0", "0", "0", "10", "100", "0"],
         r"lies outside the volume \(along S \(superior-inferior\)\)"),
    ],
)
def test_bad_input_subprocess_one_line_and_nothing_changed(case, args, pattern, hostile):
    before = _hashes(hostile)
    # The model's weights are a file that cannot be loaded: had the model loaded before the input
    # was checked, the error would be about the weights (no clock: a loaded machine is slow, not wrong).
    command = [CLI, "segment", *args, "--checkpoint", "not_weights.pth"]
    if "-o" not in args:
        command += ["-o", "result.nii.gz"]
    res = subprocess.run(command, cwd=hostile, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, (case, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsam-slicer: error: "), res.stderr
    assert re.search(pattern, lines[0]), lines[0]
    for noise in ("Traceback", ".hxx:", ".cxx:", "** ERROR", "ITK ERROR", "x (toward", "canonical"):
        assert noise not in res.stderr, res.stderr
    assert res.stdout == ""
    assert _hashes(hostile) == before and not _temporaries(hostile)
    assert "not_weights" not in res.stderr and "checkpoint" not in res.stderr.lower(), res.stderr


def test_unreadable_input_and_read_only_output_folder_are_refused_before_the_model(hostile):
    """Root writes and reads anywhere, so under root the command runs as 'nobody'."""
    as_user: List[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be tested")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    top = Path(tempfile.mkdtemp(prefix="medsam-permissions-"))
    try:
        top.chmod(0o755)
        shutil.copy(hostile / "ct.nii.gz", top / "ct.nii.gz")
        (top / "ct.nii.gz").chmod(0o644)
        locked = top / "locked"
        locked.mkdir()
        shutil.copy(hostile / "ct.nii.gz", locked / "ct.nii.gz")
        locked.chmod(0o311)  # may be entered, not listed nor written
        writable = top / "out"
        writable.mkdir()
        writable.chmod(0o777)
        before = _hashes(hostile)
        runs = {
            "read-only output folder": ([str(top / "ct.nii.gz"), "-o", str(locked / "m.nii.gz")],
                                        r"cannot write output '.*m\.nii\.gz': nothing can be created in '.*locked' "
                                        r"\(Permission denied\)"),
            "unreadable input": ([str(hostile / "ct.nii.gz"), "-o", str(writable / "m.nii.gz")],
                                 r"Input '.*ct\.nii\.gz' cannot be used \(Permission denied\)"),
        }
        for case, (args, pattern) in runs.items():
            res = subprocess.run([*as_user, CLI, "segment", args[0], "--box-ijk", *BOX, *args[1:]],
                                 capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=str(top)))
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 2 and len(lines) == 1, (case, res.stderr)
            assert re.search(pattern, lines[0]), (case, lines[0])
        locked.chmod(0o755)
        assert sorted(p.name for p in locked.iterdir()) == ["ct.nii.gz"] and not list(writable.iterdir())
        assert _hashes(hostile) == before
    finally:
        for folder in (top, top / "locked"):
            with contextlib.suppress(OSError):
                folder.chmod(0o755)
        shutil.rmtree(top, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# output safety: one atomic publish, no replacement without --overwrite, no leftovers


def test_a_file_created_during_the_write_is_not_replaced(tmp_path):
    target = tmp_path / "mask.nii.gz"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")  # someone else finishes first

    with pytest.raises(MedSAMError, match="created by someone else while this run was working"):
        atomic_write(target, write, overwrite=False)
    assert target.read_bytes() == b"theirs" and _temporaries(tmp_path) == []
    atomic_write(target, lambda tmp: tmp.write_bytes(b"ours"), overwrite=True)
    assert target.read_bytes() == b"ours"


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from MedSAMSlicerLib.errors import MedSAMError
    from MedSAMSlicerLib.fileio.atomic import atomic_write
    target, go, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def write(tmp):
        tmp.write_bytes(me.encode() * 100000)
        Path(str(go) + "." + me).touch()  # ready: both writers are past every check
        while not go.exists():
            time.sleep(0.01)

    try:
        atomic_write(target, write, overwrite=False)
    except MedSAMError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    print("wrote", me)
""")


def test_two_writers_started_at_once_cannot_both_win(tmp_path):
    target, go = tmp_path / "out" / "mask.nii.gz", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(go), me], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for me in ("A", "B")]
    # Both past every check before either may finish, however long they take to start on a loaded
    # machine (a 60 s clock here let one finish before the other had started: a wrong failure).
    while not all(Path(f"{go}.{me}").exists() for me in "AB") and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    go.touch()
    results = [(p.wait(600), *p.communicate()) for p in procs]  # a hang guard
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    winner = next(out.split()[1] for code, out, _ in results if code == 0)
    loser_err = next(err for code, _, err in results if code == 2)
    assert "created by someone else" in loser_err
    assert target.read_bytes() == winner.encode() * 100000
    assert _temporaries(tmp_path) == []


def test_write_labelmap_never_replaces_without_overwrite(tmp_path, ct_sm_path):
    volume = read_volume(ct_sm_path)
    target = tmp_path / "m.nii.gz"
    target.write_bytes(b"precious")
    with pytest.raises(MedSAMError, match="already exists"):
        write_labelmap(np.zeros(volume.shape, bool), volume, target, overwrite=False)
    assert target.read_bytes() == b"precious"
    with pytest.raises(MedSAMError, match="is the input image"):
        write_labelmap(np.zeros(volume.shape, bool), volume, ct_sm_path, overwrite=True)


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from MedSAMSlicerLib.fileio.atomic import atomic_write

    def write(tmp):
        tmp.write_bytes(b"x" * 1000000)
        print("writing", flush=True)
        time.sleep(600)

    atomic_write(Path(sys.argv[1]), write)
""")


def test_temporary_file_of_a_killed_run_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "latest.pth"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = _temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(".latest.") and left[0].endswith(TEMP_MARK + ".pth")
    write_json(tmp_path / "manifest.json", {"next": "run"})
    assert _temporaries(tmp_path) == [] and not target.exists()


def test_slice_only_with_a_3d_box_segments_its_middle_slice_named_in_file_indices(ct_path, kidney_box, tmp_path,
                                                                                   lite_segmenter):
    """`--slice-only` with a 3D box segmented the box's bottom slice, not its middle slice as
    documented; and slices were reported in our canonical z (k=90 of a z-flipped file was
    "slice 21"). The flipped copy has the same canonical voxels, so its slice is encoded once."""
    from MedSAMSlicerLib.cli import segment_file

    i0, j0, k0, i1, j1, k1 = kidney_box
    k_mid = (k0 + k1) // 2
    image = sitk.ReadImage(str(ct_path))
    nk = image.GetSize()[2]
    flipped = tmp_path / "flipped.nii.gz"
    sitk.WriteImage(sitk.Flip(image, [False, False, True]), str(flipped))
    for path, box, k_expected in ((ct_path, kidney_box, k_mid),
                                  (flipped, (i0, j0, nk - 1 - k0, i1, j1, nk - 1 - k1), nk - 1 - k_mid)):
        out = tmp_path / f"mid_{Path(path).name}"
        summary = segment_file(str(path), out, box_ijk=box, slice_only=True, segmenter=lite_segmenter, progress=False)
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))  # (k, j, i)
        assert np.flatnonzero(mask.any(axis=(1, 2))).tolist() == [k_expected], summary
        assert f"(slice k={k_expected} only, the 3D box's middle slice)" in summary


# ---------------------------------------------------------------------------------------------
# values that do not look like the modality; the weights hash cache


def test_window_warns_when_values_are_not_hounsfield_units(ct_sm_path, mr_path):
    ct = read_volume(ct_sm_path).array
    assert window_note(ct, Window.preset("abdomen")) is None
    raw = window_note(ct + 1024, Window.preset("abdomen"))  # CT stored without its rescale
    assert raw and "no air or fat in Hounsfield units" in raw and "pure white" in raw
    mr = read_volume(mr_path).array
    assert window_note(mr, Window.preset("mr")) is None
    assert "an MR image?" in window_note(mr, Window.preset("abdomen"))
    assert "grey level" in window_note(ct / 4000.0, Window.preset("abdomen"))  # normalised values


def test_weights_hash_cache_is_not_fooled_by_same_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.WEIGHTS_DIR_ENV, str(tmp_path / "cache"))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"A" * 4096)
    stamp = weights.stat()
    assert registry.file_digest(weights) == hashlib.sha256(b"A" * 4096).hexdigest()
    replacement = tmp_path / "new.pth"
    replacement.write_bytes(b"B" * 4096)
    os.utime(replacement, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    os.replace(replacement, weights)  # same path, size and modification time; other content
    assert weights.stat().st_size == stamp.st_size and weights.stat().st_mtime_ns == stamp.st_mtime_ns
    assert registry.file_digest(weights) == hashlib.sha256(b"B" * 4096).hexdigest()
