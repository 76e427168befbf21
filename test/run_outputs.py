"""What tests read back from a train.py run's OUTPUT_DIR: metrics rows and checkpoint weights."""
import json
import os

import torch

TIMING = ("images_per_s", "step_time_s", "data_time_s")  # measured, so never equal between two runs


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
