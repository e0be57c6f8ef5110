"""Helpers shared by the launchers: command echo, argument checks, config validation.

The launchers are scripts (``python launch/tpu_pod.py``), not a package; each
puts this directory on ``sys.path`` to import this module.
"""

from __future__ import annotations

import os
import re
import shlex
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every command a launcher runs (or, with --dry-run, would run) is printed on one
# line as PREFIX + the shell-quoted argv; other lines of a plan start with "# ".
PREFIX = "+ "

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def fmt(argv) -> str:
    """One shell-quoted command line with the echo prefix."""
    return PREFIX + shlex.join(str(a) for a in argv)


def check_overrides(overrides, error) -> list[str]:
    """Every override must be ``section.key=value``; ``error(msg)`` otherwise (argparse's)."""
    for o in overrides:
        if not _OVERRIDE.match(o):
            error(f"override {o!r} is not key=value with a dotted key "
                  "(e.g. train.steps=1000 or optim.lr=3e-4)")
    return list(overrides)


def find_override(overrides, key: str):
    """The value (string) of the last ``key=...`` in overrides, or None."""
    value = None
    for o in overrides:
        k, _, v = o.partition("=")
        if k.strip() == key:
            value = v
    return value


def repo_config_path(path: str, error) -> str:
    """``path`` (relative to the working directory or to the repository root) as a path
    relative to the repository root: the remote side runs from a copy of the tree."""
    for cand in (os.path.abspath(path), os.path.join(REPO_ROOT, path)):
        if os.path.isfile(cand):
            rel = os.path.relpath(cand, REPO_ROOT)
            if rel.startswith(".."):
                error(f"--config {path!r} is outside the repository {REPO_ROOT}; the "
                      "remote side only has the repository tree")
            return rel
    error(f"--config {path!r}: no such file (looked in {os.getcwd()} and {REPO_ROOT})")
    return ""  # not reached


def validate_config(config_rel: str, overrides, error, *, warn=None):
    """Load the config with the overrides as the trainer will (unknown keys, wrong
    types, impossible combinations fail here, before anything is created).

    Returns the Config, or None where ``longctx`` cannot be imported on this
    machine (e.g. a laptop without jax): the trainer will check on the remote side.
    """
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    try:
        from longctx.config import ConfigError, load_config
    except Exception as e:  # noqa: BLE001 - any import problem means "cannot check here"
        (warn or _stderr)(f"# note: config not checked locally (cannot import longctx: {e})")
        return None
    try:
        return load_config(os.path.join(REPO_ROOT, config_rel), list(overrides))
    except ConfigError as e:
        error(f"config error: {e}")
    except (OSError, ValueError) as e:
        error(f"config error: {config_rel}: {e}")
    return None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
