"""Deprecated alias of :mod:`longctx.backends.linear.ops` (kept for one release)."""

from longctx.backends.linear.ops import *  # noqa: F401,F403
from longctx.backends.linear.ops import FORMS, delta_rule, linear_attention  # noqa: F401
