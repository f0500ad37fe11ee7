"""TensorFlow imported without the start-up lines no setting silences; imported first by the package.

TensorFlow 2.21 writes two lines twice while it is imported (absl's notice that it logs before its
logging is set up, and "oneDNN custom operations are on"), before its logging reads
TF_CPP_MIN_LOG_LEVEL, so that variable cannot hide them (only TF_ENABLE_ONEDNN_OPTS=0 does, which
changes the kernels): every `ptycho-parity run` began with four lines of them. While TensorFlow is
imported, native writes to stderr are held back and written out afterwards without those lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

# TensorFlow logs INFO lines on import; keep them out of test and CLI output unless asked for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

STARTUP_LINES = ("All log messages before absl::InitializeLog() is called", "oneDNN custom operations are on")


@contextlib.contextmanager
def lines_dropped(drop: tuple[str, ...] = STARTUP_LINES) -> Iterator[None]:
    """Native writes to stderr (fd 2) held back while the block runs, then written out without the
    lines holding one of ``drop``. Only where TF_CPP_MIN_LOG_LEVEL asks for no INFO lines: a user who
    set it to 0 sees them. An exception in the block still writes the held lines first."""
    try:
        quiet = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")) >= 1
    except ValueError:
        quiet = False
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if not any(d.encode() in line for d in drop)]
            if kept:
                os.write(2, b"".join(kept))


with lines_dropped():
    import tensorflow  # noqa: F401
