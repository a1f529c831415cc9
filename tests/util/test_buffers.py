"""`huge_page_array`: zeroed, writable, C-contiguous arrays of any shape and dtype, each in
whole 2 MiB pages of its own (where reads from the page cache cost the least)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mergebench.util.buffers import HUGE_PAGE, huge_page_array


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((9, 262_144), np.float32), (5, np.uint16), ((0,), np.float64), ((3, 0), np.uint8)],
)
def test_shape_dtype_zeroed_and_writable(shape, dtype):
    array = huge_page_array(shape, dtype)
    expected = (shape,) if isinstance(shape, int) else shape
    assert array.shape == expected and array.dtype == np.dtype(dtype)
    assert array.flags.c_contiguous and array.flags.writeable
    assert not array.any()
    array[...] = 7
    assert (array == 7).all()


def test_each_array_has_whole_huge_pages_of_its_own():
    first, second = huge_page_array(10, np.uint8), huge_page_array(3 * HUGE_PAGE + 1, np.uint8)
    first[:] = 1
    assert not second.any()  # not sharing memory
    region = second
    while isinstance(region, np.ndarray):
        region = region.base
    assert len(region) == 4 * HUGE_PAGE  # its own mapping, rounded up to whole pages


def test_reads_land_in_it(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(3 * 4096 + 5)
    path.write_bytes(data)
    out = huge_page_array(len(data), np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.preadv(fd, [memoryview(out)], 0) == len(data)
    finally:
        os.close(fd)
    assert out.tobytes() == data
