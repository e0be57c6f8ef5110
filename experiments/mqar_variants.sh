#!/bin/bash
# MQAR on the tiny model, one training run per "variant seed" (docs/results/mqar_variants.md):
#   bash experiments/mqar_variants.sh "rwkv7 0" "rwkv7 1" "full 0" ...
# variant `full` = full attention; any other = model.attention.linear.variant. Run from the
# repository root; checkpoints go to runs/mqar/ and logs to runs/mqar/VARIANT_sSEED.log
# (runs/ is git-ignored).
set -e
mkdir -p runs/mqar
for spec in "$@"; do
  set -- $spec
  if [ "$1" = full ]; then extra="model.attention.backend=full"
  else extra="model.attention.backend=linear model.attention.linear.variant=$1"; fi
  python -m longctx.train --config experiments/configs/tiny.yaml --no-progress $extra \
    train.seed="$2" train.run_dir="runs/mqar/$1_s$2" > "runs/mqar/$1_s$2.log" 2>&1
done
