#!/usr/bin/env bash
# 8 devices (torch.distributed.launch), the full recipe. bash test/train_full_8p.sh --data_path=/data/DukeMTMC-reID
Network="CTL_ResNet50"; RankSize=${RANK_SIZE:-8}; BatchSize=16; CaseKind=acc
train_flags=(--SOLVER.MAX_EPOCHS 120)
source "$(dirname "$0")/common.sh"
run_training "$@"
