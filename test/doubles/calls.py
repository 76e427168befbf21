"""The record the test doubles keep: one JSON line per call, appended to the file named by $DOUBLES_LOG (nothing
is written when it is unset), so that a test can tell which NPU and apex branches a run went through."""
import json
import os


def record(call, **details):
    """Append {"call": call, "pid": ..., "rank": ..., **details} to $DOUBLES_LOG."""
    path = os.environ.get("DOUBLES_LOG")
    if not path:
        return
    row = {"call": call, "pid": os.getpid(), "rank": int(os.environ.get("RANK", 0)), **details}
    with open(path, "a") as f:  # one short write per line: lines of several processes do not interleave
        f.write(json.dumps(row, default=str) + "\n")
