"""Deprecated alias of :mod:`longctx.backends.full.ops` (kept for one release)."""

from longctx.backends.full.ops import *  # noqa: F401,F403
from longctx.backends.full.ops import IMPLS, attention  # noqa: F401
