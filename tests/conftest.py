import matplotlib
import pytest
import torch

from dlearn import text2image as t2i

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


@pytest.fixture(scope="module")
def base():
    """A seeded, untrained text-to-image model, locked: the base the ControlNet tests build on (fast)."""
    torch.manual_seed(0)
    return t2i.TextToImage().eval().requires_grad_(False)


@pytest.fixture
def batch(gen):
    """A ControlNet training batch: noisy images, timesteps, prompt ids and binary controls, 6 of each."""
    x = torch.randn(6, 1, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (6,), generator=gen)
    ids = t2i.tokenize(["a three", "", "a thick one", "a seven", "a slanted two", ""])
    c = (torch.rand(6, 1, 8, 8, generator=gen) > 0.5).float()
    return x, t, ids, c
