"""ParallelDims: degrees, 'the rest', and errors that say which numbers to change."""

import pytest

from lightning_distnn.mesh import ParallelDims


def test_rest_degree_fills_world():
    dims = ParallelDims(dp=-1, pp=2, tp=2, world_size=8)
    assert dims.degrees == {"dp": 2, "pp": 2, "tp": 2}
    assert dims.enabled_axes == ["dp", "pp", "tp"]


def test_coordinates_tp_innermost():
    dims = ParallelDims(dp=2, pp=5, tp=1, world_size=10)
    assert dims.coordinates(0) == {"dp": 0, "pp": 0, "tp": 0}
    assert dims.coordinates(7) == {"dp": 1, "pp": 2, "tp": 0}
    dims = ParallelDims(dp=1, pp=2, tp=2, world_size=4)
    assert [dims.coordinates(r)["tp"] for r in range(4)] == [0, 1, 0, 1]


def test_layout_not_fitting_names_numbers():
    with pytest.raises(ValueError) as err:
        ParallelDims(dp=2, pp=2, tp=1, world_size=6)
    msg = str(err.value)
    assert "dp=2, pp=2, tp=1" in msg and "world_size=6" in msg and "devices" in msg


def test_rest_not_dividing():
    with pytest.raises(ValueError, match="does not divide 10"):
        ParallelDims(dp=-1, pp=3, world_size=10)


@pytest.mark.parametrize("kwargs", [dict(dp=0), dict(pp=-2), dict(dp=-1, tp=-1)])
def test_bad_degrees(kwargs):
    with pytest.raises(ValueError):
        ParallelDims(world_size=4, **kwargs)
