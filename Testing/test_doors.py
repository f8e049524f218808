"""Every door as safe as ``segment`` (issue 22): generated hostile inputs thrown at every file a
user hands us, and the output rules of every command.

The promise, the same for every command (docs/safety.md): bad input ends with exit code 2 and
ONE line naming the file and the problem, no traceback, before any model loads, and nothing is
written or changed. Each door is tried with Hypothesis (bounded, derandomized examples) and with
the defects the issue found, as fixed cases. The doors refuse before the model loads, so the
calls run in this process; a tripwire checkpoint (an empty ``.pth``) makes any input that slipped
through end with a message about the tripwire instead of the file, which fails the test.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedSAMSlicerLib import cli
from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.fileio.atomic import TEMP_MARK
from MedSAMSlicerLib.fileio.segnrrd import read_seg_nrrd, write_seg_nrrd
from MedSAMSlicerLib.fileio.volumes import read_volume
from MedSAMSlicerLib.segmentation.provenance import PREFIX, Provenance, volume_sha256
from MedSAMSlicerLib.training import cli as train_cli

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "medsam_headless.py"

#: Bounded: every door below takes 40 generated inputs (the whole file runs in well under a minute).
HOSTILE = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                          HealthCheck.data_too_large])


def _state(folder: Path) -> Dict[str, str]:
    """Every entry under ``folder``: files by content hash, links by target, folders."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[key] = "dir"
    return out


def _call(main: Callable[[List[str]], int], argv: Sequence[object]) -> Tuple[int, str, str]:
    """``main(argv)`` in this process: exit code, stdout, stderr (signal handlers restored)."""
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:  # argparse
                code = int(exc.code or 0)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return code, out.getvalue(), err.getvalue()


def assert_refused(main, argv, folder: Path, prefix: str, names: Sequence[str], contains: str = "") -> str:
    """The promise: exit 2, one line starting with ``prefix`` and naming each of ``names``, no
    traceback, nothing under ``folder`` written or changed, no temporary file; returns the line."""
    before = _state(folder)
    code, out, err = _call(main, argv)
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err and "tripwire" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert contains in lines[0], (contains, lines[0])
    assert _state(folder) == before, "something was written or changed"
    assert not [p for p in folder.rglob("*") if TEMP_MARK in p.name]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Hostile values

#: Never a number: a bool is not a number, nor a string, a list, a table, null.
NOT_NUMBERS = [True, False, "5", "1e3", None, [1], {"a": 1}, "", "NaN"]
#: JSON numbers no field accepts: NaN, infinities, integers of hundreds of digits, 1e999.
BAD_NUMBERS = [math.nan, math.inf, -math.inf, 10 ** 30, -(10 ** 40), 10 ** 400]
#: Never a name.
NOT_NAMES = [5, 2.5, True, None, ["a", "b"], {"x": 1}, "", "   ", "a\x00b", "bell\x07", "x" * 300]


def _deep(depth: int, leaf=1):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _dump(value) -> str:
    """JSON as Python writes it (NaN and Infinity literals included: the reader must refuse them)."""
    return json.dumps(value, allow_nan=True)


RAW_TEXTS = st.sampled_from([
    b"\xff\xfe{}",                                  # not UTF-8
    b'{"structure": [{"name": "caf\xe9"}]}',         # Latin-1 text
    b"[" * 100_000 + b"]" * 100_000,                 # nesting deep enough to crash a recursive parser
    ("[" * 40 + "1" + "]" * 40).encode(),           # deeper than MAX_DEPTH
    b"1" * 5000,                                     # an integer of 5000 digits
    b'{"a": 1e999}',
    b"NaN",
    b"{",
    b"",
    b"\x00" * 64,
])


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def door(tmp_path_factory, ct_sm_path, ct_sm_seg_path):
    """A folder with the small CT, its labels and a tripwire checkpoint (an empty .pth)."""
    d = tmp_path_factory.mktemp("doors")
    (d / "ct.nii.gz").write_bytes(ct_sm_path.read_bytes())
    (d / "labels.nii.gz").write_bytes(ct_sm_seg_path.read_bytes())
    (d / "tripwire.pth").write_bytes(b"")
    (d / "keep.txt").write_text("precious")
    return d


# ---------------------------------------------------------------------------------------------
# segment --prompts


PROMPT = {"name": "spleen", "box_ijk": [47, 30, 15, 103, 86, 15]}


