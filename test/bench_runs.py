"""bench.py run as its users run it, through its command line (no test imports bench.py): the tests of its stages
read the JSON rows it writes and the metrics lines it prints."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # a CPU run, as on the CI
# bench.py --stages' names, in the table's order: a contract (README.md, docs/performance.md)
STAGES = ("loader", "step", "e2e", "features", "metrics", "large-gallery", "centroids", "search", "preflight", "losses",
          "rerank", "report")


def run(args, timeout=240, env=None):
    """Run a command from the repository root; returns the CompletedProcess (text)."""
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})


def run_bench(argv, tmp_path, timeout=240):
    """python bench.py --device cpu ARGV --json FILE, which must succeed: (CompletedProcess, the JSON's rows)."""
    out = tmp_path / "bench.json"
    result = run([sys.executable, "bench.py", "--device", "cpu", *argv, "--json", str(out)], timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result, json.loads(out.read_text())["rows"]


def bench_main(argv):
    """bench.py's exit code for argv, its output passed on to sys.stdout and sys.stderr: the CLI as a main(argv)."""
    result = run([sys.executable, "bench.py", *argv])
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def printed_metrics(stdout, name):
    """{"mAP", "R1"[, "mINP"]} as fractions, from the line '  NAME: mAP 84.123 %, R1 97.000 %[, mINP ...]' a stage
    prints for an evaluation of its synthetic problem."""
    line = next(line for line in stdout.splitlines() if line.startswith(f"  {name}: mAP "))
    return {key: float(value) / 100 for key, value in re.findall(r"(mAP|R1|mINP) ([\d.]+) %", line)}
