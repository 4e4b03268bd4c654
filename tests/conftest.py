import matplotlib
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture
def gen():
    """A seeded generator: every test's randomness is reproducible."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _close_figures():
    """Widgets draw with plt.show(), which keeps figures open under Agg: close them after each test."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
