"""Shared fixtures: one tiny synthetic data set per test session (Market-1501 layout, 64x32 images)."""
import pytest

from synthetic import synthesize


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """ROOT holding ROOT/synthetic: 8 train identities, 8 query/gallery identities, 3 cameras, 64x32 JPEGs.

    Read-only for the tests: a test that changes files makes its own copy."""
    root = tmp_path_factory.mktemp("data")
    synthesize(str(root / "synthetic"), ids=16, images_per_id=6, cameras=3, size=(64, 32), progress=False)
    return str(root)
