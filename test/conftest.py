"""Shared fixtures: tiny synthetic data sets, one of each kind per test session (Market-1501 layout), and the
uninterrupted reference runs that several test files compare stopped and resumed runs with."""
import signal
import sys

import pytest
import torch
from run_outputs import assert_all_succeeded, run_ranks, tiny_flags

import train
from support import image_check
from support.synthetic import synthesize


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """ROOT holding ROOT/synthetic: 8 train identities, 8 query/gallery identities, 3 cameras, 64x32 JPEGs.

    Read-only for the tests: a test that changes files makes its own copy."""
    root = tmp_path_factory.mktemp("data")
    synthesize(str(root / "synthetic"), ids=16, images_per_id=6, cameras=3, size=(64, 32), progress=False)
    return str(root)


@pytest.fixture(scope="session")
def synthetic_root_128(tmp_path_factory):
    """ROOT holding ROOT/synthetic at the generator's own 128x64: 3 train and 3 query/gallery identities, 2 cameras
    (for tests that resize real-sized JPEGs). Read-only, like synthetic_root."""
    root = tmp_path_factory.mktemp("data128")
    synthesize(str(root / "synthetic"), ids=6, images_per_id=4, cameras=2, progress=False)
    return str(root)


@pytest.fixture(scope="session")
def one_process_run(synthetic_root, tmp_path_factory):
    """An uninterrupted two-epoch run of train.main in this process (tiny_flags: P=4 x K=2, one intra-op thread,
    evaluated and checkpointed after each epoch): the OUTPUT_DIR that test_train reads and that stopped and resumed
    one-process runs must equal. Read-only, like synthetic_root."""
    out = tmp_path_factory.mktemp("one_process_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as test_reliability trains: the weights are compared bit for bit
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(image_check.CACHE_DIR_ENV, str(out / "cache"))
            assert train.main(tiny_flags(synthetic_root, out, "--SOLVER.MAX_EPOCHS", "2",
                                         "--SOLVER.CHECKPOINT_PERIOD", "1")) == 0
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # train.main's handlers undone
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return out


@pytest.fixture(scope="session")
def two_rank_run(synthetic_root, tmp_path_factory):
    """An uninterrupted two-epoch run of 2 ranks (P=2 x K=2 each, evaluated after each epoch): what stopped and
    resumed 2-rank runs with the same data, seed, P, K and epochs must equal (LOG_PERIOD, EVAL_PERIOD and
    CHECK_IMAGES do not change the weights). Read-only, like synthetic_root."""
    out = tmp_path_factory.mktemp("two_rank_run")
    assert_all_succeeded(run_ranks([sys.executable, "train.py", *tiny_flags(
        synthetic_root, out, "--SOLVER.IMS_PER_BATCH", "2", "--SOLVER.MAX_EPOCHS", "2", "--SOLVER.LOG_PERIOD", "1")],
        2))
    return out
