#!/usr/bin/env bash
# Thin wrapper: launch/tpu_pod.sh ARGS == $PYTHON launch/tpu_pod.py ARGS (see launch/README.md).
#
#   launch/tpu_pod.sh --name my-v5e --zone us-west4-a --accelerator-type v5litepod-16 \
#       --config experiments/configs/base.yaml --run-dir gs://BUCKET/runs/base [--dry-run] \
#       -- train.steps=20000
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/tpu_pod.py" "$@"
