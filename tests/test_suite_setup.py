"""The suite's own setup (tests/conftest.py) leaves the process as the tests expect it."""

import gc


def test_the_cyclic_collector_is_on_again_after_collection_and_what_collection_made_is_frozen():
    # Collection runs with the collector off (tests/conftest.py::pytest_collection); a wrapper that
    # failed to turn it back on would run every test without it, and memory would grow with them.
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0


def test_after_the_numba_compiler_fixture_a_compile_imports_nothing_an_inner_session_could_drop(numba_compiler):
    """What the fixture is for (tests/conftest.py::numba_compiler): a compile of a new signature,
    as an inner pytester session may make, finds every module it needs already imported, so none is
    dropped with the inner session's and imported twice. Fails without the fixture where the kernels
    come from numba's disk cache (a compile then imports numba.core.boxing)."""
    import sys

    import numpy as np
    from numba import njit

    @njit(cache=False)
    def fresh(rows, scale):
        out = np.zeros(rows.shape[0])
        for r in range(rows.shape[0]):
            out[r] = rows[r].sum() + (0.0 if scale is None else scale[r, 0])
        return out

    before = set(sys.modules)
    fresh(np.ones((2, 3), np.float32), None)
    fresh(np.ones((2, 3)), np.ones((2, 3)))
    assert sorted(m for m in set(sys.modules) - before if m.startswith("numba")) == []
