#!/bin/bash
# MQAR tiny runs (issue 17), sequential: run.sh "variant seed" ["variant seed" ...]
# variant full = full attention; else model.attention.linear.variant.
cd /work/wt/rwkv-finish
source /work/venv/bin/activate
export PYTHONPATH=$PWD
for spec in "$@"; do
  set -- $spec
  if [ $1 = full ]; then extra="model.attention.backend=full"; else extra="model.attention.backend=linear model.attention.linear.variant=$1"; fi
  /usr/bin/time -f "wall %e s" nice -n 5 python -m longctx.train --config experiments/configs/tiny.yaml $extra train.seed=$2 train.run_dir=results/mqar/$1_s$2 > results/mqar/$1_s$2.log 2>&1
done
