#!/usr/bin/env bash
# One device, 2 epochs: speed. bash test/train_performance_1p.sh --data_path=/data/DukeMTMC-reID
Network="CTL_ResNet50"; RankSize=1; BatchSize=16; CaseKind=perf
train_flags=(--SOLVER.MAX_EPOCHS 2 --SOLVER.EVAL_PERIOD 2)
source "$(dirname "$0")/common.sh"
run_training "$@"
