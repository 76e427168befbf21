"""Shared fixtures: tiny synthetic data sets, one of each kind per test session (Market-1501 layout)."""
import pytest

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
