import matplotlib
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture
def gen():
    """A seeded generator: every test's randomness is reproducible."""
    return torch.Generator().manual_seed(0)
