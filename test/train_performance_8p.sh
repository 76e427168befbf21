#!/usr/bin/env bash
# 8 devices (torch.distributed.launch), 2 epochs: speed. bash test/train_performance_8p.sh --data_path=/data/DukeMTMC-reID
Network="CTL_ResNet50"; RankSize=${RANK_SIZE:-8}; BatchSize=16; CaseKind=perf
train_flags=(--SOLVER.MAX_EPOCHS 2 --SOLVER.EVAL_PERIOD 2)
source "$(dirname "$0")/common.sh"
run_training "$@"
