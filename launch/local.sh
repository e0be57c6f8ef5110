#!/usr/bin/env bash
# N longctx trainer processes on this machine (CPU) as one multi-controller JAX job:
#
#   launch/local.sh [-n N] [-d D] [--port P] [--dry-run] -- --config CONFIG [key=value ...]
#
# -n processes (default 2), -d simulated CPU devices per process (default 4). Each process
# gets LONGCTX_COORDINATOR=localhost:<free port>, LONGCTX_NUM_PROCESSES=N,
# LONGCTX_PROCESS_ID=i, XLA_FLAGS=--xla_force_host_platform_device_count=D and
# JAX_PLATFORMS=cpu; its output lines are prefixed with [pI]; the exit status is non-zero
# if any process fails. The work is done by launch/local.py, run with $PYTHON (default
# python3), which also runs the trainers.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/local.py" "$@"
