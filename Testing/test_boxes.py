"""The one box rule (``MedSAMSlicerLib.boxes``) that the command line and the MRML bridge share."""

from __future__ import annotations

import numpy as np
import pytest

from MedSAMSlicerLib.boxes import BoxOutside, BoxPrompt, middle_slice, voxel_box


def test_voxel_box_takes_the_centres_inside_and_clips():
    shape = (10, 20, 30)  # z, y, x
    first, last = voxel_box(np.array([[2.0, 3.0, 4.0], [5.0, 7.5, 6.0]]), shape)
    assert (first, last) == ([2, 3, 4], [5, 7, 6])  # corners on centres are inside; 7.5 -> 7
    first, last = voxel_box(np.array([[2.0005, 2.9995, 4.0], [-5.0, 30.0, 99.0]]), shape)
    assert (first, last) == ([0, 3, 4], [2, 19, 9])  # tolerance 0.001 voxel; clipped to the volume


def test_a_box_thinner_than_a_voxel_takes_the_nearest_voxel():
    first, last = voxel_box(np.array([[1.0, 1.0, 4.2], [5.0, 5.0, 4.4]]), (10, 10, 10))
    assert first[2] == last[2] == 4


@pytest.mark.parametrize("points, axis", [([[-3, 0, 0], [-1, 2, 2]], 0), ([[0, 12, 0], [2, 15, 2]], 1), ([[0, 0, 11], [2, 2, 12]], 2)])
def test_a_box_outside_names_the_axis(points, axis):
    with pytest.raises(BoxOutside) as info:
        voxel_box(np.array(points, dtype=float), (10, 10, 10))
    assert info.value.axis == axis


def test_middle_slice_and_prompts():
    assert [middle_slice(0, z1) for z1 in (0, 1, 2, 3, 4)] == [0, 0, 1, 1, 2]
    assert middle_slice(9, 3) == middle_slice(3, 9) == 6
    assert BoxPrompt.from_voxel_box([1, 2, 7], [5, 6, 7]) == BoxPrompt(7, (1, 2, 5, 6))
    prompt = BoxPrompt.from_voxel_box([1, 2, 3], [5, 6, 8])
    assert prompt == BoxPrompt(5, (1, 2, 5, 6), (3, 8)) and prompt.box3d == (1, 2, 3, 5, 6, 8)
