#!/usr/bin/env bash
# One device, the full recipe (120 epochs). bash test/train_full_1p.sh --data_path=/data/DukeMTMC-reID
Network="CTL_ResNet50"; RankSize=1; BatchSize=16; CaseKind=acc
train_flags=(--SOLVER.MAX_EPOCHS 120)
source "$(dirname "$0")/common.sh"
run_training "$@"
