"""Directories written completely or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def staged_dir(out: str):
    """Yield a fresh temporary directory beside ``out`` (``OUT.tmp-XXXX``); when the block
    ends without error it is renamed to ``out`` (an existing ``out`` must be empty and is
    replaced), when it raises it is removed. A reader never sees ``out`` half-written."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    try:
        yield tmp
        if os.path.isdir(out):
            os.rmdir(out)  # empty: callers check before writing
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