def _prompt_mutations():
    field = st.sampled_from(["box_ijk", "box_ras"])
    number_in_box = st.tuples(field, st.integers(0, 5), st.sampled_from(NOT_NUMBERS + BAD_NUMBERS))
    fractional = st.tuples(st.just("box_ijk"), st.integers(0, 5),
                           st.floats(0.01, 0.99).map(lambda f: 40 + f))
    wrong_length = st.tuples(field, st.just(None), st.lists(st.integers(0, 50), max_size=12).filter(lambda v: len(v) != 6))
    box_not_list = st.tuples(field, st.just(None), st.sampled_from(["47 30 15 103 86 15", 47, {"i0": 1}, True]))
    name = st.tuples(st.just("name"), st.just(None), st.sampled_from(NOT_NAMES))
    color = st.tuples(st.just("color"), st.just(None),
                      st.sampled_from([[2, 0, 0], [-0.1, 0, 0], ["r", "g", "b"], [0.5, 0.5], True, [math.nan, 0, 0]]))
    unknown = st.tuples(st.sampled_from(["colour", "box", "Name", "label"]), st.just(None), st.integers())
    return st.one_of(number_in_box, fractional, wrong_length, box_not_list, name, color, unknown)


def _mutated_prompt(mutation):
    key, index, value = mutation
    entry = json.loads(json.dumps(PROMPT))
    if key == "box_ras":
        entry.pop("box_ijk")
        entry["box_ras"] = [-50.0, 10.0, -300.0, 20.0, 80.0, -250.0]
    if index is None:
        entry[key] = value
    else:
        entry[key][index] = value
    return entry


@HOSTILE
@given(mutation=_prompt_mutations(), layout=st.sampled_from(["table", "list", "second"]))
def test_prompts_file_door(door, mutation, layout):
    entry = _mutated_prompt(mutation)
    entries = {"table": {"structure": [entry]}, "list": [entry],
               "second": {"structure": [{"name": "liver", "box_ijk": [30, 20, 10, 80, 70, 20]}, entry]}}[layout]
    path = door / "prompts.json"
    path.write_text(_dump(entries))
    assert_refused(cli.main, ["segment", door / "ct.nii.gz", "--prompts", path, "-o", door / "out.seg.nrrd",
                              "--checkpoint", door / "tripwire.pth"], door, "medsam-slicer: error: ",
                   ["prompts.json"], contains="structure")


@HOSTILE
@given(raw=RAW_TEXTS, suffix=st.sampled_from([".json", ".toml"]))
def test_prompts_file_door_raw_bytes(door, raw, suffix):
    path = door / f"raw{suffix}"
    path.write_bytes(raw)
    assert_refused(cli.main, ["segment", door / "ct.nii.gz", "--prompts", path, "-o", door / "out.seg.nrrd",
                              "--checkpoint", door / "tripwire.pth"], door, "medsam-slicer: error: ", [path.name])


def test_prompts_toml_non_finite_and_types(door):
    """TOML has its own nan/inf literals and dates: refused the same way."""
    for text, problem in [('[[structure]]\nname = "a"\nbox_ras = [nan, 0, 0, 1, 1, 1]\n', "box_ras"),
                          ('[[structure]]\nname = "a"\nbox_ijk = [1, 2, true, 4, 5, 6]\n', "box_ijk"),
                          ('[[structure]]\nname = 1979-05-27\nbox_ijk = [1, 2, 3, 4, 5, 6]\n', "name"),
                          ('[[structure]]\nname = ["a", "b"]\nbox_ijk = [1, 2, 3, 4, 5, 6]\n', "name")]:
        path = door / "p.toml"
        path.write_text(text)
        assert_refused(cli.main, ["segment", door / "ct.nii.gz", "--prompts", path, "-o", door / "o.nii.gz",
                                  "--checkpoint", door / "tripwire.pth"], door, "medsam-slicer: error: ", ["p.toml"],
                       contains=problem)


def test_nan_box_in_a_prompts_file_is_the_files_problem(door):
    """Issue: a NaN box was reported as a --box-ijk problem "got 6"."""
    path = door / "nan.json"
    path.write_text('[{"name": "a", "box_ras": [NaN, 0, 0, 1, 1, 1]}]')
    line = assert_refused(cli.main, ["segment", door / "ct.nii.gz", "--prompts", path, "-o", door / "o.nii.gz"],
                          door, "medsam-slicer: error: ", ["nan.json"])
    assert "--box" not in line and "got 6" not in line


