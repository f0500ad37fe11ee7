"""The suite's own setup (tests/conftest.py) leaves the process as the tests expect it."""

import gc


def test_the_cyclic_collector_is_on_again_after_collection_and_what_collection_made_is_frozen():
    # Collection runs with the collector off (tests/conftest.py::pytest_collection); a wrapper that
    # failed to turn it back on would run every test without it, and memory would grow with them.
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0
