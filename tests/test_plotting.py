import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from dlearn import datasets, plotting, toys


def test_grid_array_places_each_image():
    imgs = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 1, 2, 2)
    grid = plotting.grid_array(imgs, nrow=3, pad=1, pad_value=-9)
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1)
    np.testing.assert_array_equal(grid[1:3, 1:3], imgs[0, 0].numpy())
    np.testing.assert_array_equal(grid[4:6, 4:6], imgs[4, 0].numpy())  # row 1, column 1
    assert (grid[4:6, 7:9] == -9).all()  # the empty sixth cell
    with pytest.raises(ValueError, match="one-channel"):
        plotting.grid_array(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="nrow"):
        plotting.grid_array(imgs, nrow=0)


def test_density_grid_evaluates_the_log_density():
    mix = toys.mixture_2d()
    gx, gy, logp = plotting.density_grid(mix.log_prob, (-3, 3), (-2, 2), n=7)
    assert gx.shape == gy.shape == logp.shape == (7, 7)
    pt = torch.tensor([[gx[2, 5], gy[2, 5]]], dtype=torch.float64)
    assert logp[2, 5] == pytest.approx(mix.log_prob(pt).item())
    assert gx[0, 0] == -3 and gy[-1, 0] == 2


def test_plots_draw_and_check_shapes():
    mix = toys.mixture_2d()
    x, labels = mix.sample(100, torch.Generator().manual_seed(0))
    fig, axes = plt.subplots(1, 3)
    plotting.plot_density_2d(mix.log_prob, axes[0], n=20)
    plotting.plot_samples_2d(x, axes[1], labels=labels)
    plotting.plot_trajectories(torch.randn(10, 5, 2), axes[2])
    plotting.image_grid(datasets.digits("test")[0][:12].float(), nrow=6)
    assert len(axes[2].lines) == 5
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plotting.plot_samples_2d(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"\(steps, N, 2\)"):
        plotting.plot_trajectories(torch.zeros(3, 2))
    plt.close("all")


def test_savefig_writes_into_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DLEARN_OUTPUT_DIR", str(tmp_path))
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1])
    path = plotting.savefig(fig, "00_test")
    assert path == tmp_path / "00_test.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert plotting.FIG_DPI >= 150  # the house style
    with Image.open(path) as png:  # the resolution written into the file, and pixels to match it
        assert png.info["dpi"] == pytest.approx((plotting.FIG_DPI, plotting.FIG_DPI), abs=0.5)
        assert min(png.size) >= 1.5 * plotting.FIG_DPI  # a 2 x 2 inch figure, trimmed to its content
    with Image.open(plotting.savefig(fig, "00_test_low", dpi=50)) as png:
        assert png.info["dpi"] == pytest.approx((50, 50), abs=0.5)
    with pytest.raises(ValueError, match="plain file stem"):
        plotting.savefig(fig, "../escape")
    plt.close(fig)
