#!/bin/bash
# MQAR tiny runs (issue 17), sequential: results/mqar/run.sh "variant seed" ["variant seed" ...]
# variant full = full attention; else model.attention.linear.variant. Run from the repository
# root; checkpoints go to runs/mqar/ (git-ignored), logs to results/mqar/VARIANT_sSEED.log.
set -e
for spec in "$@"; do
  set -- $spec
  if [ $1 = full ]; then extra="model.attention.backend=full"
  else extra="model.attention.backend=linear model.attention.linear.variant=$1"; fi
  /usr/bin/time -f "wall %e s" python -m longctx.train --config experiments/configs/tiny.yaml \
    --no-progress $extra train.seed=$2 train.run_dir=runs/mqar/$1_s$2 > results/mqar/$1_s$2.log 2>&1
done
