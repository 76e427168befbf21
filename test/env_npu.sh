#!/usr/bin/env bash
# Ascend CANN environment; sourced by the wrappers only where $CANN_ROOT (default /usr/local/Ascend) exists.
CANN_ROOT=${CANN_ROOT:-/usr/local/Ascend}
for f in "$CANN_ROOT/ascend-toolkit/set_env.sh" "$CANN_ROOT/nnae/set_env.sh"; do
  if [ -f "$f" ]; then source "$f"; break; fi
done
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
