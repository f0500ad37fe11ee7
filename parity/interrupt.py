"""A Ctrl-C seen for what it is, even where an extension turns it into another exception.

The runner reports a backend that raises as crashed and goes on with the others. A SIGINT that lands
while a framework's C++ runs Python code (TensorFlow tracing a graph, through pybind11) comes back
as another exception: "RuntimeError: pybind11::error_already_set: MISMATCH of original and
normalized active exception types: ORIGINAL InvalidArgumentError REPLACED BY KeyboardInterrupt".
Caught as a crash, one Ctrl-C ended a run with "backend tensorflow crashed" and exit 3 instead of
130 (seen once in CI, tests/parity/test_interrupts.py). Within :func:`watching`, a SIGINT is recorded
before Python's own handler raises, and :func:`check` turns whatever a backend raised afterwards back
into the interrupt it was. A SIGINT can also be swallowed whole: one that landed while numba's
compiler (llvmlite) ran a ctypes callback, writing its cache, was printed as "Exception ignored on
calling ctypes callback function" and the run went on to "verdict: pass", exit 0 (a clean clone's CI
run, where nothing was compiled yet). So the runner also calls :func:`check` after each backend's
forward, and the watch raises on leaving if a SIGINT came that nothing raised.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_seen = False


@contextmanager
def watching() -> Iterator[None]:
    """Record every SIGINT while inside, then act on it as the handler in place before would.

    Signal handlers belong to the main thread: elsewhere nothing is installed and :func:`check`
    never fires. Nesting is harmless (the inner watch records and chains to the outer one).
    """
    global _seen
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def record(signum: int, frame: FrameType | None) -> None:
        global _seen
        if previous is signal.SIG_IGN:
            return
        _seen = True
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL, or a handler installed from C: end the run as Python's default would
            raise KeyboardInterrupt

    _seen = False
    signal.signal(signal.SIGINT, record)
    try:
        yield
        check()  # a Ctrl-C something swallowed on the way still ends what it was meant to end
    finally:
        signal.signal(signal.SIGINT, previous)
        _seen = False


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT came during the current watch: call it where a backend's
    exception is about to be recorded as a crash."""
    if _seen:
        raise KeyboardInterrupt
