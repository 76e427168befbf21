"""Tiny train.py runs for tests, and what tests read back from a run's OUTPUT_DIR: metrics rows and checkpoint
weights."""
import json
import os
import socket
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("images_per_s", "step_time_s", "data_time_s")  # measured, so never equal between two runs


def tiny_flags(root, output_dir, *more):
    """Flags for a few-second CPU run: resnet18 at 64x32, P=4 identities x K=2 images, no loader workers."""
    return ["--DATASETS.NAMES", "synthetic", "--DATASETS.ROOT_DIR", root, "--OUTPUT_DIR", str(output_dir),
            "--MODEL.NAME", "resnet18", "--MODEL.PRETRAINED", "false", "--MODEL.DEVICE", "cpu",
            "--INPUT.SIZE_TRAIN", "64", "32", "--INPUT.SIZE_TEST", "64", "32",
            "--SOLVER.IMS_PER_BATCH", "4", "--DATALOADER.NUM_INSTANCE", "2", "--DATALOADER.NUM_WORKERS", "0",
            "--TEST.IMS_PER_BATCH", "32", "--SOLVER.WARMUP_EPOCHS", "4", *more]


def free_port():
    """A TCP port nothing listens on now (for a rendezvous of one test's processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank, world_size, port, **more):
    """The environment of one rank of a job started without a launcher (one intra-op thread each)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank),
            **more}


def run_ranks(args, world_size, timeout=240):
    """Run world_size processes of one job without a launcher -> [(exit code, stdout, stderr)] in rank order."""
    port = free_port()
    procs = [subprocess.Popen(args, cwd=ROOT, env=rank_env(rank, world_size, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(world_size)]
    return [(proc.returncode, *outputs) for proc, outputs in zip(procs, [p.communicate(timeout=timeout)
                                                                          for p in procs])]


def assert_all_succeeded(results):
    """Every rank of run_ranks' results exited 0 -> rank 0's stdout."""
    assert [code for code, _, _ in results] == [0] * len(results), results
    return results[0][1]


def read_metrics(output_dir):
    """The rows of OUTPUT_DIR/metrics.jsonl."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_metrics(output_dir):
    """The last metrics.jsonl row without its timings."""
    return {k: v for k, v in read_metrics(output_dir)[-1].items() if k not in TIMING}


def weights(path):
    """The model state of a checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    """Two model states hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