@contextlib.contextmanager
def _hang_guard(seconds: int = 600):
    """Fails a call that blocks (a FIFO's open, an endless read) instead of hanging the run:
    SIGALRM after ``seconds`` interrupts it. A guard against hanging, not a time limit: a loaded
    machine is slow, not wrong."""

    def hung(signum, frame):
        raise AssertionError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fifo_and_dev_zero_prompts_do_not_hang(door, tmp_path):
    """Issue: --prompts on a FIFO blocked forever; on a link to /dev/zero it read until memory ran out."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    folder = tmp_path / "dir.json"
    folder.mkdir()
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (2 << 20))
    for path, problem in [(fifo, "a pipe (FIFO), not a file"), (zero, "a device, not a file"),
                          (folder, "a folder, not a file"), (big, "such a file is at most")]:
        # The message names the kind of file: it was refused before being opened or read (a
        # FIFO's open would block, /dev/zero never ends).
        with _hang_guard():
            assert_refused(cli.main, ["segment", door / "ct.nii.gz", "--prompts", path, "-o", tmp_path / "o.nii.gz"],
                           tmp_path, "medsam-slicer: error: ", [path.name], contains=problem)


def test_names_differing_only_by_whitespace_are_one_name(door):
    """Issue: 'liver' and 'liver ' made two segments of one name, and --replay wrote one mask into both."""
    path = door / "twice.json"
    path.write_text(json.dumps([{"name": "liver", "box_ijk": [47, 30, 15, 103, 86, 15]},
                                {"name": "liver ", "box_ijk": [47, 30, 15, 103, 86, 15]}]))
    assert_refused(cli.main, ["segment", door / "ct.nii.gz", "--prompts", path, "-o", door / "o.seg.nrrd",
                              "--checkpoint", door / "tripwire.pth"], door, "medsam-slicer: error: ",
                   ["twice.json", "'liver'"], contains="spaces collapsed")
    assert_refused(cli.main, ["segment", door / "ct.nii.gz", "--box-ijk", 47, 30, 15, 103, 86, 15, "--name", "a\tb",
                              "--box-ijk", 47, 30, 15, 103, 86, 15, "--name", "a  b", "-o", door / "o.seg.nrrd",
                              "--checkpoint", door / "tripwire.pth"], door, "medsam-slicer: error: ",
                   ["two structures are named 'a b'"])


# ---------------------------------------------------------------------------------------------
# segment --replay: hand-edited MedSAM.* records


@pytest.fixture(scope="module")
def record_tags(door):
    """A complete record for the small CT (weights' digest made up: a record that passes every
    check ends at the weights, which is not a record error, so the tests can tell)."""
    volume = read_volume(door / "ct.nii.gz")
    record = Provenance(prompts=[{"kind": "box", "ras": [[-60.0, 40.0, -180.0], [-20.0, 80.0, -180.0]]}],
                        mode="3d", direction="both", model="litemedsam", weights_sha256="0" * 64, speed="exact",
                        precision="float32", window={"level": 40.0, "width": 400.0},
                        job={"id": "abc", "structures": ["spleen"]}, volume_sha256=volume_sha256(volume.array),
                        date="2026-12-07T00:00:00+00:00")
    return volume, record.tags()


RECORD_MUTATIONS = {
    "Prompts": ["[]", "{}", "not json", "NaN", _dump([{"kind": "box", "ras": [["1", 0, 0], [1, 1, 1]]}]),
                _dump([{"kind": "box", "ras": [[math.nan, 0, 0], [1, 1, 1]]}]),
                _dump([{"kind": "box", "ras": [[True, 0, 0], [1, 1, 1]]}]),
                _dump([{"kind": "box", "ras": [[1e999, 0, 0], [1, 1, 1]]}]),
                _dump([{"kind": "lasso", "ras": [[0, 0, 0], [1, 1, 1]]}]), _dump([{"kind": "box"}]),
                _dump([{"kind": "box", "ras": [[0, 0, 0]]}]), _dump(_deep(50)), "1" * 400],
    "Corrections": ["{}", _dump([5]), _dump([{"kind": "zap"}]), _dump([{"kind": "box", "ras": "x"}]),
                    _dump([{"kind": "accept", "slice_ras": [True, 0, 0]}]),
                    _dump([{"kind": "accept", "slice_ras": [0, 0, 0], "edited": "no"}]),
                    _dump([{"kind": "box", "ras": [[0, 0, 0], [1, 1, "1"]]}]),
                    # a box per piece (issue 23): "more" is a non-empty list of corner pairs
                    _dump([{"kind": "box", "ras": [[0, 0, 0], [1, 1, 1]], "more": []}]),
                    _dump([{"kind": "box", "ras": [[0, 0, 0], [1, 1, 1]], "more": [[[0, 0, 0]]]}]),
                    _dump([{"kind": "box", "ras": [[0, 0, 0], [1, 1, 1]], "more": "x"}])],
    "Window": ["{}", _dump({"level": "40", "width": 400}), _dump({"level": 40, "width": 0}),
               _dump({"level": 40, "width": -5}), _dump({"percentiles": [99, 1]}), _dump({"percentiles": [1]}),
               _dump({"level": 40, "width": 400, "gamma": 2}), "[]"],
    "Job": ["{}", _dump({"id": 1, "structures": ["a"]}), _dump({"id": "x", "structures": []}),
            _dump({"id": "x", "structures": [["a"]]}), _dump({"id": "x"}), "null"],
    "Mode": ["4d", "", "3D "], "Direction": ["sideways", "Both"], "Speed": ["warp", ""],
    "Precision": ["int8", "double"], "Volume": ["xyz", "0" * 63, "G" * 64], "WeightsSHA256": ["abc", ""],
    "Model": ["", "x" * 100],
}


@HOSTILE
@given(tag=st.sampled_from(sorted(RECORD_MUTATIONS)), data=st.data())
def test_replay_record_door(door, record_tags, tag, data):
    volume, tags = record_tags
    value = data.draw(st.sampled_from(RECORD_MUTATIONS[tag]))
    hostile = {**tags, PREFIX + tag: value}
    mask = np.zeros(volume.shape, bool)
    mask[15, 40:60, 40:60] = True
    seg = door / "edited.seg.nrrd"
    seg.unlink(missing_ok=True)
    write_seg_nrrd([("spleen", mask, (0.5, 0.5, 0.5), hostile)], volume, seg)
    assert_refused(cli.main, ["segment", door / "ct.nii.gz", "--replay", seg, "-o", door / "again.seg.nrrd",
                              "--checkpoint", door / "tripwire.pth"], door, "medsam-slicer: error: ",
                   ["edited.seg.nrrd", "the record of segment 'spleen'", PREFIX + tag])


def test_replay_refuses_a_missing_tag_and_two_segments_of_one_name(door, record_tags):
    volume, tags = record_tags
    mask = np.zeros(volume.shape, bool)
    mask[15, 40:60, 40:60] = True
    seg = door / "edited2.seg.nrrd"
    write_seg_nrrd([("spleen", mask, (0.5, 0.5, 0.5), {k: v for k, v in tags.items() if k != PREFIX + "Window"})],
                   volume, seg)
    assert_refused(cli.main, ["segment", door / "ct.nii.gz", "--replay", seg, "-o", door / "again.seg.nrrd"], door,
                   "medsam-slicer: error: ", ["edited2.seg.nrrd", "has no MedSAM.Window tag"])
    seg.unlink()
    # Two segments called the same (another program wrote it): refused, not one mask into both.
    write_seg_nrrd([("spleen", mask, (0.5, 0.5, 0.5), tags), ("other", mask, (0.5, 0.5, 0.5), tags)], volume, seg)
    text = seg.read_bytes().replace(b"Segment1_Name:=other", b"Segment1_Name:=spleen")
    seg.write_bytes(text)
    assert_refused(cli.main, ["segment", door / "ct.nii.gz", "--replay", seg, "-o", door / "again.seg.nrrd"], door,
                   "medsam-slicer: error: ", ["edited2.seg.nrrd", "several segments named 'spleen'"])
    seg.unlink()


def test_header_values_are_escaped_as_slicer_reads_them(door, record_tags, tmp_path):
    """Issue: a name with a backslash or a line break was written unescaped, so the file's own
    --replay called its record damaged. Read back by our reader (ITK's NrrdIO) and by Slicer's own
    storage node (slicer-core), the names and the record come back exactly."""
    from MedSAMBridgeLib import headless
    from MedSAMBridgeLib.records import segment_tags

    volume, tags = record_tags
    names = ["back\\slash", "tab\\n and \\\\", "caf\u00e9"]
    mask = np.zeros(volume.shape, bool)
    mask[15, 40:60, 40:60] = True
    out = tmp_path / "escaped.seg.nrrd"
    job = json.dumps({"id": "abc", "structures": names}, separators=(",", ":"))
    records = [{**tags, PREFIX + "Job": job, PREFIX + "Date": f"2026-12-0{n + 1}"} for n in range(len(names))]
    write_seg_nrrd([(n, mask, (0.5, 0.5, 0.5), r) for n, r in zip(names, records)], volume, out)
    seg = read_seg_nrrd(out)
    assert [s.name for s in seg.segments] == names
    for s, r in zip(seg.segments, records):
        assert s.tags == r
        Provenance.from_tags(s.tags, s.name)  # not "damaged"
    headless.create_headless_scene()
    node = headless.load_segmentation(str(out))
    segmentation = node.GetSegmentation()
    got = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
    assert [s.GetName() for s in got] == names
    assert [segment_tags(s)[PREFIX + "Job"] for s in got] == [r[PREFIX + "Job"] for r in records]


# ---------------------------------------------------------------------------------------------
# evaluate: evaluation sets and label files


def _set_mutations():
    case_key = st.sampled_from(["structures", "min_slices", "slice_thickness_mm", "tolerance_mm", "image", "labels",
                                "name", "structures_from", "colour"])
    values = {
        "structures": [{"spleen": "1"}, {"spleen": 1.5}, {"spleen": True}, {"spleen": []}, {"spleen": [1.5]},
                       {"spleen": 0}, {"spleen": -3}, {"spleen": 10 ** 40}, {"spleen": 250}, {"spleen": [1, 250]},
                       {}, [1, 2], "spleen", {"spleen": {"v": 1}}, {"spleen": math.nan}],
        "min_slices": ["5", 0, -1, 2.5, True, None, 10 ** 30, [5]],
        "slice_thickness_mm": [1e-5, "3", 0, -1, math.nan, math.inf, True, 1e6, [3]],
        "tolerance_mm": [{"spleen": "x"}, {"spleen": 0}, {"spleen": -1}, {"spleen": math.nan}, [1], "x"],
        "image": [5, [], None, True, "missing.nii.gz", ""],
        "labels": [5, ["a"], None, "missing.nii.gz", "ct.nii.gz"],
        "name": [5, ["a", "b"], None, "", "x" * 300],
        "structures_from": ["nobody", 5, None],
        "colour": [1],
    }
    return case_key.flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(values[k])))


@HOSTILE
@given(mutation=_set_mutations(), top=st.sampled_from([None, "5", 0, True, 2.5]))
def test_evaluation_set_door(door, mutation, top):
    key, value = mutation
    case = {"name": "ct", "image": "ct.nii.gz", "labels": "labels.nii.gz", "structures": {"spleen": 1}}
    case[key] = value
    data = {"case": [case]}
    if top is not None and key in ("structures", "name"):
        data["min_slices"] = top  # a second fault, at the top
    path = door / "set.json"
    path.write_text(_dump(data))
    assert_refused(cli.main, ["evaluate", path, "--out", door / "eval", "--checkpoint", door / "tripwire.pth",
                              "--device", "cpu"], door, "medsam-slicer: error: ", ["set.json"])


@HOSTILE
@given(raw=RAW_TEXTS, suffix=st.sampled_from([".json", ".toml"]))
def test_evaluation_set_door_raw_bytes(door, raw, suffix):
    path = door / f"set{suffix}"
    path.write_bytes(raw)
    assert_refused(cli.main, ["evaluate", path, "--out", door / "eval", "--checkpoint", door / "tripwire.pth"], door,
                   "medsam-slicer: error: ", [path.name])


def test_evaluate_label_files(door, tmp_path):
    """A .seg.nrrd with one flipped gzip byte is refused like a .nrrd; --labels equal to the image
    and a label value absent from the labelmap are refused; 1e-5 mm slices never allocate."""
    from MedSAMSlicerLib.evaluation.cases import load_case, resample_slices

    volume = read_volume(door / "ct.nii.gz")
    labels = read_volume(door / "labels.nii.gz", labels=True).array
    good = tmp_path / "labels.seg.nrrd"
    write_seg_nrrd([("spleen", labels == 1, (0.5, 0.5, 0.5)), ("liver", labels == 5, (0.9, 0.5, 0.4))], volume, good)
    raw = good.read_bytes()
    start = raw.index(b"\n\n") + 2 + 10 + len(raw[raw.index(b"\n\n") + 2:]) // 2
    flipped = tmp_path / "flipped.seg.nrrd"
    flipped.write_bytes(raw[:start] + bytes([raw[start] ^ 0x10]) + raw[start + 1:])
    assert gzip.decompress(raw[raw.index(b"\n\n") + 2:])  # the good one is intact
    base = ["evaluate", "--image", door / "ct.nii.gz", "--out", tmp_path / "eval", "--checkpoint", door / "tripwire.pth"]
    assert_refused(cli.main, [*base, "--labels", flipped], tmp_path, "medsam-slicer: error: ", ["flipped.seg.nrrd"],
                   contains="damaged")
    assert_refused(cli.main, [*base, "--labels", door / "ct.nii.gz"], tmp_path, "medsam-slicer: error: ",
                   ["ct.nii.gz"], contains="are the image itself")
    link = tmp_path / "same.nii.gz"
    link.symlink_to(door / "ct.nii.gz")
    assert_refused(cli.main, [*base, "--labels", link], tmp_path, "medsam-slicer: error: ", ["same.nii.gz"],
                   contains="are the image itself")
    # An image that is not the image itself but is no labelmap either.
    shifted = tmp_path / "image_as_labels.nii.gz"
    image = sitk.ReadImage(str(door / "ct.nii.gz"))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt32) + 2000, str(shifted))
    assert_refused(cli.main, [*base, "--labels", shifted], tmp_path, "medsam-slicer: error: ",
                   ["image_as_labels.nii.gz"], contains="different values")
    with pytest.raises(MedSAMError, match=r"structure 'x': label value 250 is not in '.*labels.nii.gz' \(it holds 1, "):
        load_case(door / "ct.nii.gz", door / "labels.nii.gz", structures={"x": 250})
    with pytest.raises(MedSAMError, match=r"structure 'x': must be a whole number in 1\.\.\d+ or a list"):
        load_case(door / "ct.nii.gz", door / "labels.nii.gz", structures={"x": 1.5})
    case = load_case(door / "ct.nii.gz", door / "labels.nii.gz", structures={"spleen": 1})
    tracemalloc.start()
    try:
        with pytest.raises(MedSAMError, match=r"slice_thickness_mm 1e-05 would make [\d,]+ slices .* GiB"):
            resample_slices(case, 1e-5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated before the refusal"  # refused before resampling


def test_an_empty_structure_is_named_before_the_model_loads(door):
    """Issue: an empty structure in evaluate was not named."""
    from MedSAMSlicerLib.evaluation import Structure, builtin_variants, evaluate, load_case
    from MedSAMSlicerLib.models.checkpoints import load_state_dict
    from MedSAMSlicerLib.models.registry import resolve_weights

    case = load_case(door / "ct.nii.gz", door / "labels.nii.gz", structures={"spleen": 1}, name="ct")
    case.structures.append(Structure("ghost", (250,)))
    weights = os.path.realpath(resolve_weights("litemedsam"))
    with _files_opened() as opened:
        with pytest.raises(MedSAMError, match=r"^ct/ghost is empty: none of its label value\(s\) 250 is in its labels"):
            evaluate([case], [builtin_variants()["default"]], segmenter=None, modes=("3d",))
    assert weights not in opened  # the model was never loaded (no clock: a loaded machine is slow, not wrong)
    with _files_opened() as control:
        load_state_dict(weights)  # what loading the model does to the file: seen
    assert weights in control


_OPENED: List[List[str]] = []
_HOOKED: List[bool] = []


def _record_opens(event: str, args: tuple) -> None:
    if _OPENED and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED[-1].append(os.path.realpath(os.fsdecode(args[0])))


@contextlib.contextmanager
def _files_opened():
    """The real paths of the files Python opens meanwhile (the ``open`` audit event: every
    ``open()``, ``torch.load`` of a path included). The hook is installed once per process."""
    if not _HOOKED:
        sys.addaudithook(_record_opens)
        _HOOKED.append(True)
    _OPENED.append([])
    try:
        yield _OPENED[-1]
    finally:
        _OPENED.pop()


# ---------------------------------------------------------------------------------------------
# medsam-train: configs, preprocess, export


def _config_mutations():
    values = {
        "epochs": ["10", True, 0, 2.5, 10 ** 30, None, math.nan], "batch_size": [0, "4", [4], False],
        "lr": [math.nan, math.inf, -1, 0, "1e-4", True], "labels": [["a"], 1.5, True, [1, "2"], {"a": 1}],
        "amp": ["fp8", 1, None], "freeze_image_encoder": [1, "yes", None], "seed": [-1, 2 ** 40, "x"],
        "max_steps": [0, "5", 1.5], "device": [5, [], ""], "model": [5, None], "tyop": [1],
        "num_workers": [-1, 2.0], "embedding_cache_gb": [-1, "4"], "data": [5, ["x"]],
    }
    return st.sampled_from(sorted(values)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(values[k])))


@HOSTILE
@given(mutation=_config_mutations())
def test_training_config_door(door, mutation):
    key, value = mutation
    config = {"data": str(door / "no-such-prep"), "out": str(door / "run"), "epochs": 1}
    config[key] = value
    path = door / "config.json"
    path.write_text(_dump(config))
    assert_refused(train_cli.main, ["train", "--config", path], door, "medsam-train train: error: ",
                   ["config.json", key])


@HOSTILE
@given(raw=RAW_TEXTS, suffix=st.sampled_from([".json", ".toml"]))
def test_training_config_door_raw_bytes(door, raw, suffix):
    path = door / f"config{suffix}"
    path.write_bytes(raw)
    assert_refused(train_cli.main, ["train", "--config", path], door, "medsam-train train: error: ", [path.name])


def test_training_outputs(tmp_path):
    """export never replaces a file without --overwrite and never lands on the checkpoint itself
    (nor on its run's other checkpoint); train --export-to is checked before training;
    preprocess into a file is refused."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest.pth").write_bytes(b"the training checkpoint")
    (run / "best.pth").write_bytes(b"the best checkpoint")
    (run / "config.json").write_text("{}")
    (tmp_path / "mine.pth").write_bytes(b"someone's weights")
    (tmp_path / "a_file").write_text("x")
    prefix = "medsam-train export: error: "
    assert_refused(train_cli.main, ["export", run / "latest.pth", tmp_path / "mine.pth"], tmp_path, prefix,
                   ["mine.pth"], contains="--overwrite")
    for target in (run / "latest.pth", run / "best.pth"):
        assert_refused(train_cli.main, ["export", run / "latest.pth", target, "--overwrite"], tmp_path, prefix,
                       [target.name], contains="training checkpoint")
    link = tmp_path / "link.pth"
    link.symlink_to(run / "latest.pth")
    assert_refused(train_cli.main, ["export", run / "latest.pth", link, "--overwrite"], tmp_path, prefix,
                   ["link.pth"], contains="training checkpoint")
    assert_refused(train_cli.main, ["export", run / "latest.pth", tmp_path / "w.onnx"], tmp_path, prefix,
                   ["w.onnx"], contains=".pth")
    prefix = "medsam-train train: error: "
    for target, problem in [(run / "latest.pth", "training checkpoint"), (tmp_path / "mine.pth", "--overwrite")]:
        assert_refused(train_cli.main, ["train", "--data", tmp_path / "nope", "--out", run, "--export-to", target],
                       tmp_path, prefix, [target.name], contains=problem)
    assert_refused(train_cli.main, ["preprocess", tmp_path, tmp_path / "a_file"], tmp_path,
                   "medsam-train preprocess: error: ", ["a_file"], contains="is a file, not a folder")


# ---------------------------------------------------------------------------------------------
# Outputs of segment and evaluate


def test_review_is_checked_with_its_output(door, tmp_path):
    """Issue: the review JSON's path was not checked with the output's (the mask was written,
    then exit 2 "nothing was saved"); an over-long review name exited 1."""
    (tmp_path / "m.review.json").mkdir()
    base = ["segment", door / "ct.nii.gz", "--box-ijk", 47, 30, 15, 103, 86, 15, "--checkpoint", door / "tripwire.pth"]
    assert_refused(cli.main, [*base, "-o", tmp_path / "m.nii.gz"], tmp_path, "medsam-slicer: error: ",
                   ["m.review.json"], contains="is a folder")
    long_name = "m" * 248 + ".nii"  # 252 bytes: fits; its review, 260 bytes, does not
    assert_refused(cli.main, [*base, "-o", tmp_path / long_name], tmp_path, "medsam-slicer: error: ",
                   ["review"], contains="this file system allows")
    (tmp_path / "d.review.json").symlink_to(tmp_path / "nowhere.json")
    assert_refused(cli.main, [*base, "-o", tmp_path / "d.nii.gz"], tmp_path, "medsam-slicer: error: ",
                   ["d.review.json"], contains="--overwrite")


def test_evaluate_outputs_never_through_links(door, tmp_path):
    """Issue: evaluate wrote its summary and partial CSV through links onto other files. Without
    --overwrite an earlier result (or a link) is refused before anything runs; with it, links are
    replaced by the new files and what they pointed to stays as it was."""
    from MedSAMSlicerLib.evaluation.report import CsvLog
    from MedSAMSlicerLib.fileio.atomic import write_text

    out = tmp_path / "eval"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("summary.md", "evaluation.partial.csv"):
        (out / name).symlink_to(victim)
        assert_refused(cli.main, ["evaluate", "--image", door / "ct.nii.gz", "--labels", door / "labels.nii.gz",
                                  "--out", out, "--checkpoint", door / "tripwire.pth"], tmp_path,
                       "medsam-slicer: error: ", [name], contains="--overwrite")
    write_text(out / "summary.md", "new summary\n", overwrite=True)
    CsvLog(out / "evaluation.partial.csv")
    assert victim.read_text() == "precious"
    assert not (out / "summary.md").is_symlink() and (out / "summary.md").read_text() == "new summary\n"
    assert not (out / "evaluation.partial.csv").is_symlink()
    (tmp_path / "file").write_text("x")
    assert_refused(cli.main, ["evaluate", "--image", door / "ct.nii.gz", "--labels", door / "labels.nii.gz",
                              "--out", tmp_path / "file", "--checkpoint", door / "tripwire.pth"], tmp_path,
                   "medsam-slicer: error: ", ["file"], contains="is a file, not a folder")


# ---------------------------------------------------------------------------------------------
# The headless script


def _headless_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("medsam_headless_doors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _box_ras(path: Path) -> List[str]:
    """The RAS corners (mm) of the voxel box i 47..103, j 30..86 on slice k=15 of the small CT."""
    volume = read_volume(path)
    corners = [volume.orientation.ijk_to_canonical(c) for c in ((47, 30, 15), (103, 86, 15))]
    ras = volume.canonical_to_ras(np.array(corners, dtype=float))
    return [f"{v:.3f}" for v in ras.reshape(-1)]


def test_headless_script_inputs_and_outputs(door, ct_path, tmp_path):
    """Issue: the script segmented a truncated NIfTI the command line refuses; wrote through a link
    with --overwrite and created a file at a dangling link's target without it; checked its output
    folder after the model ran; printed VTK's coloured error lines before its own."""
    main = _headless_main()
    (tmp_path / "t.nii.gz").write_bytes(ct_path.read_bytes()[:1100000])
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(4000))
    (tmp_path / "dangling.seg.nrrd").symlink_to(tmp_path / "created-by-a-link.seg.nrrd")
    (tmp_path / "a_file").write_text("x")
    base = ["--box-ras", *_box_ras(door / "ct.nii.gz"), "--checkpoint", door / "tripwire.pth", "--device", "cpu"]
    cases = [
        (["--volume", tmp_path / "t.nii.gz", "--output", tmp_path / "o.seg.nrrd"], ["t.nii.gz", "truncated"]),
        (["--volume", tmp_path / "junk.nii.gz", "--output", tmp_path / "o.seg.nrrd"], ["junk.nii.gz"]),
        (["--volume", door / "ct.nii.gz", "--output", tmp_path / "dangling.seg.nrrd"], ["dangling", "--overwrite"]),
        (["--volume", door / "ct.nii.gz", "--output", tmp_path / "a_file" / "o.seg.nrrd"], ["is a file"]),
        (["--volume", door / "ct.nii.gz", "--output", tmp_path / ("m" * 300 + ".seg.nrrd")], ["allows"]),
        (["--volume", door / "ct.nii.gz", "--output", tmp_path / "o.seg.nrrd", "--segmentation",
          tmp_path / "t.nii.gz"], ["t.nii.gz", "truncated"]),
    ]
    for argv, names in cases:
        line = assert_refused(main, [*argv, *base], tmp_path, "error: ", names)
        assert "\x1b[" not in line
    assert not (tmp_path / "created-by-a-link.seg.nrrd").exists()


def test_headless_overwrite_replaces_a_link_not_its_target(door, tmp_path):
    """With --overwrite, a link at the output is replaced by the new file; the file it pointed to
    is left as it was (one slice, to stay cheap)."""
    main = _headless_main()
    victim = tmp_path / "victim.seg.nrrd"
    victim.write_bytes(b"precious")
    out = tmp_path / "out.seg.nrrd"
    out.symlink_to(victim)
    code, _, err = _call(main, ["--volume", door / "ct.nii.gz", "--box-ras", *_box_ras(door / "ct.nii.gz"), "--output", out,
                                "--overwrite", "--slice-only", "--device", "cpu"])
    assert code == 0, err
    assert victim.read_bytes() == b"precious"
    assert not out.is_symlink() and read_seg_nrrd(out).segments[0].name == "MedSAM"
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


# ---------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_is_handled_like_sigint(tmp_path):
    """Issue: SIGTERM while publishing left a hidden temporary file and no message. A real process
    writes through the one writer under the command line's signal rule and is sent SIGTERM
    mid-write: it says so in one line, exits 143 and leaves nothing."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from MedSAMSlicerLib.fileio.atomic import atomic_write
        from MedSAMSlicerLib.progress import Terminated, sigterm_as_interrupt

        def slow(tmp):
            tmp.write_bytes(b"half")
            print("writing", flush=True)
            time.sleep(60)

        try:
            with sigterm_as_interrupt():
                atomic_write(Path({str(tmp_path / 'out.nii.gz')!r}), slow)
        except Terminated:
            print("medsam-slicer: terminated (SIGTERM); nothing was written", file=sys.stderr)
            sys.exit(143)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    assert proc.stdout.readline().strip() == "writing"
    assert [p.name for p in tmp_path.iterdir() if TEMP_MARK in p.name]  # the temporary file is there
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)  # a hang guard
    assert proc.returncode == 143 and err.strip().splitlines() == [
        "medsam-slicer: terminated (SIGTERM); nothing was written"], err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_segment_subprocess(door, tmp_path):
    """The command itself: SIGTERM after the model started -> one line, 143, nothing written."""
    cli_path = str(Path(sys.executable).parent / "medsam-slicer")
    proc = subprocess.Popen([cli_path, "segment", str(door / "ct.nii.gz"), "--box-ijk", "47", "30", "5", "103", "86",
                             "25", "-o", str(tmp_path / "o.seg.nrrd"), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Signalled once the model is loaded (the line saying so), however long that takes on a
    # loaded machine (a clock here sent SIGTERM while torch was still importing); "" is the end.
    seen = line = "x"
    while " on cpu in " not in seen and line:
        line = proc.stderr.readline()
        seen += line
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)  # a hang guard
    lines = [line for line in err.splitlines() if line.strip() and "propagating" not in line and "\r" not in line]
    assert proc.returncode == 143, (seen, err)
    assert lines[-1] == "medsam-slicer: terminated (SIGTERM); nothing was written" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
